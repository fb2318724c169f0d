//! Trino's REST view of queries, `GET /v1/query` and `GET /v1/query/{id}`: the fields of
//! Trino's `BasicQueryInfo` and `QueryInfo` (with `SessionRepresentation`, `BasicQueryStats`,
//! `QueryStats` and `ErrorCode` inside) that exist here, named and encoded as Trino does
//! (durations and sizes as airlift writes them, `"1.50s"`, `"123B"`; times in ISO 8601), so
//! that tools polling Trino's API read them.

use std::time::Duration;

use serde_json::{Value, json};

use crate::{history::Record, protocol::State};

/// What stands in for the text of a query the asker may not see.
pub const HIDDEN: &str = "-- hidden: the server shows other clients' SQL on loopback only (--ui-remote-sql)";

/// `BasicQueryInfo` of `record`; `self` on `base_url`.
pub fn basic(record: &Record, base_url: &str, show_sql: bool) -> Value {
    json!({
        "queryId": record.id,
        "session": session(record),
        "resourceGroupId": ["global"],
        "state": state(record.state),
        "scheduled": record.planning.is_some(),
        "self": format!("{base_url}/v1/query/{}", record.id),
        "query": if show_sql { record.sql.as_str() } else { HIDDEN },
        "queryStats": stats(record, false),
        "errorType": record.failure.as_ref().map(|f| f.code.error_type()),
        "errorCode": error_code(record),
        "queryType": "SELECT",
        "retryPolicy": "NONE",
    })
}

/// `QueryInfo` of `record`: `BasicQueryInfo`'s fields, the fuller stats, the result's field
/// names and the failure.
pub fn full(record: &Record, base_url: &str, show_sql: bool) -> Value {
    let mut info = basic(record, base_url, show_sql);
    if let Value::Object(fields) = &mut info {
        fields.insert("queryStats".into(), stats(record, true));
        fields.insert("fieldNames".into(), json!(record.columns));
        fields.insert("finalQueryInfo".into(), json!(record.ended.is_some()));
        fields.insert("warnings".into(), json!([]));
        fields.insert(
            "failureInfo".into(),
            record.failure.as_ref().map_or(Value::Null, |f| {
                json!({ "type": "io.trino.spi.TrinoException", "message": f.message, "suppressed": [], "stack": [] })
            }),
        );
    }
    info
}

fn session(record: &Record) -> Value {
    json!({
        "queryId": record.id,
        "user": record.user,
        "source": record.source,
        "catalog": record.catalog,
        "schema": record.schema,
        "start": record.created.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
}

fn stats(record: &Record, full: bool) -> Value {
    let elapsed = record.elapsed();
    let mut stats = json!({
        "createTime": record.created.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "endTime": record.ended_at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        "queuedTime": duration(Duration::ZERO),
        "elapsedTime": duration(elapsed),
        "executionTime": duration(elapsed),
        "totalDrivers": 1,
        "queuedDrivers": 0,
        "runningDrivers": u32::from(record.ended.is_none() && record.planning.is_some()),
        "completedDrivers": u32::from(record.ended.is_some()),
        "rawInputDataSize": size(record.bytes_scanned),
        "rawInputPositions": record.rows_scanned,
        "physicalInputDataSize": size(record.bytes_scanned),
        "totalCpuTime": duration(elapsed),
        "totalScheduledTime": duration(elapsed),
        "fullyBlocked": false,
        "blockedReasons": [],
        "progressPercentage": if record.ended.is_some() { Value::from(100.0) } else { Value::Null },
    });
    if full && let Value::Object(fields) = &mut stats {
        let planning = record.planning.unwrap_or(elapsed);
        fields.insert("planningTime".into(), json!(duration(planning)));
        fields.insert("outputPositions".into(), json!(record.rows));
        fields.insert("processedInputPositions".into(), json!(record.rows_scanned));
    }
    stats
}

fn error_code(record: &Record) -> Value {
    record.failure.as_ref().map_or(
        Value::Null,
        |f| json!({ "code": f.code.code(), "name": f.code.name(), "type": f.code.error_type() }),
    )
}

/// Trino's query states that exist here.
pub fn state(state: State) -> &'static str {
    match state {
        State::Queued => "QUEUED",
        State::Running => "RUNNING",
        State::Finished => "FINISHED",
        State::Failed => "FAILED",
    }
}

/// A duration as airlift's `Duration` writes it in JSON: two decimals and the largest unit in
/// which the value is at least 1.
pub fn duration(d: Duration) -> String {
    let nanos = d.as_nanos() as f64;
    for (unit, size) in [
        ("d", 86_400e9),
        ("h", 3_600e9),
        ("m", 60e9),
        ("s", 1e9),
        ("ms", 1e6),
        ("us", 1e3),
    ] {
        if nanos >= size {
            return format!("{:.2}{unit}", nanos / size);
        }
    }
    format!("{nanos:.2}ns")
}

/// A size as airlift's `DataSize` writes it in JSON.
pub fn size(bytes: u64) -> String {
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_as_airlift_writes_them() {
        assert_eq!(duration(Duration::from_millis(1500)), "1.50s");
        assert_eq!(duration(Duration::from_micros(2500)), "2.50ms");
        assert_eq!(duration(Duration::from_secs(90)), "1.50m");
        assert_eq!(duration(Duration::ZERO), "0.00ns");
    }
}
