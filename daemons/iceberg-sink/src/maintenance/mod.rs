//! Table maintenance, run by the maintainer task beside the sink's commits
//! ([`crate::maintainer`]) so that the table stays bounded however long it runs: the manifests
//! appends write are merged into one per `hour(ts)` partition, closed hours are compacted into
//! files near the target size, snapshots past their retention are expired, the files only they
//! referenced (manifest lists, manifests, data files compacted away) and old metadata versions
//! are deleted, and orphans are swept ([`crate::orphans`]).
//!
//! Each run is planned first ([`plan`]: pure, from what the table lists) and then carried out
//! ([`rewrite`], [`expire`], [`crate::orphans`]).
//!
//! Merge and compaction are one `replace` snapshot made by [`rewrite`]. A concurrent commit
//! makes its swap in the catalog match no row: the rewrite is then listed again on the new
//! snapshot, keeping what was appended meanwhile and reusing its compacted files (several sinks
//! append every few seconds between them, so a compaction of many files would otherwise never
//! land); it is never written over the other commit, and dropped (its files deleted) when
//! another rewrite came first. The rewrite snapshot carries the newest Kafka checkpoints on its
//! line, so the next append finds them in the current snapshot whatever was expired.

mod expire;
mod plan;
mod rewrite;

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use iceberg::table::Table;

use plan::Keep;
pub use plan::Policy;
use rewrite::rewrite_manifests;
use weather_common::lakehouse::CatalogRows;

/// How often the orphan sweep runs after the first (which is at the first maintenance run).
const SWEEP_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// What one maintenance run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Manifests before and after a merge.
    pub merged: Option<(usize, usize)>,
    pub expired_snapshots: usize,
    /// Closed partitions whose files were compacted.
    pub compacted_partitions: usize,
    pub deleted_files: usize,
    /// Files the orphan sweep deleted.
    pub orphans_deleted: usize,
    /// Appends that landed while the rewrite was made, each met by listing it again on them.
    pub rebases: usize,
}

/// State kept between runs: the metadata files seen (at start, after each commit and at each
/// run), so that those dropped from the table's metadata log since can be deleted.
#[derive(Default)]
pub struct Maintenance {
    known_metadata: BTreeSet<String>,
    last_sweep: Option<std::time::Instant>,
}

impl Maintenance {
    /// Notes the metadata files `table` lists: call at start and after every commit (the
    /// maintenance's own commits included).
    pub fn observe(&mut self, table: &Table) {
        self.known_metadata
            .extend(table.metadata().metadata_log().iter().map(|e| e.metadata_file.clone()));
        self.known_metadata.extend(table.metadata_location().map(str::to_owned));
    }

    /// One run on `table` (freshly loaded); returns the table as it is afterwards.
    pub async fn run(
        &mut self,
        catalog: &dyn iceberg::Catalog,
        row: &CatalogRows,
        mut table: Table,
        policy: &Policy,
        lineage: usize,
        storage: &HashMap<String, String>,
    ) -> anyhow::Result<(Table, Report)> {
        let mut report = Report::default();
        if let Some(rewrite) = rewrite_manifests(catalog, row, &table, policy).await? {
            report.merged = Some((rewrite.manifests_before, rewrite.manifests_after));
            report.compacted_partitions = rewrite.compacted_partitions;
            report.rebases = rewrite.rebases;
            table = rewrite.table;
            self.observe(&table);
        }
        let (expired, table) = expire::expire_snapshots(catalog, table, &Keep::of(policy, lineage)).await?;
        self.observe(&table);
        report.expired_snapshots = expired.len();
        report.deleted_files += expire::delete_unreferenced(&table, &expired).await?;
        report.deleted_files += self.delete_old_metadata(&table).await?;
        if self.last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_INTERVAL) {
            self.last_sweep = Some(std::time::Instant::now());
            report.orphans_deleted = crate::orphans::sweep(&table, storage, policy.orphan_age).await?;
        }
        Ok((table, report))
    }

    /// Deletes metadata files that were live at the last run and have left the metadata log.
    async fn delete_old_metadata(&mut self, table: &Table) -> anyhow::Result<usize> {
        let mut live: BTreeSet<String> = table
            .metadata()
            .metadata_log()
            .iter()
            .map(|entry| entry.metadata_file.clone())
            .collect();
        live.extend(table.metadata_location().map(str::to_owned));
        let gone: Vec<String> = self.known_metadata.difference(&live).cloned().collect();
        for path in &gone {
            table.file_io().delete(path).await?;
        }
        self.known_metadata = live;
        Ok(gone.len())
    }
}
