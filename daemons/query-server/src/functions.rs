//! Trino's date and time field functions that DataFusion lacks under these names:
//! `year`, `month`, `day`, `hour`, `minute`, `second`, each taking a date or timestamp and
//! giving a `bigint`. A timestamp with a time zone is read in that zone, as Trino does.

use std::any::Any;

use arrow_schema::DataType;
use datafusion::{
    arrow::compute::{cast, kernels::temporal::DatePart},
    common::{Result, ScalarValue, exec_err, plan_err},
    logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility},
    prelude::SessionContext,
};

/// Registers the functions on `ctx`.
pub fn register(ctx: &SessionContext) {
    for name in ["year", "month", "day", "hour", "minute", "second"] {
        ctx.register_udf(ScalarUDF::new_from_impl(Field::new(name)));
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Field {
    name: &'static str,
    signature: Signature,
}

impl Field {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            signature: Signature::any(1, Volatility::Immutable),
        }
    }

    fn part(&self) -> DatePart {
        match self.name {
            "year" => DatePart::Year,
            "month" => DatePart::Month,
            "day" => DatePart::Day,
            "hour" => DatePart::Hour,
            "minute" => DatePart::Minute,
            _ => DatePart::Second,
        }
    }
}

impl ScalarUDFImpl for Field {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        match args {
            [DataType::Timestamp(..) | DataType::Date32 | DataType::Date64] => Ok(DataType::Int64),
            [other] => plan_err!(
                "Cannot apply {}() to {other}: it takes a date or a timestamp",
                self.name
            ),
            _ => plan_err!("{}() takes one argument", self.name),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [value] = args.args.as_slice() else {
            return exec_err!("{}() takes one argument", self.name);
        };
        let field = |array: &dyn arrow_array::Array| -> Result<arrow_array::ArrayRef> {
            let part = datafusion::arrow::compute::kernels::temporal::date_part(array, self.part())?;
            Ok(cast(&part, &DataType::Int64)?)
        };
        Ok(match value {
            ColumnarValue::Array(array) => ColumnarValue::Array(field(array.as_ref())?),
            ColumnarValue::Scalar(scalar) => {
                let array = scalar.to_array()?;
                ColumnarValue::Scalar(ScalarValue::try_from_array(&field(array.as_ref())?, 0)?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hour_reads_timestamps_in_their_zone() {
        let ctx = SessionContext::new();
        register(&ctx);
        let batches = ctx
            .sql(
                "SELECT hour(TIMESTAMP '2026-01-08 14:59:59'), \
                 hour(arrow_cast(1767880800000000, 'Timestamp(Microsecond, Some(\"+02:00\"))')), \
                 day(DATE '2026-01-08')",
            )
            .await
            .expect("planned")
            .collect()
            .await
            .expect("ran");
        let row = crate::protocol::rows(&batches[0]);
        assert_eq!(
            row,
            vec![vec![serde_json::json!(14), serde_json::json!(16), serde_json::json!(8)]]
        );
        assert!(ctx.sql("SELECT hour('x')").await.is_err());
    }
}
