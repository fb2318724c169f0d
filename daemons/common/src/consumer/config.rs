//! How a daemon configures its consumer: the flags the iceberg-sink and the window-aggregator
//! share, declared once.

use std::time::Duration;

use crate::kafka::{DEAD_LETTER_TOPIC, KafkaArgs, WEATHER_TOPIC};

/// The consumer's flags. Flattened into each consumer daemon's `Args`, which sets its own
/// defaults for `group_id`, `commit_interval` and `max_records` with clap's `mut_arg` (a sink
/// commits files, an aggregator rows: their good batch sizes differ by orders of magnitude).
/// Those three are declared `required = false` here because the default comes from there.
#[derive(clap::Args, Debug, Clone)]
pub struct ConsumerArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Topic to consume.
    #[arg(long, env = "KAFKA_TOPIC", default_value = WEATHER_TOPIC)]
    pub topic: String,

    /// Consumer group: its instances share the topic's partitions. Its offsets are committed
    /// for lag monitoring only; the store holds the offsets that count.
    #[arg(long, env = "KAFKA_GROUP_ID", required = false)]
    pub group_id: String,

    /// Topic for records that are not valid readings.
    #[arg(long, env = "DEAD_LETTER_TOPIC", default_value = DEAD_LETTER_TOPIC)]
    pub dead_letter_topic: String,

    /// Longest time between a record being read and its commit.
    #[arg(long, env = "COMMIT_INTERVAL", required = false, value_parser = humantime::parse_duration)]
    pub commit_interval: Duration,

    /// Records after which a commit happens before the interval is up.
    #[arg(long, env = "MAX_RECORDS", required = false)]
    pub max_records: usize,

    /// Largest amount a reading's `ts` may lie ahead of its record's Kafka timestamp; later
    /// ones are dead letters (a clock far in the future would otherwise close every window).
    #[arg(long, env = "MAX_CLOCK_SKEW", default_value = "1m", value_parser = humantime::parse_duration)]
    pub max_clock_skew: Duration,
}

/// How [`run`](super::run()) consumes.
#[derive(Debug, Clone)]
pub struct Config {
    /// The daemon's name: the `source` header of its dead letters.
    pub name: &'static str,
    pub args: ConsumerArgs,
}
