//! How an error reaches a Trino client: the Trino error name and code a DataFusion or Iceberg
//! error maps to.
//!
//! DataFusion tells some errors apart only by their message (a missing table or function is a
//! `Plan` error with a sentence). The tests below run a statement for every mapped error through
//! DataFusion itself, so that an upgrade that changes those sentences fails here, not silently
//! in a client.

use datafusion::common::{DataFusionError, SchemaError};
use iceberg::{NamespaceIdent, TableIdent};

use crate::catalog::CATALOG;

use crate::protocol::{ErrorCode, Failure};

/// The Trino error a DataFusion error is to a client.
pub fn failure(e: DataFusionError) -> Failure {
    let message = e.to_string();
    let code = match e.find_root() {
        DataFusionError::SQL(..) => ErrorCode::SyntaxError,
        DataFusionError::SchemaError(e, _) if matches!(e.as_ref(), SchemaError::FieldNotFound { .. }) => {
            ErrorCode::ColumnNotFound
        }
        DataFusionError::Plan(m) if m.contains("not found") && m.starts_with("table") => ErrorCode::TableNotFound,
        DataFusionError::Plan(m) if m.contains("Invalid function") => ErrorCode::FunctionNotFound,
        DataFusionError::Plan(m) if m.contains("No function matches") || m.contains("Cannot") => {
            ErrorCode::TypeMismatch
        }
        DataFusionError::Plan(_) => ErrorCode::GenericUserError,
        DataFusionError::ResourcesExhausted(_) => ErrorCode::ExceededMemoryLimit,
        DataFusionError::NotImplemented(_) => ErrorCode::NotSupported,
        DataFusionError::ArrowError(e, _) => match e.as_ref() {
            datafusion::arrow::error::ArrowError::CastError(_) => ErrorCode::InvalidCastArgument,
            datafusion::arrow::error::ArrowError::DivideByZero => ErrorCode::DivisionByZero,
            _ => ErrorCode::GenericUserError,
        },
        DataFusionError::Execution(m) if m.contains("Divide by zero") => ErrorCode::DivisionByZero,
        DataFusionError::Execution(_) => ErrorCode::GenericUserError,
        _ => ErrorCode::GenericInternalError,
    };
    Failure::new(code, message)
}

pub(crate) fn table_not_found(ident: &TableIdent) -> Failure {
    Failure::new(
        ErrorCode::TableNotFound,
        format!(
            "Table '{CATALOG}.{}.{}' does not exist",
            ident.namespace.to_url_string(),
            ident.name
        ),
    )
}

pub(crate) fn not_found_schema(e: iceberg::Error, namespace: &NamespaceIdent) -> Failure {
    tracing::debug!(error = %e, "listing tables");
    Failure::new(
        ErrorCode::SchemaNotFound,
        format!("Schema '{}' does not exist", namespace.to_url_string()),
    )
}

pub(crate) fn iceberg_failure(e: iceberg::Error) -> Failure {
    Failure::new(ErrorCode::GenericInternalError, format!("Iceberg catalog: {e}"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::{
        arrow::{
            array::{Int64Array, RecordBatch},
            datatypes::{DataType, Field, Schema},
        },
        datasource::MemTable,
        prelude::SessionContext,
    };

    use super::*;

    /// The Trino error `sql` fails with on a table `t(n BIGINT)`, planned and run by DataFusion.
    async fn error_of(sql: &str) -> ErrorCode {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![1, 0]))]).expect("batch");
        let ctx = SessionContext::new();
        let table = MemTable::try_new(schema, vec![vec![batch]]).expect("table");
        ctx.register_table("t", Arc::new(table)).expect("register");
        let result = match ctx.sql(sql).await {
            Ok(frame) => frame.collect().await.map(|_| ()),
            Err(e) => Err(e),
        };
        failure(result.expect_err(sql)).code
    }

    #[tokio::test]
    async fn every_mapped_datafusion_error_is_told_apart_as_datafusion_says_it() {
        for (sql, code) in [
            ("SELEC n FROM t", ErrorCode::SyntaxError),
            ("SELECT nosuch FROM t", ErrorCode::ColumnNotFound),
            ("SELECT * FROM nosuch", ErrorCode::TableNotFound),
            ("SELECT nosuch_function(n) FROM t", ErrorCode::FunctionNotFound),
            ("SELECT abs(n, n, n) FROM t", ErrorCode::TypeMismatch),
            ("SELECT 1 / n FROM t", ErrorCode::DivisionByZero),
            ("SELECT CAST('warm' AS BIGINT) FROM t", ErrorCode::InvalidCastArgument),
        ] {
            assert_eq!(error_of(sql).await, code, "{sql}");
        }
    }
}
