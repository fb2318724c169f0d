//! `iceberg-sink`: consumes `weather` and appends it to the Iceberg table `default.weather`
//! (Parquet, ZSTD, format v2, partitioned by `hour(ts)`), exactly once.
//!
//! Exactly once ([`weather_common::consumer`]): each commit's snapshot summary records the next
//! Kafka offset of every partition (`kafka.offsets.weather`) and the record before it
//! (`kafka.records.weather`, which log the offsets belong to). At start, and after any
//! failure, the sink reads them back from the table and resumes exactly there; what was
//! buffered but not committed is simply read again.
//!
//! Instances in one consumer group share the partitions, without a coordinator: each writes its
//! own files and appends them with its partitions' offsets, merged with the others' from the
//! snapshot it commits on. Before committing it checks that its partitions' offsets are still
//! the ones it last saw; one that moved was taken over by another instance, and the commit is
//! dropped (fenced). Table maintenance runs in the instance that owns partition 0.

pub mod catalog;
pub mod files;
pub mod maintainer;
pub mod maintenance;
pub mod manifests;
pub mod orphans;
pub mod resume;
pub mod table;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use prometheus_client::{
    metrics::{
        counter::Counter,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio_util::sync::CancellationToken;
use weather_common::{
    WeatherReading,
    consumer::{self, Checkpoints, Claim, ConsumerArgs, Epochs, Unresumable},
    http, kafka,
    lakehouse::{CatalogArgs, CatalogConfig},
};

use crate::{
    resume::ResumeFrom,
    table::{BrokenLineage, WeatherTable},
};

#[derive(clap::Parser, Debug, Clone)]
#[command(
    version,
    about,
    mut_arg("group_id", |a| a.default_value("iceberg-sink")),
    mut_arg("commit_interval", |a| a.default_value("10s")),
    mut_arg("max_records", |a| a.default_value("500000")),
)]
pub struct Args {
    /// Address of the /health and /metrics endpoints.
    #[arg(long, env = "LISTEN", default_value = "127.0.0.1:9101")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub consumer: ConsumerArgs,

    #[command(flatten)]
    pub catalog: CatalogArgs,

    /// Parquet files roll over at about this size, in bytes.
    #[arg(long, env = "TARGET_FILE_SIZE", default_value_t = 128 << 20)]
    pub target_file_size: usize,

    /// How often table maintenance runs (merging manifests, compacting closed hours, expiring
    /// snapshots, deleting the files no one needs any more), in a task beside the commits, in
    /// the instance that owns partition 0; sooner (checked every 10 s) once there are more than
    /// --max-snapshots snapshots or --max-unmerged-manifests new manifests; 0 turns it off.
    #[arg(long, env = "MAINTENANCE_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub maintenance_interval: Duration,

    /// Snapshots older than this are expired (time travel reaches back this far)...
    #[arg(long, env = "SNAPSHOT_RETENTION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub snapshot_retention: Duration,

    /// ...but the newest this many are always kept.
    #[arg(long, env = "MIN_SNAPSHOTS", default_value_t = 10)]
    pub min_snapshots: usize,

    /// Beyond this many snapshots the oldest are expired whatever their age, so that the
    /// metadata does not grow with the commit rate (an hour of 200 ms commits is 18,000): time
    /// travel reaches back this many commits at most (33 min of the default 10 s commits).
    #[arg(long, env = "MAX_SNAPSHOTS", default_value_t = 200)]
    pub max_snapshots: usize,

    /// Where to resume when the table's line of snapshots is broken (another engine expired the
    /// snapshots between the current one and the newest that records the Kafka checkpoints):
    /// `group` (the consumer group's committed offsets, at most one commit behind the table), a
    /// snapshot id that records them, or `start` (every partition from its beginning, for a
    /// table the sink never wrote to). Unset, the sink refuses to start and says so.
    #[arg(long, env = "RESUME_FROM")]
    pub resume_from: Option<ResumeFrom>,

    /// Manifests written by appends (one each) are merged into one per hour partition once
    /// more than this many wait.
    #[arg(long, env = "MAX_UNMERGED_MANIFESTS", default_value_t = 20)]
    pub max_unmerged_manifests: usize,

    /// A closed `hour(ts)` partition (older than the newest) with more data files than this
    /// is compacted into files near --target-file-size.
    #[arg(long, env = "MAX_FILES_PER_PARTITION", default_value_t = 4)]
    pub max_files_per_partition: usize,

