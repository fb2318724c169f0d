//! Trino's client protocol, v1: the `QueryResults` document, Trino's type names and type
//! signatures, its error codes, and values encoded as Trino encodes them in `data`.

use arrow_array::{Array, RecordBatch, cast::AsArray, types};
use arrow_schema::{DataType, Field, TimeUnit};
use chrono::{DateTime, NaiveDate};
use serde::Serialize;
use serde_json::{Value, json};

/// One response to `POST /v1/statement` or a `GET` of its `nextUri`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryResults {
    pub id: String,
    pub info_uri: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<Column>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Vec<Vec<Value>>>,
    pub stats: Stats,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<QueryError>,
    pub warnings: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_type: Option<String>,
}

/// Progress of a query, as far as this single-node engine knows it.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub state: State,
    pub queued: bool,
    pub scheduled: bool,
    pub nodes: u32,
    pub total_splits: u64,
    pub queued_splits: u64,
    pub running_splits: u64,
    pub completed_splits: u64,
    pub cpu_time_millis: u64,
    pub wall_time_millis: u64,
    pub queued_time_millis: u64,
    pub elapsed_time_millis: u64,
    pub processed_rows: u64,
    pub processed_bytes: u64,
    pub physical_input_bytes: u64,
    pub peak_memory_bytes: u64,
    pub spilled_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    #[default]
    Queued,
    Running,
    Finished,
    Failed,
}

/// A result column: its name, Trino's type name and the type signature clients parse.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub type_signature: Value,
}

/// The `error` of a failed query.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryError {
    pub message: String,
    pub error_code: u32,
    pub error_name: &'static str,
    pub error_type: &'static str,
    pub failure_info: Value,
}

/// The Trino error codes this server gives (Trino's `StandardErrorCode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    GenericUserError,
    SyntaxError,
    AbandonedQuery,
    UserCanceled,
    NotFound,
    FunctionNotFound,
    DivisionByZero,
    InvalidCastArgument,
    NotSupported,
    CatalogNotFound,
    SchemaNotFound,
    TableNotFound,
    ColumnNotFound,
    TypeMismatch,
    GenericInternalError,
    ServerShuttingDown,
    ServerStartingUp,
    ExceededMemoryLimit,
    QueryQueueFull,
    ExceededTimeLimit,
}

impl ErrorCode {
    pub fn code(self) -> u32 {
        match self {
            Self::GenericUserError => 0,
            Self::SyntaxError => 1,
            Self::AbandonedQuery => 2,
            Self::UserCanceled => 3,
            Self::NotFound => 5,
            Self::FunctionNotFound => 6,
            Self::DivisionByZero => 8,
            Self::InvalidCastArgument => 9,
            Self::NotSupported => 13,
            Self::CatalogNotFound => 44,
            Self::SchemaNotFound => 45,
            Self::TableNotFound => 46,
            Self::ColumnNotFound => 47,
            Self::TypeMismatch => 58,
            Self::GenericInternalError => 65536,
            Self::ServerShuttingDown => 65545,
            Self::ServerStartingUp => 65548,
            Self::ExceededMemoryLimit => 131079,
            Self::QueryQueueFull => 131074,
            Self::ExceededTimeLimit => 131075,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::GenericUserError => "GENERIC_USER_ERROR",
            Self::SyntaxError => "SYNTAX_ERROR",
            Self::AbandonedQuery => "ABANDONED_QUERY",
            Self::UserCanceled => "USER_CANCELED",
            Self::NotFound => "NOT_FOUND",
            Self::FunctionNotFound => "FUNCTION_NOT_FOUND",
            Self::DivisionByZero => "DIVISION_BY_ZERO",
            Self::InvalidCastArgument => "INVALID_CAST_ARGUMENT",
            Self::NotSupported => "NOT_SUPPORTED",
            Self::CatalogNotFound => "CATALOG_NOT_FOUND",
            Self::SchemaNotFound => "SCHEMA_NOT_FOUND",
            Self::TableNotFound => "TABLE_NOT_FOUND",
            Self::ColumnNotFound => "COLUMN_NOT_FOUND",
            Self::TypeMismatch => "TYPE_MISMATCH",
            Self::GenericInternalError => "GENERIC_INTERNAL_ERROR",
            Self::ServerShuttingDown => "SERVER_SHUTTING_DOWN",
            Self::ServerStartingUp => "SERVER_STARTING_UP",
            Self::ExceededMemoryLimit => "EXCEEDED_LOCAL_MEMORY_LIMIT",
            Self::QueryQueueFull => "QUERY_QUEUE_FULL",
            Self::ExceededTimeLimit => "EXCEEDED_TIME_LIMIT",
        }
    }

