//! Table maintenance, run by the maintainer task beside the sink's commits
//! ([`crate::maintainer`]) so that the table stays bounded however long it runs: the manifests appends write are merged into one per `hour(ts)`
//! partition, closed hours are compacted into files near the target size, snapshots past their
//! retention are expired, the files only they referenced (manifest lists, manifests, data
//! files compacted away) and old metadata versions are deleted, and orphans are swept
//! ([`crate::orphans`]).
//!
//! `iceberg` 0.10.1 can expire snapshots but has no manifest rewrite, and its `TableCommit`
//! cannot be built outside the crate. Merge and compaction are therefore their own small
//! snapshot producer: it writes the manifests (and compacted files), a manifest list and the
//! next metadata file, then swaps the table's `metadata_location` in the SQL catalog with the
//! same compare-and-set the catalog uses ([`CatalogRow`]). A concurrent commit makes the swap match no row: the
//! rewrite is then listed again on the new snapshot, keeping what was appended meanwhile and
//! reusing its compacted files (several sinks append every few seconds between them, so a
//! compaction of many files would otherwise never land); it is never written over the other
//! commit, and dropped (its files deleted) when another rewrite came first. The rewrite
//! snapshot is a `replace` that carries the newest Kafka checkpoints on its line, so the next
//! append finds them in the current snapshot whatever was expired.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use iceberg::{
    MetadataLocation,
    io::FileIO,
    spec::{
        MAIN_BRANCH, ManifestContentType, ManifestEntryRef, ManifestFile, ManifestListWriter, ManifestWriterBuilder,
        Operation, Snapshot, SnapshotReference, SnapshotRetention, Summary, TableMetadata, TableMetadataBuilder,
        TableMetadataRef,
    },
    table::Table,
    transaction::{ApplyTransactionAction, Transaction},
    util::snapshot::ancestors_of,
};

use crate::catalog::CatalogRow;
use crate::manifests::{file_count, hour_of, manifests_of, newest_hour, partition_key, single_partition};

/// How much history the table keeps.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Snapshots older than this are expired...
    pub snapshot_retention: Duration,
    /// ...except the newest this many.
    pub min_snapshots: usize,
    /// Beyond this many, the oldest are expired whatever their age, so that the metadata's size
    /// does not grow with the commit rate.
    pub max_snapshots: usize,
    /// Manifests written by appends are merged once more than this many wait.
    pub max_unmerged_manifests: usize,
    /// A closed `hour(ts)` partition (older than the newest) with more data files than this
    /// is compacted into files near the target size.
    pub max_files_per_partition: usize,
    /// Size compacted files roll over at.
    pub target_file_size: usize,
    /// Unreferenced files older than this are orphans, deleted by the sweep.
    pub orphan_age: Duration,
    /// A rewrite waits this long after its plan, before it writes and commits: zero but in
    /// tests of a slow maintenance (`--maintenance-delay`).
    pub delay: Duration,
}

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

