//! The exactly-once consumer that the iceberg-sink and the window-aggregator are built on.
//!
//! A [`Store`] keeps, in the same atomic commit as its data, a [`Checkpoint`] per Kafka
//! partition: the next offset to read and the identity of the record before it. This module
//! does everything else the same way for both: it waits for the broker and the topic, opens
//! the store, checks that the stored offsets belong to the log it is about to read (a broker
//! that lost its log, or a topic deleted and created again, starts its offsets from 0 again),
//! positions the consumer exactly there, validates records (bad ones go to the dead-letter
//! topic), decides when to commit, and on any failure backs off, reopens the store and
//! resumes from its last commit.
//!
//! Several instances share the work: they join one consumer group, which assigns each
//! partition to one of them and moves partitions when instances come and go. The store fences
//! partitions ([`Store::claim`]): an instance that lost a partition without noticing (paused,
//! cut off) cannot commit it any more, so each record is stored exactly once whoever reads it.
//! The group is trusted as the Kafka protocol defines it: a partition fenced here stays held
//! back until the group revokes it or assigns it here again ([`Assignment::hold`]).

use anyhow::Context as _;
use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use rdkafka::{
    ClientContext, Message, Offset, TopicPartitionList,
    config::RDKafkaLogLevel,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer},
    error::RDKafkaErrorCode,
    message::BorrowedMessage,
    statistics::Statistics,
    types::RDKafkaRespErr,
};
use tokio_util::sync::CancellationToken;

use crate::{
    WeatherReading,
    dead_letters::DeadLetters,
    http::PartitionLabel,
    kafka::{KafkaArgs, partition_count},
    runtime::{self, Backoff},
};

/// Where a partition's reading stands, as committed with the data it accounts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The next offset to read.
    pub next_offset: i64,
    /// [`record_id`] of the record at `next_offset - 1`: which log the offset belongs to.
    /// `None` before any record was read, and in state written by older versions.
    pub last_record: Option<String>,
    /// Offset of the dead-letter topic from which the letters of records at or past
    /// `next_offset` can be (see [`crate::dead_letters`]); `None` when unknown.
    pub dead_letters_from: Option<i64>,
}

impl Checkpoint {
    /// The beginning of a partition.
    pub fn start(offset: i64) -> Self {
        Self {
            next_offset: offset,
            last_record: None,
            dead_letters_from: None,
        }
    }
}

/// Checkpoints by partition.
pub type Checkpoints = BTreeMap<i32, Checkpoint>;

/// Owner epoch by partition: raised by each claim of the partition (see [`Store::claim`]).
pub type Epochs = BTreeMap<i32, i64>;

/// What a store holds of the partitions it claimed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claim {
    /// Their committed checkpoints (none for a partition never committed).
    pub checkpoints: Checkpoints,
    /// The owner epochs the claim gave them: this instance's.
    pub epochs: Epochs,
}

/// Identity of one record: its offset, timestamp, key and value, hashed (FNV-1a, 64 bits).
/// Two logs that both have a record at some offset almost never have the same one there.
pub fn record_id<M: Message>(message: &M) -> String {
    format_record_id(message.offset(), record_hash(message))
}

fn record_hash<M: Message>(message: &M) -> u64 {
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

fn format_record_id(offset: i64, hash: u64) -> String {
    format!("{offset}:{hash:016x}")
}

/// What a daemon does with the readings; [`run`] does the rest.
///
/// Partitions are owned one instance at a time: the consumer group assigns them, and the store
/// fences each one when an instance takes it over ([`Store::claim`]), so that a commit by an
/// instance that lost the partition meanwhile (a "zombie") stores nothing ([`Fenced`]).
pub trait Store: Send {
    /// (Re)connects and drops whatever was applied but not committed, and every partition's
    /// state. Called at start and after every failure. `Ok(false)` on shutdown.
    fn open(&mut self, shutdown: &CancellationToken) -> impl Future<Output = anyhow::Result<bool>> + Send;

    /// Takes over `partitions`, which the group assigned to this instance: raises their owner
    /// epochs, which fences their previous owner out of the store, and loads their state.
    fn claim(&mut self, partitions: &[i32]) -> impl Future<Output = anyhow::Result<Claim>> + Send;

    /// Forgets `partitions`: handed to another instance after their last commit, or lost.
    fn release(&mut self, partitions: &[i32]);

    /// `partition`'s stored checkpoint belongs to another log: it is read again from `start`.
    fn restart_partition(&mut self, partition: i32, start: i64);

    /// One valid reading, at `offset` of `partition`.
    fn apply(&mut self, partition: i32, offset: i64, reading: WeatherReading);

    /// Periodic work between records; true when it made something worth committing.
    fn tick(&mut self) -> bool {
        false
    }

    /// Commits everything applied since the last commit together with `checkpoints` (those of
    /// the partitions this instance owns), in one atomic step, or nothing: fails with
    /// [`Fenced`] when another instance took over one of them. `Ok(false)`: there was nothing
    /// to commit and nothing was stored.
    fn commit(&mut self, checkpoints: &Checkpoints) -> impl Future<Output = anyhow::Result<bool>> + Send;
}

/// A commit refused because other instances took these partitions over: nothing was stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("partitions {partitions:?} were taken over by another instance")]
pub struct Fenced {
    pub partitions: Vec<i32>,
}

/// The store cannot say where its partitions stand, and any guess would lose or double
/// records: [`run`] stops with this error instead of resuming, for an operator to decide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Unresumable {
    pub reason: String,
}

