//! `iceberg-sink`: consumes `weather` and appends it to the Iceberg table `default.weather`
//! (Parquet, ZSTD, format v2, partitioned by `hour(ts)`), exactly once.
//!
//! Exactly once: each commit's snapshot summary records the next Kafka offset of every
//! partition it covers (`kafka.offsets.weather`). At start, and after any failure, the sink
//! reads those offsets back from the table and assigns the consumer exactly there; what was
//! buffered but not committed is simply read again. Before committing, the sink checks the
//! table's offsets are still the ones it started from, so a second sink cannot double data.

pub mod table;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use rdkafka::{Message, consumer::StreamConsumer};
use tokio_util::sync::CancellationToken;
use weather_common::{
    WeatherReading,
    http::{self, PartitionLabel},
    kafka::{
        DEAD_LETTER_TOPIC, DeadLetters, KafkaArgs, WEATHER_TOPIC, assign_at, commit_for_monitoring, reading_of,
        spawn_lag_update, wait_for_partitions,
    },
    runtime::{self, Backoff},
};

use crate::table::{CatalogConfig, Offsets, WeatherTable};

#[derive(clap::Parser, Debug, Clone)]
#[command(version, about)]
pub struct Args {
    /// Address of the /health and /metrics endpoints.
    #[arg(long, env = "LISTEN", default_value = "0.0.0.0:9101")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Topic to consume.
    #[arg(long, env = "KAFKA_TOPIC", default_value = WEATHER_TOPIC)]
    pub topic: String,

    /// Consumer group; its offsets are committed for lag monitoring only.
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = "iceberg-sink")]
    pub group_id: String,

    /// Topic for records that are not valid readings.
    #[arg(long, env = "DEAD_LETTER_TOPIC", default_value = DEAD_LETTER_TOPIC)]
    pub dead_letter_topic: String,

    /// Iceberg SQL catalog: `postgresql://…` (shared with Trino and PyIceberg) or `sqlite://…`.
    #[arg(long, env = "CATALOG_URL", default_value = "postgresql://postgres@localhost/iceberg")]
    pub catalog_url: String,

    /// Catalog name (the `catalog_name` column of the catalog tables).
    #[arg(long, env = "CATALOG_NAME", default_value = "weather")]
    pub catalog_name: String,

    /// Where new tables go: `s3://bucket/prefix` or `file:///path`.
    #[arg(long, env = "WAREHOUSE", default_value = "s3://warehouse/")]
    pub warehouse: String,

    /// Namespace of the table.
    #[arg(long, env = "ICEBERG_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Table name.
    #[arg(long, env = "ICEBERG_TABLE", default_value = "weather")]
    pub table: String,

    /// S3 endpoint for S3-compatible servers (MinIO, Garage, …); empty for AWS.
    #[arg(long, env = "S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// S3 region.
    #[arg(long, env = "S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,

    /// Path-style S3 URLs (`endpoint/bucket/key`), which most S3-compatible servers need.
    #[arg(long, env = "S3_PATH_STYLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub s3_path_style: bool,

    /// File with `AWS_ACCESS_KEY_ID=…` and `AWS_SECRET_ACCESS_KEY=…` lines (for systemd
    /// credentials); otherwise those environment variables are used.
    #[arg(long, env = "S3_CREDENTIALS_FILE")]
    pub s3_credentials_file: Option<PathBuf>,

    /// Longest time between commits.
    #[arg(long, env = "COMMIT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub commit_interval: Duration,

    /// Records after which a commit happens before the interval is up.
    #[arg(long, env = "MAX_RECORDS", default_value_t = 500_000)]
    pub max_records: usize,

    /// Parquet files roll over at about this size, in bytes.
    #[arg(long, env = "TARGET_FILE_SIZE", default_value_t = 128 << 20)]
    pub target_file_size: usize,
}