    /// `USER_ERROR`, `INTERNAL_ERROR` or `INSUFFICIENT_RESOURCES`, from the code's range.
    pub fn error_type(self) -> &'static str {
        match self.code() {
            0..65536 => "USER_ERROR",
            65536..131072 => "INTERNAL_ERROR",
            _ => "INSUFFICIENT_RESOURCES",
        }
    }
}

/// A failure of a query, with the Trino code a client can act on.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn to_error(&self) -> QueryError {
        QueryError {
            message: self.message.clone(),
            error_code: self.code.code(),
            error_name: self.code.name(),
            error_type: self.code.error_type(),
            failure_info: json!({
                "type": "io.trino.spi.TrinoException",
                "message": self.message,
                "suppressed": [],
                "stack": [],
            }),
        }
    }
}

/// The Trino type of an Arrow field: its name and type signature. Types Trino has no
/// counterpart for are sent as `varchar`, in Arrow's display form.
pub fn trino_type(data_type: &DataType) -> (String, Value) {
    let simple = |name: &str| (name.to_owned(), json!({ "rawType": name, "arguments": [] }));
    let long_argument =
        |raw: &str, value: i64| json!({ "rawType": raw, "arguments": [{ "kind": "LONG", "value": value }] });
    match data_type {
        DataType::Boolean => simple("boolean"),
        DataType::Int8 => simple("tinyint"),
        DataType::Int16 | DataType::UInt8 => simple("smallint"),
        DataType::Int32 | DataType::UInt16 => simple("integer"),
        DataType::Int64 | DataType::UInt32 => simple("bigint"),
        DataType::Float32 => simple("real"),
        DataType::Float64 => simple("double"),
        DataType::Date32 | DataType::Date64 => simple("date"),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => {
            simple("varbinary")
        }
        DataType::Null => simple("unknown"),
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => (
            format!("decimal({p},{s})"),
            json!({ "rawType": "decimal", "arguments": [
                { "kind": "LONG", "value": p }, { "kind": "LONG", "value": s }
            ] }),
        ),
        DataType::Timestamp(unit, zone) => {
            let precision = precision(unit);
            match zone {
                Some(_) => (
                    format!("timestamp({precision}) with time zone"),
                    long_argument("timestamp with time zone", precision),
                ),
                None => (format!("timestamp({precision})"), long_argument("timestamp", precision)),
            }
        }
        DataType::Map(entries, _) => {
            let (key, value) = map_fields(entries);
            let (key_name, key_signature) = trino_type(key.data_type());
            let (value_name, value_signature) = trino_type(value.data_type());
            (
                format!("map({key_name}, {value_name})"),
                json!({ "rawType": "map", "arguments": [
                    { "kind": "TYPE", "value": key_signature },
                    { "kind": "TYPE", "value": value_signature },
                ] }),
            )
        }
        DataType::Struct(fields) => {
            let typed: Vec<_> = fields.iter().map(|f| (f.name(), trino_type(f.data_type()))).collect();
            (
                format!(
                    "row({})",
                    typed
                        .iter()
                        .map(|(name, (type_name, _))| format!("{name} {type_name}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                json!({ "rawType": "row", "arguments": typed.iter().map(|(name, (_, signature))| json!({
                    "kind": "NAMED_TYPE",
                    "value": { "fieldName": { "name": name }, "typeSignature": signature },
                })).collect::<Vec<_>>() }),
            )
        }
        DataType::List(item) | DataType::LargeList(item) => {
            let (name, signature) = trino_type(item.data_type());
            (
                format!("array({name})"),
                json!({ "rawType": "array", "arguments": [{ "kind": "TYPE", "value": signature }] }),
            )
        }
        // Strings, and what Trino has no counterpart for (sent in Arrow's display form): Trino's
        // unbounded varchar, whose signature carries its length limit.
        _ => ("varchar".to_owned(), long_argument("varchar", i64::from(i32::MAX))),
    }
}

