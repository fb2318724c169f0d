//! `window-aggregator`: consumes `weather`, averages temperatures per city in event-time
//! tumbling windows and upserts them into PostgreSQL, exactly once.
//!
//! Exactly once: window deltas, the windows still open and the next Kafka offset of each
//! partition are written in one PostgreSQL transaction. At start, and after any database
//! failure, the state of the last commit is loaded back and the consumer is assigned exactly
//! those offsets. One instance writes at a time (a PostgreSQL advisory lock); a second one
//! stands by until the first is gone.

pub mod store;
pub mod window;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::{TimeDelta, Utc};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use rdkafka::{Message, consumer::StreamConsumer};
use tokio_util::sync::CancellationToken;
use weather_common::{
    http::{self, PartitionLabel},
    kafka::{
        DEAD_LETTER_TOPIC, DeadLetters, KafkaArgs, WEATHER_TOPIC, assign_at, commit_for_monitoring, partition_count,
        reading_of, spawn_lag_update, wait_for_partitions,
    },
    runtime::{self, Backoff},
};

use crate::{
    store::Store,
    window::{Aggregator, Outcome, PartitionState, WindowConfig},
};

#[derive(clap::Parser, Debug, Clone)]
#[command(version, about)]
pub struct Args {
    /// Address of the /health and /metrics endpoints.
    #[arg(long, env = "LISTEN", default_value = "0.0.0.0:9102")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Topic to consume.
    #[arg(long, env = "KAFKA_TOPIC", default_value = WEATHER_TOPIC)]
    pub topic: String,

    /// Consumer group; its offsets are committed for lag monitoring only.
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = "window-aggregator")]
    pub group_id: String,

    /// Topic for records that are not valid readings.
    #[arg(long, env = "DEAD_LETTER_TOPIC", default_value = DEAD_LETTER_TOPIC)]
    pub dead_letter_topic: String,

    /// PostgreSQL connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgresql://postgres@localhost/weather"
    )]
    pub database_url: String,

    /// Length of the tumbling windows.
    #[arg(long, env = "WINDOW", default_value = "5s", value_parser = humantime::parse_duration)]
    pub window: Duration,

    /// Watermark lag behind the highest event time seen in a partition.
    #[arg(long, env = "ALLOWED_LATENESS", default_value = "2s", value_parser = humantime::parse_duration)]
    pub allowed_lateness: Duration,

    /// How long after its end an emitted window still accepts late readings.
    #[arg(long, env = "MAX_LATENESS", default_value = "1m", value_parser = humantime::parse_duration)]
    pub max_lateness: Duration,

    /// A partition quiet for this long emits its windows by the wall clock.
    #[arg(long, env = "IDLE_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Time between commits.
    #[arg(long, env = "COMMIT_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub commit_interval: Duration,

    /// Records after which a commit happens before the interval is up.
    #[arg(long, env = "MAX_BATCH", default_value_t = 50_000)]
    pub max_batch: usize,
}

impl Args {
    fn window_config(&self) -> anyhow::Result<WindowConfig> {
        let delta = |d: Duration, name: &str| TimeDelta::from_std(d).with_context(|| format!("--{name} too large"));
        let config = WindowConfig {
            size: delta(self.window, "window")?,
            allowed_lateness: delta(self.allowed_lateness, "allowed-lateness")?,
            max_lateness: delta(self.max_lateness, "max-lateness")?,
        };
        anyhow::ensure!(
            config.size >= TimeDelta::milliseconds(1),
            "--window must be at least 1ms"
        );
        Ok(config)
    }
}