impl Args {
    /// Catalog settings with S3 credentials resolved from the file or the environment.
    pub fn catalog_config(&self) -> anyhow::Result<CatalogConfig> {
        let mut storage = HashMap::new();
        if let Some(endpoint) = &self.s3_endpoint {
            storage.insert("s3.endpoint".to_owned(), endpoint.clone());
        }
        storage.insert("s3.region".to_owned(), self.s3_region.clone());
        storage.insert("s3.path-style-access".to_owned(), self.s3_path_style.to_string());
        let mut credentials: HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k == "AWS_ACCESS_KEY_ID" || k == "AWS_SECRET_ACCESS_KEY")
            .collect();
        if let Some(path) = &self.s3_credentials_file {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            for line in text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
            {
                let (key, value) = line
                    .split_once('=')
                    .with_context(|| format!("{}: lines must be KEY=VALUE", path.display()))?;
                credentials.insert(key.trim().to_owned(), value.trim().to_owned());
            }
        }
        if let Some(key) = credentials.get("AWS_ACCESS_KEY_ID") {
            storage.insert("s3.access-key-id".to_owned(), key.clone());
        }
        if let Some(secret) = credentials.get("AWS_SECRET_ACCESS_KEY") {
            storage.insert("s3.secret-access-key".to_owned(), secret.clone());
        }
        Ok(CatalogConfig {
            url: self.catalog_url.clone(),
            name: self.catalog_name.clone(),
            warehouse: self.warehouse.clone(),
            storage,
        })
    }
}

/// Runs until `shutdown` is cancelled, then commits what it buffered and returns.
pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let catalog = args.catalog_config()?;
    let metrics = Arc::new(Metrics::new());
    let (listen, admin) = http::spawn_admin(args.listen, metrics.registry.clone(), shutdown.clone())
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(%listen, topic = %args.topic, warehouse = %args.warehouse, "iceberg-sink starting");

    let consumer = args
        .kafka
        .sink_consumer(&args.group_id)
        .context("creating the Kafka consumer")?;
    let dead_letters = DeadLetters::new(&args.kafka, &args.dead_letter_topic, "iceberg-sink")?;
    let mut ready = false;
    let mut backoff = Backoff::default();
    loop {
        let topics = [args.topic.as_str(), args.dead_letter_topic.as_str()];
        let Some(partitions) = wait_for_partitions(&args.kafka, &consumer, &args.topic, &topics, &shutdown).await
        else {
            break;
        };
        let opened = async {
            let table = WeatherTable::open(&catalog, &args.namespace, &args.table, args.target_file_size).await?;
            let offsets = table.committed_offsets(&args.topic)?;
            anyhow::Ok((table, offsets))
        };
        let (table, committed) = match opened.await {
            Ok(opened) => opened,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "catalog or table unavailable");
                if backoff.wait(&shutdown).await {
                    continue;
                }
                break;
            }
        };
        let restarted = match assign_at(consumer.as_ref(), &args.topic, partitions, |p| {
            committed.get(&p).copied()
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
        metrics.show_committed(&committed);
        let mut position = committed.clone();
        position.extend(restarted);
        if !ready {
            ready = true;
            runtime::notify_ready();
            tracing::info!(partitions, ?committed, "consuming");
        }
        let mut worker = Worker {
            args: &args,
            consumer: &consumer,
            table,
            dead_letters: &dead_letters,
            metrics: &metrics,
            committed,
            position,
            buffer: Vec::new(),
            first_buffered: None,
        };
        match worker.consume(&shutdown).await {
            Ok(()) => break,
            Err(e) => {
                metrics.recoveries.inc();
                tracing::warn!(error = %format!("{e:#}"), "resuming from the last commit");
                if !backoff.wait(&shutdown).await {
                    break;
                }
            }
        }
    }
    shutdown.cancel();
    admin.await?;
    tracing::info!("iceberg-sink stopped");
    Ok(())
}

struct Worker<'a> {
    args: &'a Args,
    consumer: &'a Arc<StreamConsumer>,
    table: WeatherTable,
    dead_letters: &'a DeadLetters,
    metrics: &'a Metrics,
    /// Offsets of the table's last commit.
    committed: Offsets,
    /// Next offset per partition after what is in `buffer`.
    position: Offsets,
    buffer: Vec<WeatherReading>,
    first_buffered: Option<Instant>,
}