    /// Files under the table that nothing references (left by a crash between writing and
    /// committing) are deleted once older than this; swept at the first maintenance after start
    /// and daily. Keep it well above the time a commit can take, for other writers' sake.
    #[arg(long, env = "ORPHAN_AGE", default_value = "1d", value_parser = humantime::parse_duration)]
    pub orphan_age: Duration,

    /// For tests: each maintenance run waits this long after planning a rewrite, before it
    /// writes and commits it, as a run on a large table takes that long.
    #[arg(long, hide = true, default_value = "0s", value_parser = humantime::parse_duration)]
    pub maintenance_delay: Duration,
}

impl Args {
    fn consumer_config(&self) -> consumer::Config {
        consumer::Config {
            name: "iceberg-sink",
            args: self.consumer.clone(),
        }
    }
}

/// Runs until `shutdown` is cancelled, then commits what it buffered and returns.
pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let catalog = args.catalog.config()?;
    let mut registry = Registry::with_prefix("iceberg_sink");
    let consumed = consumer::Metrics::register(&mut registry);
    let metrics = Metrics::register(&mut registry);
    let (listen, admin) = http::spawn_admin(args.listen, Arc::new(registry), shutdown.clone())
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(%listen, topic = %args.consumer.topic, warehouse = %args.catalog.warehouse, "iceberg-sink starting");
    let maintainer = Arc::new(AtomicBool::new(false));
    let catalog_for_upkeep = catalog.clone();
    let mut sink = Sink {
        args: &args,
        catalog,
        table: None,
        committed: Checkpoints::new(),
        epochs: Epochs::new(),
        buffer: Vec::new(),
        metrics: metrics.clone(),
        maintainer: maintainer.clone(),
    };
    let upkeep = maintainer::spawn(&args, catalog_for_upkeep, metrics, maintainer, shutdown.clone());
    let consumed = consumer::run(&args.consumer_config(), &mut sink, &consumed, &shutdown).await;
    shutdown.cancel();
    admin.await?;
    upkeep.await?;
    consumed?;
    tracing::info!("iceberg-sink stopped");
    Ok(())
}

/// The table as a [`consumer::Store`]: readings are buffered and appended as one snapshot
/// whose summary carries the checkpoints.
struct Sink<'a> {
    args: &'a Args,
    catalog: CatalogConfig,
    table: Option<WeatherTable>,
    /// The checkpoints of the owned partitions as the table holds them.
    committed: Checkpoints,
    /// The owner epochs of the partitions this instance owns, as its claims set them.
    epochs: Epochs,
    buffer: Vec<WeatherReading>,
    metrics: Metrics,
    /// Set while this instance owns [`MAINTAINER_PARTITION`]: the maintainer task's cue.
    maintainer: Arc<AtomicBool>,
}

/// Where the partitions are taken to stand when the table's line of snapshots is broken
/// (`broken`): what `--resume-from` names, or [`Unresumable`] without it.
async fn resume_point(args: &Args, table: &WeatherTable, broken: anyhow::Error) -> anyhow::Result<Checkpoints> {
    let resume = match args.resume_from {
        None => return Err(unresumable(broken)),
        Some(ResumeFrom::Snapshot(id)) => table.checkpoints_at(&args.consumer.topic, id)?,
        Some(ResumeFrom::Start) => Checkpoints::new(),
        Some(ResumeFrom::Group) => {
            let (kafka, group, topic) = (
                args.consumer.kafka.clone(),
                args.consumer.group_id.clone(),
                args.consumer.topic.clone(),
            );
            let offsets = tokio::task::spawn_blocking(move || kafka::group_offsets(&kafka, &group, &topic))
                .await?
                .context("reading the consumer group's committed offsets")?;
            offsets
                .into_iter()
                .map(|(p, next_offset)| (p, consumer::Checkpoint::start(next_offset)))
                .collect()
        }
    };
    tracing::warn!(
        error = %broken,
        resume_from = ?args.resume_from,
        offsets = ?resume.iter().map(|(p, c)| (*p, c.next_offset)).collect::<Vec<_>>(),
        "the table's line of snapshots is broken; resuming where --resume-from says"
    );
    Ok(resume)
}

fn unresumable(e: anyhow::Error) -> anyhow::Error {
    Unresumable { reason: e.to_string() }.into()
}

impl Sink<'_> {
    /// Tells the maintainer task whether this instance owns [`MAINTAINER_PARTITION`].
    fn flag_maintainer(&self) {
        self.maintainer
            .store(self.epochs.contains_key(&MAINTAINER_PARTITION), Ordering::Relaxed);
    }
}

