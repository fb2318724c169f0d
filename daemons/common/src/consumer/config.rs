//! How a daemon configures its consumer.

use std::time::Duration;

use crate::kafka::KafkaArgs;

/// How [`run`](super::run()) consumes.
#[derive(Debug, Clone)]
pub struct Config {
    /// The daemon's name: the `source` header of its dead letters.
    pub name: &'static str,
    pub kafka: KafkaArgs,
    pub topic: String,
    /// Consumer group: its instances share the topic's partitions. Its offsets are committed
    /// for lag monitoring only.
    pub group_id: String,
    pub dead_letter_topic: String,
    /// Longest time between a record being read and its commit.
    pub commit_interval: Duration,
    /// Records after which a commit happens before the interval is up.
    pub max_records: usize,
    /// Largest amount a reading's `ts` may lie ahead of its record's Kafka timestamp; later
    /// ones are dead letters (a clock far in the future would otherwise close every window).
    pub max_clock_skew: Duration,
}