/// Runs until `shutdown` is cancelled, then commits what it holds and returns.
pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = args.window_config()?;
    let metrics = Arc::new(Metrics::new());
    let (listen, admin) = http::spawn_admin(args.listen, metrics.registry.clone(), shutdown.clone())
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(%listen, topic = %args.topic, window = ?args.window, "window-aggregator starting");

    let consumer = args
        .kafka
        .sink_consumer(&args.group_id)
        .context("creating the Kafka consumer")?;
    let dead_letters = DeadLetters::new(&args.kafka, &args.dead_letter_topic, "window-aggregator")?;
    let mut ready = false;
    let mut backoff = Backoff::default();
    loop {
        let topics = [args.topic.as_str(), args.dead_letter_topic.as_str()];
        let Some(partitions) = wait_for_partitions(&args.kafka, &consumer, &args.topic, &topics, &shutdown).await
        else {
            break;
        };
        let Some(store) = connect(&args, &shutdown).await else {
            break;
        };
        let mut state = match store.load().await {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "loading state failed");
                if backoff.wait(&shutdown).await {
                    continue;
                }
                break;
            }
        };
        let restarted = match assign_at(consumer.as_ref(), &args.topic, partitions, |p| {
            state.get(&p).map(|s| s.next_offset)
        }) {
            Ok(restarted) => restarted,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not position the consumer");
                if backoff.wait(&shutdown).await {
                    continue;
                }
                break;
            }
        };
        read_again_from(&mut state, restarted);
        if !ready {
            ready = true;
            runtime::notify_ready();
            tracing::info!(partitions, "consuming");
        }
        let mut worker = Worker {
            args: &args,
            consumer: &consumer,
            store,
            aggregator: Aggregator::new(config, state),
            dead_letters: &dead_letters,
            metrics: &metrics,
            partitions,
            dropped_since_commit: 0,
        };
        match worker.consume(&shutdown).await {
            Ok(()) => break,
            Err(e) => {
                metrics.restarts.inc();
                tracing::warn!(error = %format!("{e:#}"), "resuming from the last commit");
                if !backoff.wait(&shutdown).await {
                    break;
                }
            }
        }
    }
    shutdown.cancel();
    admin.await?;
    tracing::info!("window-aggregator stopped");
    Ok(())
}

/// Moves partitions whose log started over (see [`assign_at`]) back to its new start, so its
/// records are not skipped as already counted.
fn read_again_from(state: &mut BTreeMap<i32, PartitionState>, restarted: Vec<(i32, i64)>) {
    for (partition, start) in restarted {
        if let Some(partition) = state.get_mut(&partition) {
            partition.next_offset = start;
        }
    }
}

/// Connects, migrates and takes the writer lock, retrying; `None` on shutdown.
async fn connect(args: &Args, shutdown: &CancellationToken) -> Option<Store> {
    let mut backoff = Backoff::default();
    let mut standing_by = false;
    loop {
        let attempt = async {
            let store = Store::connect(&args.database_url, &args.topic).await?;
            let locked = store.try_lock().await?;
            anyhow::Ok(locked.then_some(store))
        };
        match attempt.await {
            Ok(Some(store)) => return Some(store),
            Ok(None) => {
                if !standing_by {
                    standing_by = true;
                    runtime::notify_status("standing by: another window-aggregator holds the writer lock");
                    tracing::info!("another window-aggregator writes to this database; standing by");
                }
                backoff = Backoff::from_step(2);
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "PostgreSQL unavailable"),
        }
        if !backoff.wait(shutdown).await {
            return None;
        }
    }
}

struct Worker<'a> {
    args: &'a Args,
    consumer: &'a Arc<StreamConsumer>,
    store: Store,
    aggregator: Aggregator,
    dead_letters: &'a DeadLetters,
    metrics: &'a Metrics,
    partitions: i32,
    dropped_since_commit: u64,
}