/// How [`run`] consumes.
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
            ("lag_records", "Records in the partition not read yet", &metrics.lag),
            (
                "read_offset",
                "Next Kafka offset per partition after what was read (committed or not)",
                &metrics.read_offset,
            ),
            (
                "committed_offset",
                "Next Kafka offset per partition that the store holds everything before",
                &metrics.committed_offset,
            ),
            (
                "partition_owned",
                "1 for each partition this instance owns (assigned by the group and claimed in the store)",
                &metrics.owned,
            ),
            (
                "owner_epoch",
                "Owner epoch of each partition this instance owns (raised by every claim)",
                &metrics.owner_epoch,
            ),
        ] {
            registry.register(name, help, metric.clone());
        }
        metrics
    }

    fn show(family: &Family<PartitionLabel, Gauge>, checkpoints: &Checkpoints) {
        for (&partition, checkpoint) in checkpoints {
            family
                .get_or_create(&PartitionLabel { partition })
                .set(checkpoint.next_offset);
        }
    }

    /// Drops the per-partition series of partitions this instance no longer owns.
    fn forget(&self, partitions: &[i32]) {
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

/// What the group told this instance, queued by the rebalance callback for the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rebalanced {
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
    notify: tokio::sync::Notify,
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

    fn take(&self) -> Vec<Rebalanced> {
        self.events
            .lock()
            .map(|mut e| std::mem::take(&mut *e))
            .unwrap_or_default()
    }

    fn high_watermark(&self, partition: i32) -> Option<i64> {
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

/// The consumer [`run`] reads with.
pub type GroupConsumer = StreamConsumer<GroupContext>;

/// Consumes `config.topic` into `store` until `shutdown`, then commits what was read and
/// returns. Fails only if that last commit fails (what it held is read again next time).
///
/// The instance joins `config.group_id`; the group spreads the topic's partitions over its
/// instances (cooperative-sticky: a rebalance moves only the partitions that must move).
pub async fn run<S: Store>(
    config: &Config,
    store: &mut S,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let consumer = config.kafka.group_consumer(&config.group_id, &config.topic)?;
    let consumed = consume(config, &consumer, store, metrics, shutdown).await;
    close(consumer).await;
    consumed
}

/// Leaves the group and closes `consumer`, waiting at most [`SESSION_TIMEOUT`] (the group
/// forgets a silent member after that anyway): librdkafka's close waits for the broker's
/// answers, and a broker that went away with this instance (a `kill -9` of `pipeline` stops
/// both) may never give them. The close runs on a thread of its own, which exiting ends.
async fn close(consumer: Arc<GroupConsumer>) {
    let (closed, done) = tokio::sync::oneshot::channel();
    let closing = std::thread::Builder::new()
        .name("consumer-close".into())
        .spawn(move || {
            // The last reference closes it: lag and group checks in flight let go of theirs.
            let mut consumer = consumer;
            loop {
                match Arc::try_unwrap(consumer) {
                    Ok(last) => {
                        drop(last);
                        break;
                    }
                    Err(shared) => consumer = shared,
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = closed.send(());
        });
    let closed = match closing {
        Ok(_) => tokio::time::timeout(SESSION_TIMEOUT, done).await.is_ok(),
        Err(_) => false,
    };
    if !closed {
        tracing::warn!(
            "the Kafka consumer did not close within {SESSION_TIMEOUT:?} (the broker does not answer); exiting \
             without it"
        );
    }
}

/// [`run`] with its consumer.
async fn consume<S: Store>(
    config: &Config,
    consumer: &Arc<GroupConsumer>,
    store: &mut S,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let topics = [config.topic.as_str(), config.dead_letter_topic.as_str()];
    if wait_for_partitions(&config.kafka, consumer, &config.topic, &topics, shutdown)
        .await
        .is_none()
    {
        return Ok(());
    }
    let dead_letters = Arc::new(
        tokio::task::spawn_blocking({
            let (kafka, topic, name) = (config.kafka.clone(), config.dead_letter_topic.clone(), config.name);
            move || DeadLetters::new(&kafka, &topic, name)
        })
        .await??,
    );
    consumer.subscribe(&[config.topic.as_str()])?;
    let mut assigned = Assignment::default();
    let mut ready = false;
    let mut backoff = Backoff::default();
    loop {
        match store.open(shutdown).await {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "store unavailable");
                if backoff.wait(shutdown).await {
                    continue;
                }
                return Ok(());
            }
        }
        if !ready {
            ready = true;
            runtime::notify_ready();
            tracing::info!(group = %config.group_id, topic = %config.topic, "consuming the partitions the group assigns");
        }
        let mut worker = Worker {
            config,
            consumer,
            dead_letters: &dead_letters,
            metrics,
            assigned: &mut assigned,
            read: Checkpoints::new(),
            last_read: BTreeMap::new(),
            dead_lettered: BTreeMap::new(),
            committed: Checkpoints::new(),
            uncommitted: 0,
            first_uncommitted: None,
        };
        let consumed = worker.consume(store, shutdown).await;
        let owned: Vec<i32> = worker.read.keys().copied().collect();
        match consumed {
            Ok(()) => return Ok(()),
            Err(e) if shutdown.is_cancelled() => {
                return Err(e.context("the last commit failed; what it held is read again on the next start"));
            }
            Err(e) if e.chain().any(|c| c.is::<Unresumable>()) => {
                tracing::error!(error = %format!("{e:#}"), "stopping: resuming would lose or double records");
                return Err(e);
            }
            Err(e) => {
                store.release(&owned);
                metrics.forget(&owned);
                if let Some(fenced) = e.chain().find_map(|c| c.downcast_ref::<Fenced>()) {
                    // A zombie's view: the group moved these partitions while this instance was
                    // not looking. They are left to their owner until the group says so too
                    // (see `Assignment::hold`); the others resume from their last commit at once.
                    metrics.fenced.inc_by(fenced.partitions.len() as u64);
                    tracing::warn!(
                        partitions = ?fenced.partitions,
                        "another instance took these partitions over; what was read of them since the last commit \
                         is left to it"
                    );
                    assigned.hold(&fenced.partitions);
                    pause(consumer.as_ref(), &config.topic, &fenced.partitions);
                    continue;
                }
                metrics.recoveries.inc();
                tracing::warn!(error = %format!("{e:#}"), "resuming from the last commit");
                if !backoff.wait(shutdown).await {
                    return Ok(());
                }
            }
        }
    }
}

/// The time the group takes to notice a member gone (librdkafka's default, 45 s, would leave a
/// killed instance's readings waiting that long).
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the lag metric is brought up to date, and librdkafka reports the high watermarks it
/// is computed from.
const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// The partitions the group assigned to this instance, kept across recoveries, less those held
/// back after another instance took them over.
#[derive(Debug, Default)]
struct Assignment {
    assigned: BTreeSet<i32>,
    held: BTreeSet<i32>,
}

impl Assignment {
    fn assign(&mut self, partitions: &[i32]) {
        for partition in partitions {
            self.assigned.insert(*partition);
            self.held.remove(partition);
        }
    }

    fn revoke(&mut self, partitions: &[i32]) {
        for partition in partitions {
            self.assigned.remove(partition);
            self.held.remove(partition);
        }
    }

    fn contains(&self, partition: i32) -> bool {
        self.assigned.contains(&partition)
    }

    /// Applies the group's `events`, in order, and returns the partitions of `owned` to hand
    /// over: each one revoked, also when a later event assigned it again (the revocation took
    /// its fetch position; assigned again, it is claimed and positioned anew).
    fn apply(&mut self, events: Vec<Rebalanced>, owned: &Checkpoints) -> Vec<i32> {
        let mut revoked = BTreeSet::new();
        for event in events {
            match event {
                Rebalanced::Assigned(partitions) => {
                    tracing::info!(?partitions, "the group assigned partitions");
                    self.assign(&partitions);
                }
                Rebalanced::Revoked(partitions) => {
                    tracing::info!(?partitions, "the group revoked partitions");
                    self.revoke(&partitions);
                    revoked.extend(partitions);
                }
            }
        }
        owned
            .keys()
            .filter(|p| revoked.contains(p) || !self.contains(**p))
            .copied()
            .collect()
    }

    /// Leaves `partitions`, whose commit was fenced, to the instance that claimed them. That
    /// instance was assigned them in a later generation of the group, so the group revokes them
    /// here (or this instance finds its membership lost) next; should it assign them here again
    /// instead, they are claimed again.
    fn hold(&mut self, partitions: &[i32]) {
        for partition in partitions {
            if self.assigned.contains(partition) {
                self.held.insert(*partition);
            }
        }
    }

    /// The assigned partitions to claim: neither owned yet (`owned`) nor held.
    fn claimable(&self, owned: &Checkpoints) -> Vec<i32> {
        self.assigned
            .iter()
            .filter(|p| !owned.contains_key(p) && !self.held.contains(p))
            .copied()
            .collect()
    }
}

fn offsets(checkpoints: &Checkpoints) -> BTreeMap<i32, i64> {
    checkpoints.iter().map(|(p, c)| (*p, c.next_offset)).collect()
}

fn partition_list(topic: &str, partitions: &[i32]) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for &partition in partitions {
        list.add_partition(topic, partition);
    }
    list
}

fn pause<C: Consumer<X>, X: ConsumerContext>(consumer: &C, topic: &str, partitions: &[i32]) {
    if let Err(e) = consumer.pause(&partition_list(topic, partitions)) {
        tracing::debug!(error = %e, "could not pause partitions");
    }
}

struct Worker<'a> {
    config: &'a Config,
    consumer: &'a Arc<GroupConsumer>,
    dead_letters: &'a Arc<DeadLetters>,
    metrics: &'a Metrics,
    /// What the group assigned to this instance; the worker claims each of them and gives up
    /// the partitions it owns that are no longer in it.
    assigned: &'a mut Assignment,
    /// Position after what was read (applied to the store or dead-lettered) in each partition
    /// this instance owns; the identities of the last records are in `last_read` until the
    /// next commit.
    read: Checkpoints,
    /// `(offset, hash)` of the last record read per partition since the last commit: formatted
    /// into `read` only when committing, to keep the per-record path free of allocations.
    last_read: BTreeMap<i32, (i64, u64)>,
    /// Offsets past each partition's checkpoint whose dead letter was sent before the last
    /// crash or handover (see [`DeadLetters::sent_since`]): not sent again.
    dead_lettered: BTreeMap<i32, BTreeSet<i64>>,
    /// What the store holds.
    committed: Checkpoints,
    uncommitted: usize,
    first_uncommitted: Option<Instant>,
}