fn precision(unit: &TimeUnit) -> i64 {
    match unit {
        TimeUnit::Second => 0,
        TimeUnit::Millisecond => 3,
        TimeUnit::Microsecond => 6,
        TimeUnit::Nanosecond => 9,
    }
}

fn map_fields(entries: &Field) -> (Field, Field) {
    match entries.data_type() {
        DataType::Struct(fields) if fields.len() == 2 => (fields[0].as_ref().clone(), fields[1].as_ref().clone()),
        _ => (
            Field::new("key", DataType::Utf8, false),
            Field::new("value", DataType::Utf8, true),
        ),
    }
}

/// The columns of a result.
pub fn columns(schema: &arrow_schema::Schema) -> Vec<Column> {
    schema
        .fields()
        .iter()
        .map(|field| {
            let (type_name, type_signature) = trino_type(field.data_type());
            Column {
                name: field.name().clone(),
                type_name,
                type_signature,
            }
        })
        .collect()
}

/// The rows of `batch` as Trino's `data` encodes them.
pub fn rows(batch: &RecordBatch) -> Vec<Vec<Value>> {
    let mut columns: Vec<std::vec::IntoIter<Value>> = batch
        .columns()
        .iter()
        .map(|column| values(column.as_ref()).into_iter())
        .collect();
    // Each column has a value per row: moved into the rows, not copied.
    (0..batch.num_rows())
        .map(|_| {
            columns
                .iter_mut()
                .map(|column| column.next().unwrap_or(Value::Null))
                .collect()
        })
        .collect()
}

/// One column's values. Doubles that JSON cannot hold go as Trino sends them: `"NaN"`,
/// `"Infinity"`, `"-Infinity"`.
fn values(array: &dyn Array) -> Vec<Value> {
    let len = array.len();
    let each = |f: &dyn Fn(usize) -> Value| -> Vec<Value> {
        (0..len)
            .map(|i| if array.is_null(i) { Value::Null } else { f(i) })
            .collect()
    };
    match array.data_type() {
        DataType::Boolean => each(&|i| json!(array.as_boolean().value(i))),
        DataType::Int8 => each(&|i| json!(array.as_primitive::<types::Int8Type>().value(i))),
        DataType::Int16 => each(&|i| json!(array.as_primitive::<types::Int16Type>().value(i))),
        DataType::Int32 => each(&|i| json!(array.as_primitive::<types::Int32Type>().value(i))),
        DataType::Int64 => each(&|i| json!(array.as_primitive::<types::Int64Type>().value(i))),
        DataType::UInt8 => each(&|i| json!(array.as_primitive::<types::UInt8Type>().value(i))),
        DataType::UInt16 => each(&|i| json!(array.as_primitive::<types::UInt16Type>().value(i))),
        DataType::UInt32 => each(&|i| json!(array.as_primitive::<types::UInt32Type>().value(i))),
        DataType::Float32 => each(&|i| double(f64::from(array.as_primitive::<types::Float32Type>().value(i)))),
        DataType::Float64 => each(&|i| double(array.as_primitive::<types::Float64Type>().value(i))),
        DataType::Utf8 => each(&|i| json!(array.as_string::<i32>().value(i))),
        DataType::LargeUtf8 => each(&|i| json!(array.as_string::<i64>().value(i))),
        DataType::Utf8View => each(&|i| json!(array.as_string_view().value(i))),
        DataType::Date32 => each(&|i| {
            let days = array.as_primitive::<types::Date32Type>().value(i);
            NaiveDate::from_num_days_from_ce_opt(days + 719_163).map_or(Value::Null, |d| json!(d.to_string()))
        }),
        DataType::Timestamp(unit, zone) => {
            let unit = *unit;
            let zoned = zone.is_some();
            each(&|i| {
                let raw = match unit {
                    TimeUnit::Second => array.as_primitive::<types::TimestampSecondType>().value(i),
                    TimeUnit::Millisecond => array.as_primitive::<types::TimestampMillisecondType>().value(i),
                    TimeUnit::Microsecond => array.as_primitive::<types::TimestampMicrosecondType>().value(i),
                    TimeUnit::Nanosecond => array.as_primitive::<types::TimestampNanosecondType>().value(i),
                };
                timestamp(raw, unit, zoned)
            })
        }
        DataType::Map(_, _) => {
            let map = array.as_map();
            each(&|i| {
                let entries = map.value(i);
                let keys = values(entries.column(0).as_ref());
                let items = values(entries.column(1).as_ref());
                let object: serde_json::Map<String, Value> = keys
                    .into_iter()
                    .zip(items)
                    .map(|(k, v)| (k.as_str().map_or_else(|| k.to_string(), str::to_owned), v))
                    .collect();
                Value::Object(object)
            })
        }
        DataType::Struct(_) => {
            let fields: Vec<Vec<Value>> = array.as_struct().columns().iter().map(|c| values(c.as_ref())).collect();
            each(&|i| Value::Array(fields.iter().map(|f| f[i].clone()).collect()))
        }
        _ => {
            let display = arrow_cast_display(array);
            each(&|i| json!(display[i]))
        }
    }
}

