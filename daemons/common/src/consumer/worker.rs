//! The worker: reads the partitions this instance owns, hands them to the store, commits.

use anyhow::Context as _;
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use rdkafka::{Message, consumer::Consumer, message::BorrowedMessage};
use tokio_util::sync::CancellationToken;

use crate::{dead_letters::DeadLetters, http::PartitionLabel};

use super::assignment::Assignment;
use super::config::Config;
use super::group::{GroupConsumer, LAG_INTERVAL, commit_for_monitoring, partition_list};
use super::metrics::Metrics;
use super::owned::{Owned, OwnedPartitions, to_commit};
use super::position::{Positioned, position};
use super::record::{reading_of, record_hash};
use super::store::{Checkpoints, Claim, Store, offsets};

pub(super) struct Worker<'a> {
    config: &'a Config,
    consumer: &'a Arc<GroupConsumer>,
    dead_letters: &'a Arc<DeadLetters>,
    metrics: &'a Metrics,
    /// What the group assigned to this instance; the worker claims each of them and gives up
    /// the partitions it owns that are no longer in it.
    assigned: &'a mut Assignment,
    /// The partitions this instance owns: claimed, positioned and read.
    owned: OwnedPartitions,
    uncommitted: usize,
    first_uncommitted: Option<Instant>,
}

impl<'a> Worker<'a> {
    /// A worker that owns no partition yet: it claims what `assigned` holds on its first look.
    pub(super) fn new(
        config: &'a Config,
        consumer: &'a Arc<GroupConsumer>,
        dead_letters: &'a Arc<DeadLetters>,
        metrics: &'a Metrics,
        assigned: &'a mut Assignment,
    ) -> Self {
        Self {
            config,
            consumer,
            dead_letters,
            metrics,
            assigned,
            owned: OwnedPartitions::new(),
            uncommitted: 0,
            first_uncommitted: None,
        }
    }

    /// The partitions it owns.
    pub(super) fn owned(&self) -> Vec<i32> {
        self.owned.keys().copied().collect()
    }

