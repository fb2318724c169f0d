//! `window-aggregator`: consumes `weather`, averages temperatures per city in event-time
//! tumbling windows and upserts them into PostgreSQL, exactly once.
//!
//! Exactly once ([`weather_common::consumer`]): window deltas, the windows still open and the
//! checkpoint of each Kafka partition are written in one PostgreSQL transaction. At start, and
//! after any database failure, the state of the last commit is loaded back and the consumer
//! resumes exactly there.
//!
//! Instances in one consumer group share the partitions; readings are keyed by city, so a city's
//! windows live in one partition. Each instance holds the windows of the partitions it owns and
//! commits only those, fenced by their owner epochs ([`store::Store::claim`]).

#[cfg(feature = "rebuild")]
pub mod rebuild;
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
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio_util::sync::CancellationToken;
use weather_common::{
    WeatherReading,
    consumer::{self, Checkpoints, Claim, ConsumerArgs, Epochs},
    http,
    runtime::Backoff,
};

use crate::{
    store::{Position, Store},
    window::{Aggregator, Outcome, WindowConfig},
};

#[derive(clap::Parser, Debug, Clone)]
#[command(
    version,
    about,
    after_help = "`window-aggregator rebuild --help`: rebuild the windows from the Iceberg table.",
    mut_arg("group_id", |a| a.default_value("window-aggregator")),
    mut_arg("commit_interval", |a| a.default_value("500ms")),
    // `--max-batch` was this daemon's name for `--max-records` before the consumers shared
    // their flags; still understood so that existing command lines keep working.
    mut_arg("max_records", |a| a.default_value("50000").alias("max-batch")),
)]
pub struct Args {
    /// Address of the /health and /metrics endpoints.
    #[arg(long, env = "LISTEN", default_value = "127.0.0.1:9201")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub consumer: ConsumerArgs,

    #[command(flatten)]
    pub windows: WindowArgs,

    /// Watermark lag behind the highest event time seen in a partition.
    #[arg(long, env = "ALLOWED_LATENESS", default_value = "2s", value_parser = humantime::parse_duration)]
    pub allowed_lateness: Duration,

    /// How long after its end an emitted window still accepts late readings.
    #[arg(long, env = "MAX_LATENESS", default_value = "1m", value_parser = humantime::parse_duration)]
    pub max_lateness: Duration,

    /// A partition quiet for this long emits its windows by the wall clock.
    #[arg(long, env = "IDLE_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
}

/// What the windows are and where they are kept: the same for the aggregator and a rebuild.
#[derive(clap::Args, Debug, Clone)]
pub struct WindowArgs {
    /// PostgreSQL connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgresql://postgres@localhost/weather"
    )]
    pub database_url: String,

    /// Windows older than this are deleted from PostgreSQL, a batch at a time; 0 keeps them.
    #[arg(long, env = "RETENTION", default_value = "30d", value_parser = humantime::parse_duration)]
    pub retention: Duration,

    /// Length of the tumbling windows.
    #[arg(long, env = "WINDOW", default_value = "5s", value_parser = humantime::parse_duration)]
    pub window: Duration,
}

impl Args {
    fn window_config(&self) -> anyhow::Result<WindowConfig> {
        let delta = |d: Duration, name: &str| TimeDelta::from_std(d).with_context(|| format!("--{name} too large"));
        let config = WindowConfig {
            size: delta(self.windows.window, "window")?,
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

impl Args {
    fn consumer_config(&self) -> consumer::Config {
        consumer::Config {
            name: "window-aggregator",
            args: self.consumer.clone(),
        }
    }
}

/// Runs until `shutdown` is cancelled, then commits what it holds and returns.
pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = args.window_config()?;
    let mut registry = Registry::with_prefix("window_aggregator");
    let consumed = consumer::Metrics::register(&mut registry);
    let metrics = Metrics::register(&mut registry);
    let (listen, admin) = http::spawn_admin(args.listen, Arc::new(registry), shutdown.clone())
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(%listen, topic = %args.consumer.topic, window = ?args.windows.window, "window-aggregator starting");
    let retention = tokio::spawn(store::enforce_retention(
        args.windows.database_url.clone(),
        args.windows.retention,
        metrics.retention_deleted.clone(),
        shutdown.clone(),
    ));
    let mut windows = Windows {
        args: &args,
        store: None,
        aggregator: Aggregator::new(config, BTreeMap::new()),
        epochs: Epochs::new(),
        metrics,
        dropped_since_commit: 0,
    };
    let consumed = consumer::run(&args.consumer_config(), &mut windows, &consumed, &shutdown).await;
    shutdown.cancel();
    admin.await?;
    retention.await?;
    consumed?;
    tracing::info!("window-aggregator stopped");
    Ok(())
}

/// Connects and migrates, retrying; `None` on shutdown.
async fn connect(args: &Args, shutdown: &CancellationToken) -> Option<Store> {
    let mut backoff = Backoff::default();
    loop {
        match Store::connect(&args.windows.database_url, &args.consumer.topic).await {
            Ok(store) => return Some(store),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "PostgreSQL unavailable"),
        }
        if !backoff.wait(shutdown).await {
            return None;
        }
    }
}

/// The windows and their PostgreSQL table as a [`consumer::Store`].
struct Windows<'a> {
    args: &'a Args,
    store: Option<Store>,
    aggregator: Aggregator,
    /// Owner epoch of each partition this instance claimed.
    epochs: Epochs,
    metrics: Metrics,
    dropped_since_commit: u64,
}

