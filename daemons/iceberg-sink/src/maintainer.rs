//! Table maintenance as a task of its own beside the consumer: merging, compaction, expiry and
//! the orphan sweep take seconds to minutes on a large table, and inside a commit they would
//! stop the consumer from polling (the group evicts a member that does not poll for
//! `max.poll.interval.ms`) and delay every reading behind them. Maintenance commits land beside
//! the appends through the catalog's compare-and-set ([`crate::maintenance`]), so the two need
//! no lock; this task has a catalog connection and a table of its own.
//!
//! One instance maintains: the owner of [`crate::MAINTAINER_PARTITION`], which the sink flags.
//! Two maintainers would be safe (each commit is a compare-and-set) but would mostly undo each
//! other's rewrites.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weather_common::lakehouse::CatalogConfig;

use crate::{
    Args, Metrics,
    maintenance::Policy,
    table::{Shape, WeatherTable},
};

/// How often the table's shape (snapshots, manifests, metadata size) is brought up to date in
/// the metrics, on every instance.
const SHAPE_INTERVAL: Duration = Duration::from_secs(10);

/// The shortest pause between two maintenance runs, whatever `--maintenance-interval` says.
const MIN_PAUSE: Duration = Duration::from_millis(100);

/// The maintenance policy `args` set.
pub fn policy(args: &Args) -> Policy {
    Policy {
        snapshot_retention: args.snapshot_retention,
        min_snapshots: args.min_snapshots,
        max_snapshots: args.max_snapshots,
        max_unmerged_manifests: args.max_unmerged_manifests,
        max_files_per_partition: args.max_files_per_partition,
        target_file_size: args.target_file_size,
        orphan_age: args.orphan_age,
        delay: args.maintenance_delay,
    }
}

/// The policy of a sink started without flags (its environment's settings apply): for tests and
/// benchmarks that change a few of them.
pub fn default_policy() -> anyhow::Result<Policy> {
    use clap::Parser;
    Ok(policy(&Args::try_parse_from(["iceberg-sink"])?))
}

/// Starts the task. It maintains every `--maintenance-interval` while `maintainer` is set, and
/// stops at `shutdown`, dropping a run in progress: what that run wrote and did not commit is
/// left to the orphan sweep.
pub(crate) fn spawn(
    args: &Args,
    catalog: CatalogConfig,
    metrics: Metrics,
    maintainer: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let task = Task {
        args: args.clone(),
        policy: policy(args),
        catalog,
        metrics,
        maintainer,
    };
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = task.run() => {}
        }
    })
}

/// Whether the table grew past the policy's limits since the last run (`manifests_after_run`
/// manifests then): maintenance is due before its interval is up when commits come fast, or
/// the snapshots and manifests they add would grow with the commit rate between two runs.
fn over_limits(shape: &Shape, policy: &Policy, manifests_after_run: usize) -> bool {
    shape.snapshots > policy.max_snapshots || shape.manifests > manifests_after_run + policy.max_unmerged_manifests
}

struct Task {
    args: Args,
    policy: Policy,
    catalog: CatalogConfig,
    metrics: Metrics,
    maintainer: Arc<AtomicBool>,
}

impl Task {
    async fn run(self) {
        let (args, interval) = (&self.args, self.args.maintenance_interval);
        let pause = if interval.is_zero() {
            SHAPE_INTERVAL
        } else {
            interval.clamp(MIN_PAUSE, SHAPE_INTERVAL)
        };
        let mut table = None;
        let mut last_run: Option<Instant> = None;
        let mut shape: Option<Shape> = None;
        // Manifests after the last run: appends add one each.
        let mut manifests_after_run = 0;
        loop {
            tokio::time::sleep(pause).await;
            if table.is_none() {
                let (namespace, name) = (&args.catalog.namespace, &args.catalog.table);
                match WeatherTable::open(&self.catalog, namespace, name, args.target_file_size).await {
                    Ok(opened) => table = Some(opened),
                    Err(e) => {
                        tracing::debug!(error = %format!("{e:#}"), "maintenance: the table is not reachable yet");
                        continue;
                    }
                }
            }
            let Some(table) = table.as_mut() else { continue };
            let maintainer = self.maintainer.load(Ordering::Relaxed);
            self.metrics.maintainer.set(i64::from(maintainer));
            let over = shape.is_some_and(|s| over_limits(&s, &self.policy, manifests_after_run));
            let due = maintainer && !interval.is_zero() && (over || last_run.is_none_or(|t| t.elapsed() >= interval));
            if due {
                last_run = Some(Instant::now());
                self.maintain(table).await;
            } else if let Err(e) = table.reload().await {
                tracing::debug!(error = %format!("{e:#}"), "maintenance: could not load the table");
                continue;
            }
            shape = self.show_shape(table).await;
            if due {
                manifests_after_run = shape.map_or(0, |s| s.manifests);
            }
        }
    }

    /// One run; a failure is logged and retried next time: the appends do not depend on it.
    async fn maintain(&self, table: &mut WeatherTable) {
        let started = Instant::now();
        match table.maintain(&self.args.consumer.topic, &self.policy).await {
            Ok(report) => {
                let metrics = &self.metrics;
                metrics.maintenance_runs.inc();
                metrics.expired_snapshots.inc_by(report.expired_snapshots as u64);
                metrics.deleted_files.inc_by(report.deleted_files as u64);
                metrics.orphans_deleted.inc_by(report.orphans_deleted as u64);
                if report.merged.is_some() {
                    metrics.manifest_merges.inc();
                }
                metrics.compacted_partitions.inc_by(report.compacted_partitions as u64);
                metrics.maintenance_rebases.inc_by(report.rebases as u64);
                metrics.maintenance_duration.observe(started.elapsed().as_secs_f64());
                tracing::info!(
                    merged = ?report.merged,
                    expired_snapshots = report.expired_snapshots,
                    compacted_partitions = report.compacted_partitions,
                    deleted_files = report.deleted_files,
                    orphans_deleted = report.orphans_deleted,
                    rebases = report.rebases,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "table maintenance"
                );
            }
            Err(e) => {
                self.metrics.maintenance_failures.inc();
                tracing::warn!(error = %format!("{e:#}"), "table maintenance failed; retried next time");
            }
        }
    }

    async fn show_shape(&self, table: &WeatherTable) -> Option<Shape> {
        match table.shape().await {
            Ok(shape) => {
                self.metrics.snapshots.set(shape.snapshots as i64);
                self.metrics.manifests.set(shape.manifests as i64);
                self.metrics.metadata_bytes.set(shape.metadata_bytes as i64);
                Some(shape)
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not measure the table's metadata");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_commits_make_maintenance_due_before_its_interval() {
        let policy = default_policy().expect("defaults");
        let shape = |snapshots, manifests| Shape {
            snapshots,
            manifests,
            metadata_bytes: 0,
        };
        let (max, unmerged) = (policy.max_snapshots, policy.max_unmerged_manifests);
        assert!(!over_limits(&shape(max, 30 + unmerged), &policy, 30));
        assert!(over_limits(&shape(max + 1, 30), &policy, 30));
        assert!(over_limits(&shape(10, 31 + unmerged), &policy, 30));
    }
}