impl Worker<'_> {
    async fn consume<S: Store>(&mut self, store: &mut S, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.config.commit_interval.min(Duration::from_millis(250)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_lag_check = Instant::now();
        self.rebalance(store).await?;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    self.commit(store).await?;
                    tracing::info!(committed = ?offsets(&self.committed), "committed what was read");
                    return Ok(());
                }
                () = self.consumer.context().notify.notified() => self.rebalance(store).await?,
                message = self.consumer.recv() => {
                    let message = match message {
                        Ok(message) => message,
                        Err(e) => {
                            tracing::warn!(error = %e, "Kafka consumer error");
                            continue;
                        }
                    };
                    self.process(store, &message).await?;
                    if self.uncommitted >= self.config.max_records {
                        self.commit(store).await?;
                    }
                }
                _ = tick.tick() => {
                    if store.tick() {
                        self.first_uncommitted.get_or_insert_with(Instant::now);
                    }
                    if self.first_uncommitted.is_some_and(|t| t.elapsed() >= self.config.commit_interval) {
                        self.commit(store).await?;
                    }
                    Metrics::show(&self.metrics.read_offset, &self.read);
                    if last_lag_check.elapsed() > LAG_INTERVAL {
                        last_lag_check = Instant::now();
                        self.update_lag();
                    }
                }
            }
        }
    }

    /// Brings what this instance owns in line with what the group assigned: commits and gives
    /// up the partitions revoked, then claims, positions and resumes the ones assigned.
    async fn rebalance<S: Store>(&mut self, store: &mut S) -> anyhow::Result<()> {
        let events = self.consumer.context().take();
        self.metrics.rebalances.inc_by(events.len() as u64);
        let revoked = self.assigned.apply(events, &self.read);
        if !revoked.is_empty() {
            // What was read of them is stored before their next owner loads it.
            self.commit(store).await?;
            store.release(&revoked);
            for partition in &revoked {
                self.read.remove(partition);
                self.committed.remove(partition);
                self.last_read.remove(partition);
                self.dead_lettered.remove(partition);
            }
            self.metrics.forget(&revoked);
            tracing::info!(partitions = ?revoked, "handed partitions over");
        }
        let claimed = self.assigned.claimable(&self.read);
        if claimed.is_empty() {
            return Ok(());
        }
        let Claim {
            checkpoints: committed,
            epochs,
        } = store.claim(&claimed).await?;
        let (consumer, topic, kafka, partitions) = (
            self.consumer.clone(),
            self.config.topic.clone(),
            self.config.kafka.clone(),
            claimed.clone(),
        );
        let mut positioned = tokio::task::spawn_blocking({
            let committed = committed.clone();
            move || position(&kafka, consumer.as_ref(), &topic, &partitions, &committed)
        })
        .await??;
        self.recall_dead_letters(&mut positioned).await?;
        for &(partition, offset) in &positioned.restarted {
            store.restart_partition(partition, offset);
            self.metrics.new_logs.inc();
        }
        self.consumer
            .resume(&partition_list(&self.config.topic, &claimed))
            .context("resuming the claimed partitions")?;
        for &partition in &claimed {
            self.metrics.owned.get_or_create(&PartitionLabel { partition }).set(1);
        }
        for (&partition, &epoch) in &epochs {
            self.metrics
                .owner_epoch
                .get_or_create(&PartitionLabel { partition })
                .set(epoch);
        }
        Metrics::show(&self.metrics.committed_offset, &committed);
        tracing::info!(partitions = ?claimed, from = ?offsets(&positioned.start), ?epochs, "took partitions over");
        self.committed.extend(committed);
        self.read.extend(positioned.start);
        Ok(())
    }

    async fn process<S: Store>(&mut self, store: &mut S, message: &BorrowedMessage<'_>) -> anyhow::Result<()> {
        let (partition, offset) = (message.partition(), message.offset());
        match self.read.get(&partition) {
            // Read before (a fetch may start below the position asked for).
            Some(c) if offset < c.next_offset => return Ok(()),
            Some(_) => {}
            // Not this instance's (any more), or not claimed yet: fetched before a pause.
            None => return Ok(()),
        }
        self.metrics.records_read.inc();
        match reading_of(message, self.config.max_clock_skew) {
            Ok(reading) => store.apply(partition, offset, reading),
            Err(reason) => {
                if self
                    .dead_lettered
                    .get_mut(&partition)
                    .is_some_and(|sent| sent.remove(&offset))
                {
                    tracing::info!(partition, offset, error = %reason, "record already in the dead-letter topic");
                } else {
                    // Acknowledged by the broker before the offset past it can be committed.
                    let letters_from = self.dead_letters.send(message, &reason).await?;
                    if let Some(checkpoint) = self.read.get_mut(&partition) {
                        checkpoint.dead_letters_from = Some(letters_from);
                    }
                    self.metrics.dead_letters.inc();
                    tracing::warn!(partition, offset, error = %reason, "record sent to the dead-letter topic");
                }
            }
        }
        if let Some(checkpoint) = self.read.get_mut(&partition) {
            checkpoint.next_offset = offset + 1;
        }
        self.last_read.insert(partition, (offset, record_hash(message)));
        self.uncommitted += 1;
        self.first_uncommitted.get_or_insert_with(Instant::now);
        Ok(())
    }

    async fn commit<S: Store>(&mut self, store: &mut S) -> anyhow::Result<()> {
        if self.first_uncommitted.is_none() {
            return Ok(());
        }
        for (partition, (offset, hash)) in std::mem::take(&mut self.last_read) {
            if let Some(checkpoint) = self.read.get_mut(&partition) {
                checkpoint.last_record = Some(format_record_id(offset, hash));
            }
        }
        let started = Instant::now();
        let stored = store.commit(&self.read).await?;
        self.uncommitted = 0;
        self.first_uncommitted = None;
        if !stored {
            return Ok(());
        }
        self.metrics.commit_duration.observe(started.elapsed().as_secs_f64());
        self.metrics.commits.inc();
        self.committed = self.read.clone();
        Metrics::show(&self.metrics.committed_offset, &self.committed);
        Metrics::show(&self.metrics.read_offset, &self.read);
        commit_for_monitoring(self.consumer.as_ref(), &self.config.topic, &self.committed);
        Ok(())
    }

    /// Learns which records past each newly positioned checkpoint already have their dead
    /// letter (sent before a crash or a handover), and marks the checkpoints with where this
    /// instance's letters will go. Partitions read from a new log's beginning keep none: the
    /// letters found belong to the old log.
    async fn recall_dead_letters(&mut self, positioned: &mut Positioned) -> anyhow::Result<()> {
        let restarted: BTreeSet<i32> = positioned.restarted.iter().map(|(p, _)| *p).collect();
        let wanted: Vec<(i32, i64, Option<i64>)> = positioned
            .start
            .iter()
            .map(|(p, c)| (*p, c.next_offset, c.dead_letters_from))
            .collect();
        let (dead_letters, topic) = (self.dead_letters.clone(), self.config.topic.clone());
        let found = tokio::task::spawn_blocking(move || {
            wanted
                .into_iter()
                .map(|(partition, next, from)| Ok((partition, dead_letters.sent_since(&topic, partition, next, from)?)))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .await?
        .context("reading back the dead letters sent since the last commit")?;
        for (partition, sent) in found {
            if let Some(checkpoint) = positioned.start.get_mut(&partition) {
                checkpoint.dead_letters_from = Some(sent.end);
            }
            if !sent.offsets.is_empty() && !restarted.contains(&partition) {
                tracing::info!(partition, offsets = ?sent.offsets, "these records were dead-lettered before; not again");
                self.dead_lettered.insert(partition, sent.offsets);
            }
        }
        Ok(())
    }

    /// Lag (high watermark − next offset) per owned partition. The high watermark is the one the
    /// last fetch response carried: asking the broker instead (ListOffsets) adds requests that
    /// queue behind a burst of produce requests on a broker that serializes them (nisshi on
    /// SQLite), and time out there.
    fn update_lag(&self) {
        let context = self.consumer.context();
        for (partition, read) in &self.read {
            if let Some(high) = context.high_watermark(*partition) {
                let label = PartitionLabel { partition: *partition };
                self.metrics
                    .lag
                    .get_or_create(&label)
                    .set((high - read.next_offset).max(0));
            }
        }
    }
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

/// Where to read each partition from, and which partitions start over on a new log.
#[derive(Debug)]
pub struct Positioned {
    pub start: Checkpoints,
    /// `(partition, first offset)` of partitions whose log is not the checkpoint's.
    pub restarted: Vec<(i32, i64)>,
}

/// Seeks `partitions` of `topic` (assigned to `consumer`), each to its checkpoint when the
/// checkpoint belongs to this log, else to the log's beginning. Blocks (broker round trips).
///
/// The log is the checkpoint's when the record before the checkpoint's offset is the very
/// record the checkpoint names. It is another log when the partition ends before that offset
/// (logs do not shrink) or holds a different record there. When the record is gone (deleted by
/// retention) while the log goes on past it, the offset is trusted.
pub fn position<C: Consumer<X>, X: ConsumerContext>(
    kafka: &KafkaArgs,
    consumer: &C,
    topic: &str,
    partitions: &[i32],
    committed: &Checkpoints,
) -> anyhow::Result<Positioned> {
    let timeout = Duration::from_secs(10);
    let mut start = Checkpoints::new();
    let mut restarted = Vec::new();
    let mut reasons = Vec::new();
    // The partitions whose record before the checkpoint is to be read back: `(partition,
    // checkpoint, log start)`.
    let mut to_locate = Vec::new();
    for &partition in partitions {
        let Some(checkpoint) = committed.get(&partition).filter(|c| c.next_offset > 0) else {
            let from_start = committed.get(&partition).cloned();
            start.insert(partition, from_start.unwrap_or_else(|| Checkpoint::start(0)));
            continue;
        };
        let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
        let next = checkpoint.next_offset;
        if next > high {
            reasons.push(format!(
                "partition {partition} ends at {high}, before the stored offset {next}"
            ));
            restarted.push((partition, low));
        } else if next <= low {
            if next < low {
                tracing::error!(
                    topic,
                    partition,
                    stored = next,
                    log_start = low,
                    lost = low - next,
                    "records were deleted by retention before they were consumed"
                );
            }
            start.insert(partition, checkpoint.clone());
        } else {
            to_locate.push((partition, checkpoint, low));
        }
    }
    // Each read-back waits on the broker; a rebalance hands several partitions over at once.
    let located: Vec<anyhow::Result<Option<String>>> = std::thread::scope(|scope| {
        let readers: Vec<_> = to_locate
            .iter()
            .map(|&(partition, checkpoint, _)| {
                scope.spawn(move || locate(kafka, topic, partition, checkpoint.next_offset - 1))
            })
            .collect();
        readers
            .into_iter()
            .map(|reader| {
                reader
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("reading back a checkpoint's record panicked")))
            })
            .collect()
    });
    for ((partition, checkpoint, low), located) in to_locate.into_iter().zip(located) {
        match (located?, &checkpoint.last_record) {
            (Some(id), Some(expected)) if &id != expected => {
                reasons.push(format!(
                    "partition {partition} holds another record at offset {} ({id}, stored {expected})",
                    checkpoint.next_offset - 1
                ));
                restarted.push((partition, low));
            }
            (None, _) => {
                tracing::debug!(
                    partition,
                    offset = checkpoint.next_offset - 1,
                    "record gone; trusting the stored offset"
                );
                start.insert(partition, checkpoint.clone());
            }
            _ => {
                start.insert(partition, checkpoint.clone());
            }
        }
    }
    for &(partition, low) in &restarted {
        start.insert(partition, Checkpoint::start(low));
    }
    if !reasons.is_empty() {
        tracing::warn!(
            topic,
            "the topic holds another log than the stored offsets belong to (the broker lost its data, or the topic \
             was created again); reading these partitions from their beginning: {}",
            reasons.join("; ")
        );
    }
    let mut seek = TopicPartitionList::new();
    for (&partition, checkpoint) in &start {
        seek.add_partition_offset(topic, partition, Offset::Offset(checkpoint.next_offset))?;
    }
    seek_assigned(consumer, seek, timeout)?;
    Ok(Positioned { start, restarted })
}