    pub(super) async fn consume<S: Store>(
        &mut self,
        store: &mut S,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.config.args.commit_interval.min(Duration::from_millis(250)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_lag_check = Instant::now();
        self.rebalance(store).await?;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    self.commit(store).await?;
                    tracing::info!(committed = ?offsets(&self.committed()), "committed what was read");
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
                    if self.uncommitted >= self.config.args.max_records {
                        self.commit(store).await?;
                    }
                }
                _ = tick.tick() => {
                    if store.tick() {
                        self.first_uncommitted.get_or_insert_with(Instant::now);
                    }
                    if self.first_uncommitted.is_some_and(|t| t.elapsed() >= self.config.args.commit_interval) {
                        self.commit(store).await?;
                    }
                    self.show_read();
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
        let revoked = self.assigned.apply(events, &self.owned);
        if !revoked.is_empty() {
            // What was read of them is stored before their next owner loads it.
            self.commit(store).await?;
            store.release(&revoked);
            for partition in &revoked {
                self.owned.remove(partition);
            }
            self.metrics.forget(&revoked);
            tracing::info!(partitions = ?revoked, "handed partitions over");
        }
        let claimed = self.assigned.claimable(&self.owned);
        if claimed.is_empty() {
            return Ok(());
        }
        let Claim {
            checkpoints: committed,
            epochs,
        } = store.claim(&claimed).await?;
        let (consumer, topic, kafka, partitions) = (
            self.consumer.clone(),
            self.config.args.topic.clone(),
            self.config.args.kafka.clone(),
            claimed.clone(),
        );
        let mut positioned = tokio::task::spawn_blocking({
            let committed = committed.clone();
            move || position(&kafka, consumer.as_ref(), &topic, &partitions, &committed)
        })
        .await??;
        let mut dead_lettered = self.recall_dead_letters(&mut positioned).await?;
        // Nothing of a partition is applied before its claim, so a store has nothing to drop for
        // a new log; the windows already counted of the old one stay.
        self.metrics.new_logs.inc_by(positioned.restarted.len() as u64);
        self.consumer
            .resume(&partition_list(&self.config.args.topic, &claimed))
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
        for (partition, read) in positioned.start {
            let committed = committed.get(&partition).cloned().unwrap_or_else(|| read.clone());
            let dead_lettered = dead_lettered.remove(&partition).unwrap_or_default();
            self.owned
                .insert(partition, Owned::claimed(committed, read, dead_lettered));
        }
        Ok(())
    }

    async fn process<S: Store>(&mut self, store: &mut S, message: &BorrowedMessage<'_>) -> anyhow::Result<()> {
        let (partition, offset) = (message.partition(), message.offset());
        let Some(owned) = self.owned.get_mut(&partition) else {
            // Not this instance's (any more), or not claimed yet: fetched before a pause.
            return Ok(());
        };
        if offset < owned.read.next_offset {
            // Read before (a fetch may start below the position asked for).
            return Ok(());
        }
        self.metrics.records_read.inc();
        match reading_of(message, self.config.args.max_clock_skew) {
            Ok(reading) => store.apply(partition, offset, reading),
            Err(reason) => {
                if owned.dead_lettered.remove(&offset) {
                    tracing::info!(partition, offset, error = %reason, "record already in the dead-letter topic");
                } else {
                    // Acknowledged by the broker before the offset past it can be committed.
                    owned.read.dead_letters_from = Some(self.dead_letters.send(message, &reason).await?);
                    self.metrics.dead_letters.inc();
                    tracing::warn!(partition, offset, error = %reason, "record sent to the dead-letter topic");
                }
            }
        }
        owned.advance(offset, record_hash(message));
        self.uncommitted += 1;
        self.first_uncommitted.get_or_insert_with(Instant::now);
        Ok(())
    }

    async fn commit<S: Store>(&mut self, store: &mut S) -> anyhow::Result<()> {
        if self.first_uncommitted.is_none() {
            return Ok(());
        }
        let read = to_commit(&mut self.owned);
        let started = Instant::now();
        let stored = store.commit(&read).await?;
        self.uncommitted = 0;
        self.first_uncommitted = None;
        if !stored {
            return Ok(());
        }
        self.metrics.commit_duration.observe(started.elapsed().as_secs_f64());
        self.metrics.commits.inc();
        for state in self.owned.values_mut() {
            state.committed = state.read.clone();
        }
        Metrics::show(&self.metrics.committed_offset, &read);
        Metrics::show(&self.metrics.read_offset, &read);
        commit_for_monitoring(self.consumer.as_ref(), &self.config.args.topic, &read);
        Ok(())
    }

    /// What the store holds of each owned partition.
    fn committed(&self) -> Checkpoints {
        self.owned
            .iter()
            .map(|(p, state)| (*p, state.committed.clone()))
            .collect()
    }

    fn show_read(&self) {
        let read = self.owned.iter().map(|(&p, state)| (p, state.read.next_offset));
        Metrics::show_offsets(&self.metrics.read_offset, read);
    }

    /// Learns which records past each newly positioned checkpoint already have their dead
    /// letter (sent before a crash or a handover), and marks the checkpoints with where this
    /// instance's letters will go. Partitions read from a new log's beginning keep none: the
    /// letters found belong to the old log.
    async fn recall_dead_letters(&self, positioned: &mut Positioned) -> anyhow::Result<BTreeMap<i32, BTreeSet<i64>>> {
        let restarted: BTreeSet<i32> = positioned.restarted.iter().map(|(p, _)| *p).collect();
        let wanted: Vec<(i32, i64, Option<i64>)> = positioned
            .start
            .iter()
            .map(|(p, c)| (*p, c.next_offset, c.dead_letters_from))
            .collect();
        let (dead_letters, topic) = (self.dead_letters.clone(), self.config.args.topic.clone());
        let found = tokio::task::spawn_blocking(move || {
            wanted
                .into_iter()
                .map(|(partition, next, from)| Ok((partition, dead_letters.sent_since(&topic, partition, next, from)?)))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .await?
        .context("reading back the dead letters sent since the last commit")?;
        let mut dead_lettered = BTreeMap::new();
        for (partition, sent) in found {
            if let Some(checkpoint) = positioned.start.get_mut(&partition) {
                checkpoint.dead_letters_from = Some(sent.end);
            }
            if !sent.offsets.is_empty() && !restarted.contains(&partition) {
                tracing::info!(partition, offsets = ?sent.offsets, "these records were dead-lettered before; not again");
                dead_lettered.insert(partition, sent.offsets);
            }
        }
        Ok(dead_lettered)
    }

    /// Lag (high watermark − next offset) per owned partition. The high watermark is the one the
    /// last fetch response carried: asking the broker instead (ListOffsets) adds requests that
    /// queue behind a burst of produce requests on a broker that serializes them (nisshi on
    /// SQLite), and time out there.
    fn update_lag(&self) {
        let context = self.consumer.context();
        for (&partition, state) in &self.owned {
            if let Some(high) = context.high_watermark(partition) {
                let label = PartitionLabel { partition };
                self.metrics
                    .lag
                    .get_or_create(&label)
                    .set((high - state.read.next_offset).max(0));
            }
        }
    }
}