impl Worker<'_> {
    /// Consumes until shutdown (commits, then `Ok`) or a failure (`Err`: the caller reloads).
    async fn consume(&mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.args.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut uncommitted = 0usize;
        let mut last_partition_check = Instant::now();
        let mut last_lag_check = Instant::now();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    self.commit().await?;
                    tracing::info!("committed open windows and offsets");
                    return Ok(());
                }
                message = self.consumer.recv() => {
                    let message = match message {
                        Ok(message) => message,
                        Err(e) => {
                            tracing::warn!(error = %e, "Kafka consumer error");
                            continue;
                        }
                    };
                    self.process(&message).await?;
                    uncommitted += 1;
                    if uncommitted >= self.args.max_batch {
                        self.commit().await?;
                        uncommitted = 0;
                    }
                }
                _ = tick.tick() => {
                    self.aggregator.close_idle(Utc::now(), Instant::now(), self.args.idle_timeout);
                    self.commit().await?;
                    uncommitted = 0;
                    if last_lag_check.elapsed() > Duration::from_secs(5) {
                        last_lag_check = Instant::now();
                        self.update_lag();
                    }
                    if last_partition_check.elapsed() > Duration::from_secs(30) {
                        last_partition_check = Instant::now();
                        self.check_new_partitions().await?;
                    }
                }
            }
        }
    }

    async fn process(&mut self, message: &rdkafka::message::BorrowedMessage<'_>) -> anyhow::Result<()> {
        let parsed = reading_of(message);
        let now = Instant::now();
        let outcome = match &parsed {
            Ok(reading) => self
                .aggregator
                .apply(message.partition(), message.offset(), Some(reading), now),
            Err(_) => self.aggregator.apply(message.partition(), message.offset(), None, now),
        };
        if let (Outcome::Skipped, Err(e)) = (outcome, &parsed) {
            // Acknowledged by the broker before the offset past it can be committed.
            self.dead_letters.send(message, &e.to_string()).await?;
            tracing::warn!(partition = message.partition(), offset = message.offset(), error = %e, "record sent to the dead-letter topic");
        }
        if outcome == Outcome::Dropped {
            self.dropped_since_commit += 1;
            tracing::debug!(
                partition = message.partition(),
                offset = message.offset(),
                "reading too late, dropped"
            );
        }
        self.metrics
            .records
            .get_or_create(&OutcomeLabel {
                outcome: outcome.label(),
            })
            .inc();
        Ok(())
    }

    async fn commit(&mut self) -> anyhow::Result<()> {
        if !self.aggregator.has_pending() {
            return Ok(());
        }
        let batch = self.aggregator.take_batch();
        let started = Instant::now();
        self.store.commit(&batch).await.context("committing to PostgreSQL")?;
        self.metrics.commit_duration.observe(started.elapsed().as_secs_f64());
        self.metrics.window_rows.inc_by(batch.deltas.len() as u64);
        self.metrics
            .open_windows
            .set(self.aggregator.partitions.values().map(|p| p.open.len() as i64).sum());
        if self.dropped_since_commit > 0 {
            tracing::warn!(count = self.dropped_since_commit, max_lateness = ?self.args.max_lateness, "dropped readings whose window had closed too long ago");
            self.dropped_since_commit = 0;
        }
        commit_for_monitoring(
            self.consumer.as_ref(),
            &self.args.topic,
            batch.partitions.iter().map(|p| (p.partition, p.next_offset)),
        );
        Ok(())
    }

    fn update_lag(&self) {
        let positions = self
            .aggregator
            .partitions
            .iter()
            .map(|(p, s)| (*p, s.next_offset))
            .collect();
        let lag = self.metrics.lag.clone();
        spawn_lag_update(
            self.consumer.clone(),
            self.args.topic.clone(),
            positions,
            move |partition, value| {
                lag.get_or_create(&PartitionLabel { partition }).set(value);
            },
        );
    }

    /// Partitions added to the topic while running are assigned from their beginning.
    async fn check_new_partitions(&mut self) -> anyhow::Result<()> {
        let consumer = self.consumer.clone();
        let topic = self.args.topic.clone();
        let count = tokio::task::spawn_blocking(move || partition_count(consumer.as_ref(), &topic).ok()).await?;
        if let Some(count) = count.filter(|&n| n > self.partitions) {
            tracing::info!(from = self.partitions, to = count, "topic gained partitions");
            self.commit().await?;
            self.partitions = count;
            let partitions = &mut self.aggregator.partitions;
            let restarted = assign_at(self.consumer.as_ref(), &self.args.topic, count, |p| {
                partitions.get(&p).map(|s| s.next_offset)
            })?;
            read_again_from(partitions, restarted);
        }
        Ok(())
    }
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Duplicate => "duplicate",
            Outcome::Windowed => "windowed",
            Outcome::Late => "late",
            Outcome::Dropped => "dropped_late",
            Outcome::Skipped => "dead_letter",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

struct Metrics {
    registry: Arc<Registry>,
    records: Family<OutcomeLabel, Counter>,
    window_rows: Counter,
    commit_duration: Histogram,
    open_windows: Gauge,
    lag: Family<PartitionLabel, Gauge>,
    restarts: Counter,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("window_aggregator");
        let records = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "records",
            "Records consumed, by outcome: windowed, late (merged), dropped_late, dead_letter, duplicate",
            records.clone(),
        );
        let window_rows = Counter::default();
        registry.register(
            "window_rows_written",
            "Window rows upserted into PostgreSQL",
            window_rows.clone(),
        );
        let commit_duration = Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]);
        registry.register(
            "commit_duration_seconds",
            "PostgreSQL commit latency",
            commit_duration.clone(),
        );
        let open_windows = Gauge::default();
        registry.register(
            "open_windows",
            "Windows waiting for the watermark",
            open_windows.clone(),
        );
        let lag = Family::<PartitionLabel, Gauge>::default();
        registry.register("lag_records", "Records in the partition not consumed yet", lag.clone());
        let restarts = Counter::default();
        registry.register(
            "recoveries",
            "Resumptions from the last commit after a failure",
            restarts.clone(),
        );
        Self {
            registry: Arc::new(registry),
            records,
            window_rows,
            commit_duration,
            open_windows,
            lag,
            restarts,
        }
    }
}