impl Worker<'_> {
    async fn consume(&mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_lag_check = Instant::now();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    self.flush().await?;
                    tracing::info!("committed what was buffered");
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
                    if self.buffer.len() >= self.args.max_records {
                        self.flush().await?;
                    }
                }
                _ = tick.tick() => {
                    if self.first_buffered.is_some_and(|t| t.elapsed() >= self.args.commit_interval) {
                        self.flush().await?;
                    }
                    if last_lag_check.elapsed() > Duration::from_secs(5) {
                        last_lag_check = Instant::now();
                        let lag = self.metrics.lag.clone();
                        let positions = self.position.iter().map(|(p, o)| (*p, *o)).collect();
                        spawn_lag_update(self.consumer.clone(), self.args.topic.clone(), positions, move |partition, value| {
                            lag.get_or_create(&PartitionLabel { partition }).set(value);
                        });
                    }
                }
            }
        }
    }

    async fn process(&mut self, message: &rdkafka::message::BorrowedMessage<'_>) -> anyhow::Result<()> {
        let (partition, offset) = (message.partition(), message.offset());
        if self.position.get(&partition).is_some_and(|&next| offset < next) {
            return Ok(()); // Already in the table or the buffer.
        }
        let parsed = reading_of(message);
        match parsed {
            Ok(reading) => {
                self.buffer.push(reading);
                self.first_buffered.get_or_insert_with(Instant::now);
                self.metrics.records.inc();
            }
            Err(e) => {
                self.dead_letters.send(message, &e.to_string()).await?;
                self.metrics.dead_letters.inc();
                tracing::warn!(partition, offset, error = %e, "record sent to the dead-letter topic");
            }
        }
        self.position.insert(partition, offset + 1);
        Ok(())
    }

    /// Writes the buffer as Parquet and commits it with the offsets it covers.
    async fn flush(&mut self) -> anyhow::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let files = self.table.write(&self.buffer).await.context("writing Parquet")?;
        let file_count = files.len();
        let bytes: u64 = files.iter().map(|f| f.file_size_in_bytes()).sum();
        self.table
            .commit(&self.args.topic, files, &self.committed, &self.position)
            .await
            .context("committing the snapshot")?;
        let elapsed = started.elapsed();
        self.metrics.commit_duration.observe(elapsed.as_secs_f64());
        self.metrics.commits.inc();
        self.metrics.records_written.inc_by(self.buffer.len() as u64);
        self.metrics.bytes_written.inc_by(bytes);
        if let Some(id) = self.table.current_snapshot_id() {
            self.metrics.snapshot_id.set(id);
        }
        tracing::info!(
            records = self.buffer.len(),
            files = file_count,
            bytes,
            elapsed_ms = elapsed.as_millis() as u64,
            snapshot = ?self.table.current_snapshot_id(),
            "committed"
        );
        self.committed = self.position.clone();
        self.metrics.show_committed(&self.committed);
        self.buffer.clear();
        self.first_buffered = None;
        commit_for_monitoring(
            self.consumer.as_ref(),
            &self.args.topic,
            self.committed.iter().map(|(p, o)| (*p, *o)),
        );
        Ok(())
    }
}

struct Metrics {
    registry: Arc<Registry>,
    records: Counter,
    records_written: Counter,
    bytes_written: Counter,
    dead_letters: Counter,
    commits: Counter,
    commit_duration: Histogram,
    snapshot_id: Gauge,
    lag: Family<PartitionLabel, Gauge>,
    committed_offset: Family<PartitionLabel, Gauge>,
    recoveries: Counter,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("iceberg_sink");
        let records = Counter::default();
        registry.register("records_consumed", "Valid readings consumed", records.clone());
        let records_written = Counter::default();
        registry.register(
            "records_written",
            "Readings committed to the table",
            records_written.clone(),
        );
        let bytes_written = Counter::default();
        registry.register(
            "parquet_bytes_written",
            "Bytes of Parquet committed",
            bytes_written.clone(),
        );
        let dead_letters = Counter::default();
        registry.register(
            "dead_letters",
            "Records sent to the dead-letter topic",
            dead_letters.clone(),
        );
        let commits = Counter::default();
        registry.register("commits", "Iceberg snapshots committed", commits.clone());
        let commit_duration = Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        registry.register(
            "commit_duration_seconds",
            "Parquet write plus catalog commit",
            commit_duration.clone(),
        );
        let snapshot_id = Gauge::default();
        registry.register(
            "last_snapshot_id",
            "Id of the last snapshot committed",
            snapshot_id.clone(),
        );
        let lag = Family::<PartitionLabel, Gauge>::default();
        registry.register("lag_records", "Records in the partition not consumed yet", lag.clone());
        let committed_offset = Family::<PartitionLabel, Gauge>::default();
        registry.register(
            "committed_offset",
            "Next Kafka offset per partition that the table holds everything before",
            committed_offset.clone(),
        );
        let recoveries = Counter::default();
        registry.register(
            "recoveries",
            "Resumptions from the last commit after a failure",
            recoveries.clone(),
        );
        Self {
            registry: Arc::new(registry),
            records,
            records_written,
            bytes_written,
            dead_letters,
            commits,
            commit_duration,
            snapshot_id,
            lag,
            committed_offset,
            recoveries,
        }
    }

    fn show_committed(&self, committed: &Offsets) {
        for (&partition, &offset) in committed {
            self.committed_offset
                .get_or_create(&PartitionLabel { partition })
                .set(offset);
        }
    }
}
