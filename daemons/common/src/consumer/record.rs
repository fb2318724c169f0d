//! What a record is: its identity (which log an offset belongs to) and the reading it carries.

use std::time::Duration;

use rdkafka::Message;

use crate::WeatherReading;

/// Identity of one record: its offset, timestamp, key and value, hashed (FNV-1a, 64 bits).
/// Two logs that both have a record at some offset almost never have the same one there.
pub fn record_id<M: Message>(message: &M) -> String {
    format_record_id(message.offset(), record_hash(message))
}

pub(super) fn record_hash<M: Message>(message: &M) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash = (hash ^ u64::from(b)).wrapping_mul(PRIME);
        }
    };
    feed(&message.offset().to_le_bytes());
    feed(&message.timestamp().to_millis().unwrap_or(-1).to_le_bytes());
    feed(&(message.key().map_or(-1, |k| k.len() as i64)).to_le_bytes());
    feed(message.key().unwrap_or_default());
    feed(message.payload().unwrap_or_default());
    hash
}

pub(super) fn format_record_id(offset: i64, hash: u64) -> String {
    format!("{offset}:{hash:016x}")
}

/// The reading a record carries, or why it is a dead letter.
pub fn reading_of<M: Message>(message: &M, max_clock_skew: Duration) -> Result<WeatherReading, String> {
    let reading = match message.payload() {
        Some(payload) => WeatherReading::from_json(payload).map_err(|e| e.to_string())?,
        None => return Err("empty record value".to_owned()),
    };
    // Judged against the record's own timestamp, not the clock, so every consumer and every
    // replay decides alike.
    if let Some(stamped) = message
        .timestamp()
        .to_millis()
        .and_then(chrono::DateTime::from_timestamp_millis)
    {
        let skew = chrono::TimeDelta::from_std(max_clock_skew).unwrap_or(chrono::TimeDelta::MAX);
        if reading.ts > stamped + skew {
            return Err(format!(
                "ts {} is more than {} ahead of the record's Kafka timestamp {}",
                crate::reading::format_ts(&reading.ts),
                humantime::format_duration(max_clock_skew),
                crate::reading::format_ts(&stamped),
            ));
        }
    }
    Ok(reading)
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{OwnedMessage, Timestamp};

    use super::*;

    fn record(offset: i64, ts_millis: i64, payload: &str) -> OwnedMessage {
        OwnedMessage::new(
            Some(payload.as_bytes().to_vec()),
            Some(b"Boston".to_vec()),
            "weather".into(),
            Timestamp::CreateTime(ts_millis),
            0,
            offset,
            None,
        )
    }

    const STAMP: i64 = 1_800_000_000_000;

    #[test]
    fn record_ids_tell_records_apart() {
        let a = record(
            7,
            STAMP,
            r#"{"city":"Boston","temperature":1.0,"ts":"2027-01-15T08:00:00.000Z"}"#,
        );
        let b = record(
            7,
            STAMP,
            r#"{"city":"Boston","temperature":2.0,"ts":"2027-01-15T08:00:00.000Z"}"#,
        );
        let c = record(
            7,
            STAMP + 1,
            r#"{"city":"Boston","temperature":1.0,"ts":"2027-01-15T08:00:00.000Z"}"#,
        );
        assert_eq!(record_id(&a), record_id(&a.clone()));
        assert!(record_id(&a).starts_with("7:"));
        assert_ne!(record_id(&a), record_id(&b));
        assert_ne!(record_id(&a), record_id(&c));
    }

    #[test]
    fn readings_far_ahead_of_their_record_are_refused() {
        let skew = Duration::from_secs(60);
        let stamped_at = |ts: &str| {
            let payload = format!(r#"{{"city":"Boston","temperature":1.0,"ts":"{ts}"}}"#);
            reading_of(&record(0, STAMP, &payload), skew)
        };
        // 2027-01-15T08:00:00Z is STAMP; 59 s ahead passes, 61 s ahead does not.
        assert!(stamped_at("2027-01-15T08:00:59.000Z").is_ok());
        let reason = stamped_at("2027-01-15T08:01:01.000Z").expect_err("ahead");
        assert!(reason.contains("more than 1m ahead"), "{reason}");
        assert!(stamped_at("2099-01-01T00:00:00.000Z").is_err());
        // Readings from the past are the windows' business (lateness), not a clock error.
        assert!(stamped_at("2020-01-01T00:00:00.000Z").is_ok());
        let bad = record(0, STAMP, r#"{"city":"Boston"}"#);
        assert!(reading_of(&bad, skew).expect_err("bad").contains("temperature"));
    }
}
