//! The metrics every consumer has.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::http::PartitionLabel;

use super::store::Checkpoints;

/// Names of the per-partition consumer metrics, after the daemon's [`prefix`]: what `pipeline`
/// reads of its consumers.
pub const LAG_RECORDS: &str = "lag_records";
pub const READ_OFFSET: &str = "read_offset";
pub const PARTITION_OWNED: &str = "partition_owned";
pub const OWNER_EPOCH: &str = "owner_epoch";

/// The prefix of a daemon's metric names: its name, `-` written `_`.
pub fn prefix(daemon: &str) -> String {
    daemon.replace('-', "_")
}

/// Metrics every consumer has, registered in the daemon's registry (so under its prefix).
pub struct Metrics {
    pub records_read: Counter,
    pub dead_letters: Counter,
    pub commits: Counter,
    pub commit_duration: Histogram,
    pub lag: Family<PartitionLabel, Gauge>,
    pub read_offset: Family<PartitionLabel, Gauge>,
    pub committed_offset: Family<PartitionLabel, Gauge>,
    pub owned: Family<PartitionLabel, Gauge>,
    pub owner_epoch: Family<PartitionLabel, Gauge>,
    pub recoveries: Counter,
    pub new_logs: Counter,
    pub rebalances: Counter,
    pub fenced: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            records_read: Counter::default(),
            dead_letters: Counter::default(),
            commits: Counter::default(),
            commit_duration: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            lag: Family::default(),
            read_offset: Family::default(),
            committed_offset: Family::default(),
            owned: Family::default(),
            owner_epoch: Family::default(),
            recoveries: Counter::default(),
            new_logs: Counter::default(),
            rebalances: Counter::default(),
            fenced: Counter::default(),
        };
        for (name, help, metric) in [
            (
                "records_read",
                "Kafka records read, valid or not",
                &metrics.records_read,
            ),
            (
                "dead_letters",
                "Records sent to the dead-letter topic",
                &metrics.dead_letters,
            ),
            ("commits", "Commits of data with its Kafka offsets", &metrics.commits),
            (
                "recoveries",
                "Resumptions from the last commit after a failure",
                &metrics.recoveries,
            ),
            (
                "new_logs",
                "Partitions found to hold another log than the stored offsets' and read from their beginning",
                &metrics.new_logs,
            ),
            (
                "rebalances",
                "Partition assignments and revocations received from the consumer group",
                &metrics.rebalances,
            ),
            (
                "fenced_partitions",
                "Partitions whose commit was refused because another instance had taken them over",
                &metrics.fenced,
            ),
        ] {
            registry.register(name, help, metric.clone());
        }
        registry.register(
            "commit_duration_seconds",
            "Time of one commit",
            metrics.commit_duration.clone(),
        );
        for (name, help, metric) in [
            (LAG_RECORDS, "Records in the partition not read yet", &metrics.lag),
            (
                READ_OFFSET,
                "Next Kafka offset per partition after what was read (committed or not)",
                &metrics.read_offset,
            ),
            (
                "committed_offset",
                "Next Kafka offset per partition that the store holds everything before",
                &metrics.committed_offset,
            ),
            (
                PARTITION_OWNED,
                "1 for each partition this instance owns (assigned by the group and claimed in the store)",
                &metrics.owned,
            ),
            (
                OWNER_EPOCH,
                "Owner epoch of each partition this instance owns (raised by every claim)",
                &metrics.owner_epoch,
            ),
        ] {
            registry.register(name, help, metric.clone());
        }
        metrics
    }

    /// Sets `family` to each checkpoint's next offset.
    pub(super) fn show(family: &Family<PartitionLabel, Gauge>, checkpoints: &Checkpoints) {
        Self::show_offsets(family, checkpoints.iter().map(|(&p, c)| (p, c.next_offset)));
    }

    /// Sets `family` to each `(partition, offset)`.
    pub(super) fn show_offsets(family: &Family<PartitionLabel, Gauge>, offsets: impl IntoIterator<Item = (i32, i64)>) {
        for (partition, offset) in offsets {
            family.get_or_create(&PartitionLabel { partition }).set(offset);
        }
    }

    /// Drops the per-partition series of partitions this instance no longer owns.
    pub(super) fn forget(&self, partitions: &[i32]) {
        for &partition in partitions {
            let label = PartitionLabel { partition };
            for family in [
                &self.lag,
                &self.read_offset,
                &self.committed_offset,
                &self.owned,
                &self.owner_epoch,
            ] {
                family.remove(&label);
            }
        }
    }
}