/// The owner of this partition maintains the table.
pub(crate) const MAINTAINER_PARTITION: i32 = 0;

impl consumer::Store for Sink<'_> {
    async fn open(&mut self, _shutdown: &CancellationToken) -> anyhow::Result<bool> {
        self.buffer.clear();
        self.committed.clear();
        self.epochs.clear();
        self.flag_maintainer();
        self.table = None;
        let table = WeatherTable::open(
            &self.catalog,
            &self.args.catalog.namespace,
            &self.args.catalog.table,
            self.args.target_file_size,
        )
        .await?;
        self.table = Some(table);
        Ok(true)
    }

    async fn claim(&mut self, partitions: &[i32]) -> anyhow::Result<Claim> {
        let topic = &self.args.consumer.topic;
        let table = self.table.as_mut().context("table not open")?;
        let claim = match table.claim(topic, partitions, None).await {
            Err(e) if e.is::<BrokenLineage>() => {
                let resume = resume_point(self.args, table, e).await?;
                table.claim(topic, partitions, Some(&resume)).await
            }
            claim => claim,
        }
        .context("claiming partitions")?;
        self.epochs.extend(claim.epochs.clone());
        self.committed.extend(claim.checkpoints.clone());
        self.flag_maintainer();
        Ok(claim)
    }

    fn release(&mut self, partitions: &[i32]) {
        for partition in partitions {
            self.committed.remove(partition);
            self.epochs.remove(partition);
        }
        self.flag_maintainer();
    }

    fn apply(&mut self, _partition: i32, _offset: i64, reading: WeatherReading) {
        self.buffer.push(reading);
        self.metrics.records.inc();
    }

    /// Writes the buffer as Parquet and commits it with the checkpoints it reaches.
    /// Records read past dead letters alone move the checkpoints too: committed in a snapshot
    /// without files, so that they are not read (and dead-lettered) again.
    async fn commit(&mut self, checkpoints: &Checkpoints) -> anyhow::Result<bool> {
        let moved = checkpoints.iter().any(|(p, c)| self.committed.get(p) != Some(c));
        if self.buffer.is_empty() && !moved {
            return Ok(false);
        }
        let table = self.table.as_mut().context("table not open")?;
        let started = Instant::now();
        let files = if self.buffer.is_empty() {
            Vec::new()
        } else {
            table.write(&self.buffer).await.context("writing Parquet")?
        };
        let file_count = files.len();
        let bytes: u64 = files.iter().map(|f| f.file_size_in_bytes()).sum();
        let conflicts = match table
            .commit(
                &self.args.consumer.topic,
                files,
                &self.committed,
                checkpoints,
                &self.epochs,
            )
            .await
        {
            // Left to the next start, which claims with --resume-from or refuses.
            Err(e) if e.is::<BrokenLineage>() => Err(unresumable(e)),
            committed => committed,
        }
        .context("committing the snapshot")?;
        self.metrics.commit_conflicts.inc_by(conflicts as u64);
        self.metrics.records_written.inc_by(self.buffer.len() as u64);
        self.metrics.bytes_written.inc_by(bytes);
        if let Some(id) = table.current_snapshot_id() {
            self.metrics.snapshot_id.set(id);
        }
        tracing::info!(
            records = self.buffer.len(),
            files = file_count,
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            snapshot = ?table.current_snapshot_id(),
            conflicts,
            "committed"
        );
        self.metrics.files_per_commit.observe(file_count as f64);
        self.metrics.commit_duration.observe(started.elapsed().as_secs_f64());
        if file_count > 0 {
            self.metrics.bytes_per_file.observe(bytes as f64 / file_count as f64);
        }
        self.committed.extend(checkpoints.iter().map(|(p, c)| (*p, c.clone())));
        self.buffer.clear();
        Ok(true)
    }
}