/// A rewrite committed by [`rewrite_manifests`].
pub struct Rewrite {
    pub manifests_before: usize,
    pub manifests_after: usize,
    pub compacted_partitions: usize,
    /// Commits that came first, on each of which the rewrite was listed again.
    pub rebases: usize,
    pub table: Table,
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
        row: &CatalogRow,
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
        let (expired, table) = expire_snapshots(catalog, table, &Keep::of(policy, lineage)).await?;
        self.observe(&table);
        report.expired_snapshots = expired.len();
        report.deleted_files += delete_unreferenced(&table, &expired).await?;
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

/// Merges manifests so that each partition is listed by one manifest of its own, and compacts
/// closed partitions. Appends add a manifest each; once more than `max_unmerged_manifests` of
/// them wait, or a closed partition holds more than `max_files_per_partition` files, those
/// manifests and the merged manifests of the partitions they touch are rewritten as one
/// manifest per partition, the closed partitions' files compacted on the way. Partitions no
/// append touched keep their manifest, so a rewrite costs what was appended since the last
/// one, not the table's age. `None` when there was nothing to do or another commit came first.
pub async fn rewrite_manifests(
    catalog: &dyn iceberg::Catalog,
    row: &CatalogRow,
    table: &Table,
    policy: &Policy,
) -> anyhow::Result<Option<Rewrite>> {
    let metadata = table.metadata();
    let Some(current) = metadata.current_snapshot() else {
        return Ok(None);
    };
    let manifests = manifests_of(table, current).await?;
    let mut per_partition: HashMap<Vec<u8>, usize> = HashMap::new();
    for key in manifests.iter().filter_map(single_partition) {
        *per_partition.entry(key).or_default() += 1;
    }
    // Event time moves on: the partitions before the newest take (almost) no more readings. A
    // late one still lands there as a file of its own, compacted again later.
    let newest = manifests.iter().filter_map(newest_hour).max();
    let closed = |key: &[u8]| hour_of(key).zip(newest).is_some_and(|(hour, newest)| hour < newest);
    // Another engine's row-level deletes (Trino's and Spark's merge-on-read) apply to data files
    // of lower sequence numbers: a compacted file would get a higher one and bring the deleted
    // rows back. Hours with deletes are not compacted (merging keeps sequence numbers).
    let deleted = deleted_partitions(&manifests, table.file_io()).await?;
    let compactable = |key: &[u8]| closed(key) && !deleted.contains(&None) && !deleted.contains(&Some(key.to_vec()));
    let settled = |m: &ManifestFile| {
        m.content == ManifestContentType::Data && single_partition(m).is_some_and(|k| per_partition[&k] == 1)
    };
    let crowded = |m: &ManifestFile| {
        settled(m)
            && single_partition(m).is_some_and(|k| compactable(&k))
            && file_count(m) > policy.max_files_per_partition
    };
    let unsettled: Vec<&ManifestFile> = manifests
        .iter()
        .filter(|m| m.content == ManifestContentType::Data && !settled(m))
        .collect();
    if unsettled.len() <= policy.max_unmerged_manifests && !manifests.iter().any(crowded) {
        return Ok(None);
    }

    let file_io = table.file_io();
    // The manifests whose entries the rewrite lists anew: those waiting to be merged, the
    // crowded ones, and the merged manifests of the partitions those touch.
    let mut consumed: BTreeSet<String> = BTreeSet::new();
    let mut by_partition: ByPartition = BTreeMap::new();
    for manifest in unsettled.iter().copied().chain(manifests.iter().filter(|m| crowded(m))) {
        read_entries(manifest, file_io, &mut consumed, &mut by_partition).await?;
    }
    let rest: Vec<&ManifestFile> = manifests
        .iter()
        .filter(|m| !consumed.contains(&m.manifest_path))
        .collect();
    for manifest in rest {
        // Only data manifests are rewritten; delete manifests (no writer here makes any) stay.
        let touched = manifest.content == ManifestContentType::Data
            && single_partition(manifest).is_some_and(|k| by_partition.contains_key(&Some(k)));
        if touched {
            read_entries(manifest, file_io, &mut consumed, &mut by_partition).await?;
        }
    }
    // Compaction, the costly part, is done once; the listing is redone on each newer snapshot.
    let mut plan = Vec::new();
    let mut compacted_files = Vec::new();
    for (key, entries) in by_partition {
        let hour = key.as_deref().filter(|k| compactable(k)).and_then(hour_of);
        match hour.filter(|_| entries.len() > policy.max_files_per_partition) {
            Some(hour) => {
                let paths: Vec<String> = entries.iter().map(|e| e.file_path().to_owned()).collect();
                let files = crate::files::rewrite_partition(table, hour, &paths, policy.target_file_size).await?;
                compacted_files.extend(files.iter().map(|f| f.file_path().to_owned()));
                plan.push(Listing::Compacted(files));
            }
            None => plan.push(Listing::Kept(entries)),
        }
    }
    let compacted_partitions = plan.iter().filter(|l| matches!(l, Listing::Compacted(_))).count();
    tokio::time::sleep(policy.delay).await;
    let mut base = table.clone();
    for rebases in 0..MAX_REBASES {
        match list_rewrite(row, &base, &plan, &consumed).await? {
            Listed::Swapped { before, after } => {
                return Ok(Some(Rewrite {
                    manifests_before: before,
                    manifests_after: after,
                    compacted_partitions,
                    rebases,
                    table: catalog.load_table(table.identifier()).await?,
                }));
            }
            Listed::Conflict => base = catalog.load_table(table.identifier()).await?,
            Listed::Abandoned => break,
        }
    }
    tracing::info!("other commits kept coming first, or rewrote the manifests; the rewrite is retried later");
    for path in compacted_files {
        file_io.delete(&path).await?;
    }
    Ok(None)
}

/// The `kafka.*` summary properties of the newest snapshot back from `metadata`'s current one
/// that records Kafka checkpoints: what a maintenance snapshot carries, so that it records them
/// too. Copied from the current snapshot alone, they would be lost when the current one is
/// another engine's commit, and an expiry of everything older by that engine would then cut
/// the sink off from its checkpoints. Empty when the line of snapshots ends or breaks first.
fn checkpoints_of(metadata: &TableMetadataRef) -> HashMap<String, String> {
    metadata
        .current_snapshot_id()
        .and_then(|current| {
            ancestors_of(metadata, current)
                .find_map(|snapshot| crate::summary::checkpoint_properties(&snapshot.summary().additional_properties))
        })
        .unwrap_or_default()
}

/// The partitions the live delete files of `manifests` apply to (`None`: a delete file whose
/// partition is not an hour, which may apply anywhere).
async fn deleted_partitions(manifests: &[ManifestFile], file_io: &FileIO) -> anyhow::Result<BTreeSet<Option<Vec<u8>>>> {
    let mut partitions = BTreeSet::new();
    for manifest in manifests.iter().filter(|m| m.content == ManifestContentType::Deletes) {
        let (entries, _) = manifest.load_manifest(file_io).await?.into_parts();
        partitions.extend(entries.iter().filter(|e| e.is_alive()).map(partition_key));
    }
    Ok(partitions)
}

/// Live manifest entries by `hour(ts)` partition key.
type ByPartition = BTreeMap<Option<Vec<u8>>, Vec<ManifestEntryRef>>;

/// Reads the live entries of `manifest` into `by_partition` and notes it as `consumed` by the
/// rewrite.
async fn read_entries(
    manifest: &ManifestFile,
    file_io: &FileIO,
    consumed: &mut BTreeSet<String>,
    by_partition: &mut ByPartition,
) -> anyhow::Result<()> {
    consumed.insert(manifest.manifest_path.clone());
    let (entries, _) = manifest.load_manifest(file_io).await?.into_parts();
    for entry in entries.into_iter().filter(|e| e.is_alive()) {
        by_partition.entry(partition_key(&entry)).or_default().push(entry);
    }
    Ok(())
}

/// Snapshots a rewrite is listed on before it is given up (each only costs its listing: the
/// compaction is kept). Appends come every few seconds per sink, so a compaction that takes
/// longer than that meets one almost always.
const MAX_REBASES: usize = 20;

/// How a rewrite lists one partition's files.
enum Listing {
    /// Files written by compaction, added by the rewrite snapshot.
    Compacted(Vec<iceberg::spec::DataFile>),
    /// Files listed before, kept with their snapshot and sequence numbers.
    Kept(Vec<ManifestEntryRef>),
}

/// What [`list_rewrite`] came to.
enum Listed {
    Swapped {
        before: usize,
        after: usize,
    },
    /// Another commit came first: list again on it.
    Conflict,
    /// A manifest the plan read is gone (another rewrite): the plan no longer fits.
    Abandoned,
}

/// Writes the rewrite's manifests, manifest list and metadata on the current snapshot of
/// `base` and swaps the table to them. The manifests the plan read (`consumed`) are replaced;
/// every other manifest of `base`, among them those appended since the plan was made, stays as
/// it is. The snapshot carries `base`'s Kafka checkpoints, the newest (see [`checkpoints_of`]).
async fn list_rewrite(
    row: &CatalogRow,
    base: &Table,
    plan: &[Listing],
    consumed: &BTreeSet<String>,
) -> anyhow::Result<Listed> {
    let metadata = base.metadata();
    let (Some(current), Some(old_location)) = (metadata.current_snapshot(), base.metadata_location()) else {
        return Ok(Listed::Abandoned);
    };
    let manifests = manifests_of(base, current).await?;
    let present: BTreeSet<&str> = manifests.iter().map(|m| m.manifest_path.as_str()).collect();
    if !consumed.iter().all(|p| present.contains(p.as_str())) {
        return Ok(Listed::Abandoned);
    }
    let others: Vec<ManifestFile> = manifests
        .iter()
        .filter(|m| !consumed.contains(&m.manifest_path))
        .cloned()
        .collect();
    let snapshot_id = new_snapshot_id(metadata);
    let sequence_number = metadata.next_sequence_number();
    let schema = metadata.current_schema().clone();
    let spec = metadata.default_partition_spec().as_ref().clone();
    let file_io = base.file_io();
    let metadata_dir = format!("{}/metadata", metadata.location());
    let mut written = Vec::new();
    let mut merged = Vec::new();
    for (i, listing) in plan.iter().enumerate() {
        let path = format!("{metadata_dir}/{}-m{i}.avro", uuid::Uuid::new_v4());
        written.push(path.clone());
        let mut writer = ManifestWriterBuilder::new(
            file_io.new_output(&path)?,
            Some(snapshot_id),
            schema.clone(),
            spec.clone(),
        )
        .build_v2_data();
        match listing {
            Listing::Compacted(files) => {
                for file in files {
                    writer.add_file(file.clone(), sequence_number)?;
                }
            }
            Listing::Kept(entries) => {
                for entry in entries {
                    let (Some(added_by), Some(sequence)) = (entry.snapshot_id(), entry.sequence_number()) else {
                        anyhow::bail!(
                            "manifest entry of {} without snapshot or sequence number",
                            entry.file_path()
                        );
                    };
                    writer.add_existing_file(
                        entry.data_file().clone(),
                        added_by,
                        sequence,
                        entry.file_sequence_number,
                    )?;
                }
            }
        }
        merged.push(writer.write_manifest_file().await?);
    }
    let after = merged.len() + others.len();

    let list_path = format!("{metadata_dir}/snap-{snapshot_id}-0-{}.avro", uuid::Uuid::new_v4());
    written.push(list_path.clone());
    let mut list = ManifestListWriter::v2(
        file_io.new_output(&list_path)?.writer().await?,
        snapshot_id,
        Some(current.snapshot_id()),
        sequence_number,
    );
    list.add_manifests(merged.into_iter().chain(others))?;
    list.close().await?;

    // The same rows as before; the Kafka checkpoints travel with the table's state.
    let mut properties = checkpoints_of(&base.metadata_ref());
    if let Some(total) = current.summary().additional_properties.get("total-records") {
        properties.insert("total-records".into(), total.clone());
    }
    let snapshot = Snapshot::builder()
        .with_snapshot_id(snapshot_id)
        .with_parent_snapshot_id(Some(current.snapshot_id()))
        .with_sequence_number(sequence_number)
        .with_timestamp_ms(chrono::Utc::now().timestamp_millis())
        .with_manifest_list(list_path)
        .with_summary(Summary {
            operation: Operation::Replace,
            additional_properties: properties,
        })
        .with_schema_id(metadata.current_schema_id())
        .build();
    let next = TableMetadataBuilder::new_from_metadata(metadata.clone(), Some(old_location.to_owned()))
        .add_snapshot(snapshot)?
        .set_ref(
            MAIN_BRANCH,
            SnapshotReference::new(snapshot_id, SnapshotRetention::branch(None, None, None)),
        )?
        .build()?
        .metadata;
    // A file of its own (the next version, a new uuid), as the catalog's commit names it: the
    // compare-and-set below is on this name, and the metadata file it replaces stays as it was
    // for whoever loaded it.
    let location = MetadataLocation::from_str(old_location)?
        .with_next_version()
        .with_new_metadata(&next);
    let new_location = location.to_string();
    written.push(new_location.clone());
    next.write_to(file_io, &location).await?;

    if !row.swap(base, old_location, &new_location).await? {
        tracing::debug!("another commit came first; the manifest rewrite is listed again on it");
        for path in written {
            file_io.delete(&path).await?;
        }
        return Ok(Listed::Conflict);
    }
    Ok(Listed::Swapped {
        before: manifests.len(),
        after,
    })
}

/// A snapshot id not used by the table yet.
fn new_snapshot_id(metadata: &TableMetadata) -> i64 {
    loop {
        let id = (uuid::Uuid::new_v4().as_u64_pair().0 & i64::MAX as u64) as i64;
        if id != 0 && metadata.snapshot_by_id(id).is_none() {
            return id;
        }
    }
}

/// Which snapshots an expiry keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Keep {
    /// Younger than this: kept, up to `most`.
    retention: Duration,
    /// The newest this many ancestors of the current snapshot, whatever their age and `most`.
    newest: usize,
    /// Kept at most, as long as `newest` allows.
    most: usize,
}