impl consumer::Store for Windows<'_> {
    async fn open(&mut self, shutdown: &CancellationToken) -> anyhow::Result<bool> {
        self.store = None;
        self.aggregator = Aggregator::new(self.args.window_config()?, BTreeMap::new());
        self.epochs.clear();
        let Some(store) = connect(self.args, shutdown).await else {
            return Ok(false);
        };
        self.store = Some(store);
        Ok(true)
    }

    async fn claim(&mut self, partitions: &[i32]) -> anyhow::Result<Claim> {
        let store = self.store.as_mut().context("not connected")?;
        let claimed = store.claim(partitions).await.context("claiming partitions")?;
        self.epochs.extend(claimed.claim.epochs.clone());
        self.aggregator.insert_partitions(claimed.state);
        let limit = Utc::now() + TimeDelta::from_std(self.args.consumer.max_clock_skew).unwrap_or(TimeDelta::MAX);
        let repaired = self.aggregator.repair_future_watermarks(limit);
        if repaired > 0 {
            tracing::warn!(
                partitions = repaired,
                "the stored event-time high mark lay in the future (a reading from a wrong clock); reset it"
            );
        }
        Ok(claimed.claim)
    }

    fn release(&mut self, partitions: &[i32]) {
        self.aggregator.remove_partitions(partitions);
        for partition in partitions {
            self.epochs.remove(partition);
        }
    }

    fn apply(&mut self, partition: i32, offset: i64, reading: WeatherReading) {
        let outcome = self.aggregator.apply(partition, &reading, Instant::now());
        if outcome == Outcome::Dropped {
            self.dropped_since_commit += 1;
            tracing::debug!(partition, offset, "reading too late, dropped");
        }
        self.metrics
            .records
            .get_or_create(&OutcomeLabel {
                outcome: outcome.label(),
            })
            .inc();
    }

    fn tick(&mut self) -> bool {
        self.aggregator
            .close_idle(Utc::now(), Instant::now(), self.args.idle_timeout)
            > 0
    }

    async fn commit(&mut self, checkpoints: &Checkpoints) -> anyhow::Result<bool> {
        let store = self.store.as_mut().context("not connected")?;
        let batch = self.aggregator.take_batch();
        let positions = checkpoints
            .iter()
            .map(|(&partition, checkpoint)| {
                Ok(Position {
                    partition,
                    epoch: *self
                        .epochs
                        .get(&partition)
                        .with_context(|| format!("partition {partition} was never claimed"))?,
                    checkpoint,
                    max_event_time: self
                        .aggregator
                        .partitions
                        .get(&partition)
                        .and_then(|s| s.max_event_time),
                })
            })
            .collect::<anyhow::Result<Vec<Position>>>()?;
        store
            .commit(&batch, &positions)
            .await
            .context("committing to PostgreSQL")?;
        self.metrics.window_rows.inc_by(batch.deltas.len() as u64);
        self.metrics
            .open_windows
            .set(self.aggregator.partitions.values().map(|p| p.open.len() as i64).sum());
        if self.dropped_since_commit > 0 {
            tracing::warn!(count = self.dropped_since_commit, max_lateness = ?self.args.max_lateness, "dropped readings whose window had closed too long ago");
            self.dropped_since_commit = 0;
        }
        Ok(true)
    }
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Windowed => "windowed",
            Outcome::Late => "late",
            Outcome::Dropped => "dropped_late",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

struct Metrics {
    records: Family<OutcomeLabel, Counter>,
    window_rows: Counter,
    open_windows: Gauge,
    retention_deleted: Counter,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            records: Family::default(),
            window_rows: Counter::default(),
            open_windows: Gauge::default(),
            retention_deleted: Counter::default(),
        };
        registry.register(
            "retention_deleted_rows",
            "Window rows deleted for being older than --retention",
            metrics.retention_deleted.clone(),
        );
        registry.register(
            "records",
            "Readings consumed, by outcome: windowed, late (merged), dropped_late",
            metrics.records.clone(),
        );
        registry.register(
            "window_rows_written",
            "Window rows upserted into PostgreSQL",
            metrics.window_rows.clone(),
        );
        registry.register(
            "open_windows",
            "Windows waiting for the watermark",
            metrics.open_windows.clone(),
        );
        metrics
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn the_shared_consumer_flags_take_the_aggregators_defaults() {
        Args::command().debug_assert();
        let args = Args::try_parse_from(["window-aggregator"]).expect("defaults parse");
        assert_eq!(args.consumer.group_id, "window-aggregator");
        assert_eq!(args.consumer.commit_interval, Duration::from_millis(500));
        assert_eq!(args.consumer.max_records, 50_000);
        let args = Args::try_parse_from(["window-aggregator", "--max-batch", "7"]).expect("old flag name parses");
        assert_eq!(args.consumer.max_records, 7);
    }
}