#[derive(Clone)]
pub(crate) struct Metrics {
    records: Counter,
    commit_conflicts: Counter,
    maintainer: Gauge,
    records_written: Counter,
    bytes_written: Counter,
    snapshot_id: Gauge,
    files_per_commit: Histogram,
    bytes_per_file: Histogram,
    commit_duration: Histogram,
    maintenance_duration: Histogram,
    snapshots: Gauge,
    manifests: Gauge,
    metadata_bytes: Gauge,
    maintenance_runs: Counter,
    maintenance_failures: Counter,
    manifest_merges: Counter,
    compacted_partitions: Counter,
    maintenance_rebases: Counter,
    orphans_deleted: Counter,
    expired_snapshots: Counter,
    deleted_files: Counter,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            records: Counter::default(),
            commit_conflicts: Counter::default(),
            maintainer: Gauge::default(),
            records_written: Counter::default(),
            bytes_written: Counter::default(),
            snapshot_id: Gauge::default(),
            files_per_commit: Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 64.0]),
            bytes_per_file: Histogram::new(exponential_buckets(1024.0, 4.0, 10)),
            commit_duration: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            maintenance_duration: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            snapshots: Gauge::default(),
            manifests: Gauge::default(),
            metadata_bytes: Gauge::default(),
            maintenance_runs: Counter::default(),
            maintenance_failures: Counter::default(),
            manifest_merges: Counter::default(),
            compacted_partitions: Counter::default(),
            maintenance_rebases: Counter::default(),
            orphans_deleted: Counter::default(),
            expired_snapshots: Counter::default(),
            deleted_files: Counter::default(),
        };
        for (name, help, metric) in [
            (
                "table_snapshots",
                "Snapshots in the table's current metadata",
                &metrics.snapshots,
            ),
            (
                "table_manifests",
                "Manifests the current snapshot lists",
                &metrics.manifests,
            ),
            (
                "table_metadata_bytes",
                "Size of the current metadata file",
                &metrics.metadata_bytes,
            ),
            (
                "maintainer",
                "1 while this instance maintains the table (it owns partition 0)",
                &metrics.maintainer,
            ),
        ] {
            registry.register(name, help, metric.clone());
        }
        for (name, help, metric) in [
            (
                "maintenance_runs",
                "Table maintenance runs that finished",
                &metrics.maintenance_runs,
            ),
            (
                "maintenance_failures",
                "Table maintenance runs that failed",
                &metrics.maintenance_failures,
            ),
            ("manifest_merges", "Manifest merges committed", &metrics.manifest_merges),
            (
                "compacted_partitions",
                "Closed partitions whose data files were compacted",
                &metrics.compacted_partitions,
            ),
            (
                "commit_conflicts",
                "Commits of other instances that landed first, each met by merging the offsets again on the new snapshot",
                &metrics.commit_conflicts,
            ),
            (
                "maintenance_rebases",
                "Appends that landed while a manifest rewrite was made, each met by listing it again on them",
                &metrics.maintenance_rebases,
            ),
            ("expired_snapshots", "Snapshots expired", &metrics.expired_snapshots),
            (
                "orphans_deleted",
                "Unreferenced files older than --orphan-age deleted",
                &metrics.orphans_deleted,
            ),
            (
                "deleted_files",
                "Files deleted by maintenance (manifest lists, manifests, data files, metadata versions)",
                &metrics.deleted_files,
            ),
        ] {
            registry.register(name, help, metric.clone());
        }
        for (name, help, metric) in [
            (
                "files_per_commit",
                "Parquet files one commit adds",
                &metrics.files_per_commit,
            ),
            (
                "bytes_per_file",
                "Average size of the Parquet files of one commit",
                &metrics.bytes_per_file,
            ),
            (
                "table_commit_duration_seconds",
                "Writing and committing one snapshot",
                &metrics.commit_duration,
            ),
            (
                "maintenance_duration_seconds",
                "One table maintenance run, beside the commits",
                &metrics.maintenance_duration,
            ),
        ] {
            registry.register(name, help, metric.clone());
        }
        registry.register("records_consumed", "Valid readings consumed", metrics.records.clone());
        registry.register(
            "records_written",
            "Readings committed to the table",
            metrics.records_written.clone(),
        );
        registry.register(
            "parquet_bytes_written",
            "Bytes of Parquet committed",
            metrics.bytes_written.clone(),
        );
        registry.register(
            "last_snapshot_id",
            "Id of the last snapshot committed",
            metrics.snapshot_id.clone(),
        );
        metrics
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn the_shared_consumer_flags_take_the_sinks_defaults() {
        Args::command().debug_assert();
        let args = Args::try_parse_from(["iceberg-sink"]).expect("defaults parse");
        assert_eq!(args.consumer.group_id, "iceberg-sink");
        assert_eq!(args.consumer.commit_interval, Duration::from_secs(10));
        assert_eq!(args.consumer.max_records, 500_000);
        assert_eq!(args.consumer.topic, kafka::WEATHER_TOPIC);
    }
}