impl Keep {
    /// `policy`'s limits, with the newest `lineage` snapshots kept: the line back to the
    /// snapshot that records the Kafka checkpoints, which the next commit walks.
    fn of(policy: &Policy, lineage: usize) -> Self {
        Self {
            retention: policy.snapshot_retention,
            newest: policy.min_snapshots.max(lineage).max(1),
            most: policy.max_snapshots,
        }
    }

    /// What to give iceberg's expiry for a table of `snapshots`: the cutoff age and how many of
    /// the current snapshot's ancestors to keep regardless. `None`: nothing to expire.
    fn plan(&self, snapshots: usize, expirable_by_age: usize) -> Option<(Option<Duration>, usize)> {
        if snapshots <= self.newest {
            return None;
        }
        if snapshots > self.most.max(self.newest) {
            // Over the count: everything but the newest `most` (or `newest`, if more) goes.
            return Some((None, self.most.max(self.newest)));
        }
        (expirable_by_age > 0).then_some((Some(self.retention), self.newest))
    }
}

/// Expires snapshots as `keep` says. Returns the snapshots expired (as they were) and the table
/// afterwards.
async fn expire_snapshots(
    catalog: &dyn iceberg::Catalog,
    table: Table,
    keep: &Keep,
) -> anyhow::Result<(Vec<Arc<Snapshot>>, Table)> {
    let now = chrono::Utc::now();
    let cutoff = |age: Duration| {
        let age = chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
        now.checked_sub_signed(age).map_or(0, |t| t.timestamp_millis())
    };
    let by_age = cutoff(keep.retention);
    let snapshots = table.metadata().snapshots().len();
    let expirable = table
        .metadata()
        .snapshots()
        .filter(|s| s.timestamp_ms() < by_age)
        .count();
    let Some((age, newest)) = keep.plan(snapshots, expirable) else {
        return Ok((Vec::new(), table));
    };
    let before: Vec<Arc<Snapshot>> = table.metadata().snapshots().cloned().collect();
    let transaction = Transaction::new(&table);
    let action = transaction
        .expire_snapshots()
        // Over the count: every snapshot older than now, beyond the newest kept.
        .expire_older_than_ms(age.map_or(now.timestamp_millis() + 1, cutoff))
        .retain_last(newest);
    let table = action.apply(transaction)?.commit(catalog).await?;
    let expired = before
        .into_iter()
        .filter(|s| table.metadata().snapshot_by_id(s.snapshot_id()).is_none())
        .collect();
    Ok((expired, table))
}

