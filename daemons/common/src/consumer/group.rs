//! Membership of the consumer group: the client and its settings, the rebalance callback
//! queueing what the group said for the worker, and the offsets committed for monitoring.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use rdkafka::{
    ClientContext, Offset, TopicPartitionList,
    config::RDKafkaLogLevel,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer},
    error::RDKafkaErrorCode,
    statistics::Statistics,
    types::RDKafkaRespErr,
};

use crate::kafka::KafkaArgs;

use super::store::Checkpoints;

/// What the group told this instance, queued by the rebalance callback for the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Rebalanced {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// The consumer's context: the group's rebalances, as the worker is to act on them.
///
/// Assigned partitions are taken at a placeholder offset and paused at once: an explicit offset
/// starts no lookup of the group's offsets (whose answer could land after the worker's seek),
/// and a paused partition fetches nothing. The worker claims them in its store, seeks each to
/// its checkpoint and resumes it. Revoked partitions are given up at once, as the group
/// protocol wants; the worker commits what it read of them next, and the store's fencing
/// refuses that commit if the new owner has already claimed them.
pub struct GroupContext {
    topic: String,
    events: std::sync::Mutex<Vec<Rebalanced>>,
    pub(super) notify: tokio::sync::Notify,
    /// Each partition's high watermark as the last fetch response reported it (librdkafka's
    /// statistics), for the lag metric: measured without asking the broker anything.
    high_watermarks: std::sync::Mutex<BTreeMap<i32, i64>>,
}

impl GroupContext {
    fn push(&self, event: Rebalanced) {
        if let Ok(mut events) = self.events.lock() {
            events.push(event);
        }
        self.notify.notify_one();
    }

    pub(super) fn take(&self) -> Vec<Rebalanced> {
        self.events
            .lock()
            .map(|mut e| std::mem::take(&mut *e))
            .unwrap_or_default()
    }

    pub(super) fn high_watermark(&self, partition: i32) -> Option<i64> {
        self.high_watermarks.lock().ok()?.get(&partition).copied()
    }
}

impl ClientContext for GroupContext {
    /// librdkafka's log, as rdkafka's default passes it on, except failed group offset commits:
    /// they are for lag monitoring only (the store holds the offsets that count), and fail
    /// routinely while the group rebalances.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        use RDKafkaLogLevel::*;
        match level {
            _ if fac == "COMMITFAIL" => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
            Emerg | Alert | Critical | Error => tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}"),
            Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}"),
            Notice | Info => tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}"),
            Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
        }
    }

    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        if let Ok(mut known) = self.high_watermarks.lock() {
            // -1: no fetch response for the partition yet; partition -1 is librdkafka's own.
            known.extend(
                topic
                    .partitions
                    .iter()
                    .filter(|(partition, p)| **partition >= 0 && p.hi_offset >= 0)
                    .map(|(partition, p)| (*partition, p.hi_offset)),
            );
        }
    }
}

impl ConsumerContext for GroupContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let done = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut list = TopicPartitionList::new();
                for element in tpl.elements() {
                    if let Err(e) = list.add_partition_offset(element.topic(), element.partition(), Offset::Offset(0)) {
                        tracing::error!(error = %e, "cannot list an assigned partition");
                    }
                }
                let assigned = if cooperative {
                    consumer.incremental_assign(&list)
                } else {
                    consumer.assign(&list)
                };
                assigned
                    .and_then(|()| consumer.pause(&list))
                    .map(|()| Rebalanced::Assigned(partitions))
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let unassigned = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                unassigned.map(|()| Rebalanced::Revoked(partitions))
            }
            other => {
                tracing::warn!(error = %RDKafkaErrorCode::from(other), "consumer group rebalance failed");
                return;
            }
        };
        match done {
            Ok(event) => self.push(event),
            Err(e) => tracing::error!(error = %e, "could not apply the group's assignment"),
        }
    }
}

/// The consumer [`run`](super::run()) reads with.
pub type GroupConsumer = StreamConsumer<GroupContext>;

/// The time the group takes to notice a member gone (librdkafka's default, 45 s, would leave a
/// killed instance's readings waiting that long).
pub(super) const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the lag metric is brought up to date, and librdkafka reports the high watermarks it
/// is computed from.
pub(super) const LAG_INTERVAL: Duration = Duration::from_secs(5);

pub(super) fn partition_list(topic: &str, partitions: &[i32]) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for &partition in partitions {
        list.add_partition(topic, partition);
    }
    list
}

pub(super) fn pause<C: Consumer<X>, X: ConsumerContext>(consumer: &C, topic: &str, partitions: &[i32]) {
    if let Err(e) = consumer.pause(&partition_list(topic, partitions)) {
        tracing::debug!(error = %e, "could not pause partitions");
    }
}

/// Commits `checkpoints` to the consumer group, for lag monitoring only: the store holds the
/// position that counts.
pub(super) fn commit_for_monitoring<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    topic: &str,
    checkpoints: &Checkpoints,
) {
    let mut list = TopicPartitionList::new();
    for (&partition, checkpoint) in checkpoints {
        if list
            .add_partition_offset(topic, partition, Offset::Offset(checkpoint.next_offset))
            .is_err()
        {
            return;
        }
    }
    if list.count() > 0 {
        if let Err(e) = consumer.commit(&list, CommitMode::Async) {
            tracing::debug!(error = %e, "group offset commit failed");
        }
    }
}

impl KafkaArgs {
    /// A member of `group_id` for stores that keep their own offsets: no auto-commit, no offset
    /// store, cooperative-sticky assignment, and the beginning of a partition when they have no
    /// offset for it yet. A member that stops heartbeating loses its partitions after
    /// `SESSION_TIMEOUT` (10 s).
    pub fn group_consumer(&self, group_id: &str, topic: &str) -> anyhow::Result<Arc<GroupConsumer>> {
        let context = GroupContext {
            topic: topic.to_owned(),
            events: std::sync::Mutex::default(),
            notify: tokio::sync::Notify::new(),
            high_watermarks: std::sync::Mutex::default(),
        };
        let consumer = self
            .client_config_with(&[
                ("session.timeout.ms", &SESSION_TIMEOUT.as_millis().to_string()),
                ("heartbeat.interval.ms", "1000"),
                ("statistics.interval.ms", &LAG_INTERVAL.as_millis().to_string()),
            ])
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .create_with_context(context)?;
        Ok(Arc::new(consumer))
    }
}