/// Seeks the partitions of `list` to its offsets. A seek, unlike a new assignment, waits for no
/// group commit in flight, and librdkafka drops what was fetched before it. A partition
/// assigned a moment ago may not have started its fetcher yet ("erroneous state"): retried.
fn seek_assigned<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    mut list: TopicPartitionList,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut again = TopicPartitionList::new();
        for element in consumer.seek_partitions(list, timeout)?.elements() {
            match element.error() {
                Ok(()) => {}
                Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::State) && Instant::now() < deadline => {
                    again.add_partition_offset(element.topic(), element.partition(), element.offset())?;
                }
                Err(e) => {
                    return Err(anyhow::Error::from(e).context(format!("seeking partition {}", element.partition())));
                }
            }
        }
        if again.count() == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
        list = again;
    }
}

/// The [`record_id`] of the record at `offset` of `partition`, which lies below the log's end;
/// `None` when the log holds no record there (a gap left by retention or compaction). Reads it
/// with a consumer of its own: a fetch from inside a batch returns the whole batch, and
/// librdkafka drops the records before the offset asked for.
fn locate(kafka: &KafkaArgs, topic: &str, partition: i32, offset: i64) -> anyhow::Result<Option<String>> {
    let reader: BaseConsumer = kafka
        .client_config()
        .set("group.id", "weather-log-identity")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "error")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    reader.assign(&assignment)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let message = match reader.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "reading back the checkpoint's record");
                continue;
            }
        };
        if message.partition() != partition || message.offset() < offset {
            continue;
        }
        return Ok((message.offset() == offset).then(|| record_id(&message)));
    }
    anyhow::bail!("could not read offset {offset} of partition {partition} of {topic} within 30 s")
}