/// Deletes the manifest lists of `expired` snapshots, the manifests only they listed and the
/// data files only those manifests listed (files compacted away). History is linear and a
/// manifest or data file, once rewritten away, never comes back, so one is still needed
/// exactly when the oldest retained snapshot lists it (or it is newer than that).
async fn delete_unreferenced(table: &Table, expired: &[Arc<Snapshot>]) -> anyhow::Result<usize> {
    if expired.is_empty() {
        return Ok(0);
    }
    let metadata = table.metadata();
    let Some(oldest) = metadata.snapshots().min_by_key(|s| s.sequence_number()) else {
        return Ok(0);
    };
    let kept = manifests_of(table, oldest).await?;
    let kept_manifests: BTreeSet<&str> = kept.iter().map(|m| m.manifest_path.as_str()).collect();
    let mut doomed_manifests = BTreeSet::new();
    let mut doomed = Vec::new();
    for snapshot in expired {
        for manifest in manifests_of(table, snapshot).await? {
            if !kept_manifests.contains(manifest.manifest_path.as_str())
                && doomed_manifests.insert(manifest.manifest_path.clone())
            {
                doomed.push(manifest);
            }
        }
    }
    let mut files = BTreeSet::new();
    for manifest in &doomed {
        let (entries, _) = manifest.load_manifest(table.file_io()).await?.into_parts();
        files.extend(entries.iter().map(|e| e.file_path().to_owned()));
    }
    if !files.is_empty() {
        for manifest in &kept {
            let (entries, _) = manifest.load_manifest(table.file_io()).await?.into_parts();
            for entry in entries.iter().filter(|e| e.is_alive()) {
                files.remove(entry.file_path());
            }
        }
    }
    let lists = expired.iter().map(|s| s.manifest_list().to_owned());
    let paths: Vec<String> = files.into_iter().chain(doomed_manifests).chain(lists).collect();
    for path in &paths {
        table.file_io().delete(path).await?;
    }
    Ok(paths.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keep(newest: usize, most: usize) -> Keep {
        Keep {
            retention: Duration::from_secs(3600),
            newest,
            most,
        }
    }

    #[test]
    fn expiry_by_age_keeps_the_newest() {
        assert_eq!(keep(10, 500).plan(100, 30), Some((Some(Duration::from_secs(3600)), 10)));
        assert_eq!(keep(10, 500).plan(100, 0), None, "nothing old enough");
        assert_eq!(keep(10, 500).plan(10, 10), None, "no more than the newest kept");
    }

    #[test]
    fn too_many_snapshots_are_expired_whatever_their_age() {
        assert_eq!(keep(10, 500).plan(501, 0), Some((None, 500)));
        assert_eq!(keep(10, 500).plan(500, 0), None);
    }

    #[test]
    fn the_line_to_the_recorded_checkpoints_is_kept_beyond_every_limit() {
        let policy = Policy {
            snapshot_retention: Duration::from_secs(3600),
            min_snapshots: 10,
            max_snapshots: 500,
            max_unmerged_manifests: 20,
            max_files_per_partition: 4,
            target_file_size: 1 << 20,
            orphan_age: Duration::from_secs(86400),
            delay: Duration::ZERO,
        };
        let deep = Keep::of(&policy, 700);
        assert_eq!(deep.newest, 700);
        assert_eq!(deep.plan(800, 800), Some((None, 700)));
        assert_eq!(deep.plan(700, 700), None);
        assert_eq!(Keep::of(&policy, 2).newest, 10);
    }
}