fn double(value: f64) -> Value {
    if value.is_nan() {
        json!("NaN")
    } else if value.is_infinite() {
        json!(if value > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        json!(value)
    }
}

/// `2026-01-08 14:00:00.000000 UTC` (with a zone) or `2026-01-08 14:00:00.000000`, with as
/// many fractional digits as the unit has. Zoned values are shown in UTC, the session zone.
fn timestamp(raw: i64, unit: TimeUnit, zoned: bool) -> Value {
    let (seconds, nanos) = match unit {
        TimeUnit::Second => (raw, 0),
        TimeUnit::Millisecond => (raw.div_euclid(1_000), raw.rem_euclid(1_000) * 1_000_000),
        TimeUnit::Microsecond => (raw.div_euclid(1_000_000), raw.rem_euclid(1_000_000) * 1_000),
        TimeUnit::Nanosecond => (raw.div_euclid(1_000_000_000), raw.rem_euclid(1_000_000_000)),
    };
    let Some(time) = u32::try_from(nanos)
        .ok()
        .and_then(|n| DateTime::from_timestamp(seconds, n))
    else {
        return Value::Null;
    };
    let digits = precision(&unit) as usize;
    let mut text = time.format("%Y-%m-%d %H:%M:%S").to_string();
    if digits > 0 {
        let fraction = format!("{:09}", time.timestamp_subsec_nanos());
        text.push('.');
        text.push_str(&fraction[..digits]);
    }
    if zoned {
        text.push_str(" UTC");
    }
    Value::String(text)
}

/// Arrow's own display of values of types Trino has no counterpart for.
fn arrow_cast_display(array: &dyn Array) -> Vec<String> {
    use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
    match ArrayFormatter::try_new(array, &FormatOptions::default()) {
        Ok(formatter) => (0..array.len()).map(|i| formatter.value(i).to_string()).collect(),
        Err(_) => vec![String::new(); array.len()],
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Float64Array, StringArray, TimestampMicrosecondArray};
    use arrow_schema::Schema;

    use super::*;

    #[test]
    fn values_are_encoded_as_trino_encodes_them() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("city", DataType::Utf8, true),
            Field::new("temperature", DataType::Float64, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
                true,
            ),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec![Some("Zürich"), None])),
                Arc::new(Float64Array::from(vec![21.5, f64::NAN])),
                Arc::new(TimestampMicrosecondArray::from(vec![1_767_880_800_000_123, -1]).with_timezone("+00:00")),
            ],
        )
        .expect("batch");
        assert_eq!(
            rows(&batch),
            vec![
                vec![json!("Zürich"), json!(21.5), json!("2026-01-08 14:00:00.000123 UTC")],
                vec![Value::Null, json!("NaN"), json!("1969-12-31 23:59:59.999999 UTC")],
            ]
        );
        let columns = columns(&schema);
        assert_eq!(columns[0].type_name, "varchar");
        assert_eq!(columns[1].type_name, "double");
        assert_eq!(columns[2].type_name, "timestamp(6) with time zone");
        assert_eq!(
            columns[2].type_signature,
            json!({ "rawType": "timestamp with time zone", "arguments": [{ "kind": "LONG", "value": 6 }] })
        );
    }

    #[test]
    fn error_types_follow_the_code_ranges() {
        assert_eq!(ErrorCode::TableNotFound.code(), 46);
        assert_eq!(ErrorCode::TableNotFound.error_type(), "USER_ERROR");
        assert_eq!(ErrorCode::GenericInternalError.error_type(), "INTERNAL_ERROR");
        assert_eq!(ErrorCode::ExceededTimeLimit.error_type(), "INSUFFICIENT_RESOURCES");
    }
}