/// Partition count of `topic`, once the broker answers and the topic exists (the topics in
/// `create` are created when missing). Retries with backoff; `None` on shutdown.
pub async fn wait_for_partitions<C, X>(
    kafka: &KafkaArgs,
    consumer: &Arc<C>,
    topic: &str,
    create: &[&str],
    shutdown: &CancellationToken,
) -> Option<i32>
where
    C: Consumer<X> + Send + Sync + 'static,
    X: ConsumerContext + 'static,
{
    let mut backoff = Backoff::default();
    loop {
        if let Err(e) = kafka.ensure_topics(create).await {
            tracing::debug!(error = %e, "could not create the topics");
        }
        let (consumer, name) = (consumer.clone(), topic.to_owned());
        let found = tokio::task::spawn_blocking(move || partition_count(consumer.as_ref(), &name)).await;
        match found {
            Ok(Ok(n)) if n > 0 => return Some(n),
            Ok(Ok(_)) => tracing::warn!(topic, "waiting for the topic to exist"),
            Ok(Err(e)) => tracing::warn!(error = %e, "waiting for the Kafka broker"),
            Err(e) => tracing::warn!(error = %e, "metadata task failed"),
        }
        if !backoff.wait(shutdown).await {
            return None;
        }
    }
}

/// Commits `checkpoints` to the consumer group, for lag monitoring only: the store holds the
/// position that counts.
fn commit_for_monitoring<C: Consumer<X>, X: ConsumerContext>(consumer: &C, topic: &str, checkpoints: &Checkpoints) {
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

    #[test]
    fn a_fenced_partition_is_held_back_until_the_group_revokes_it_or_assigns_it_again() {
        let owned =
            |partitions: &[i32]| -> Checkpoints { partitions.iter().map(|p| (*p, Checkpoint::start(0))).collect() };
        let mut assignment = Assignment::default();
        assignment.assign(&[0, 1, 2]);
        assert_eq!(assignment.claimable(&owned(&[])), [0, 1, 2]);
        assert_eq!(assignment.claimable(&owned(&[0])), [1, 2]);

        // Fenced on 1 and 2: held back, still assigned, for as long as the group says nothing.
        assignment.hold(&[1, 2]);
        assert!(assignment.contains(1));
        assert_eq!(assignment.claimable(&owned(&[0])), Vec::<i32>::new());
        // The group revokes 1: gone, hold and all.
        assignment.revoke(&[1]);
        assert!(!assignment.contains(1));
        assert_eq!(assignment.claimable(&owned(&[0])), Vec::<i32>::new());
        // The group assigns 2 here again: claimed at once.
        assignment.assign(&[2]);
        assert_eq!(assignment.claimable(&owned(&[0])), [2]);
        // So is 1, revoked and then assigned again.
        assignment.assign(&[1]);
        assert_eq!(assignment.claimable(&owned(&[0])), [1, 2]);
        // A partition not assigned is not held.
        assignment.hold(&[7]);
        assignment.assign(&[7]);
        assert_eq!(assignment.claimable(&owned(&[0])), [1, 2, 7]);
    }

    /// A revocation and a new assignment of the same partition, queued before the worker looks:
    /// the partition is handed over (its fetch position went with the revocation) and then
    /// claimed again, not left owned and never read.
    #[test]
    fn a_partition_revoked_and_assigned_again_between_two_looks_is_handed_over_and_claimed_again() {
        let owned: Checkpoints = [0, 1].into_iter().map(|p| (p, Checkpoint::start(0))).collect();
        let mut assignment = Assignment::default();
        assignment.assign(&[0, 1]);
        let events = vec![Rebalanced::Revoked(vec![1]), Rebalanced::Assigned(vec![1, 2])];
        assert_eq!(assignment.apply(events, &owned), [1]);
        let kept: Checkpoints = owned.into_iter().filter(|(p, _)| *p == 0).collect();
        assert_eq!(assignment.claimable(&kept), [1, 2]);

        // Assigned, then revoked: handed over, not claimed.
        let events = vec![Rebalanced::Assigned(vec![3]), Rebalanced::Revoked(vec![3, 0])];
        assert_eq!(assignment.apply(events, &kept), [0]);
        assert_eq!(assignment.claimable(&Checkpoints::new()), [1, 2]);
    }
}
