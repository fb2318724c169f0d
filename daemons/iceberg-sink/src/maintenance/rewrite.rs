//! Carries out a planned manifest rewrite ([`RewritePlan`]): reads the entries of the
//! manifests it names, compacts the partitions it says, and commits the result as a `replace`
//! snapshot of its own.
//!
//! `iceberg` 0.10.1 has no manifest rewrite, and its `TableCommit` cannot be built outside the
//! crate, so this is a small snapshot producer of its own: it writes the manifests (and
//! compacted files), a manifest list and the next metadata file, then swaps the table's
//! `metadata_location` in the SQL catalog with the compare-and-set the catalog uses
//! ([`crate::catalog::swap`]). It can go once iceberg-rust ships a `rewrite_manifests`/`rewrite_files`
//! action that takes a caller's snapshot summary.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    str::FromStr,
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
    util::snapshot::ancestors_of,
};

use super::plan::{Manifest, Partitions, Policy, RewritePlan};
use crate::catalog::swap;
use crate::manifests::{manifests_of, partition_key};
use weather_common::{file_totals::FileTotals, lakehouse::CatalogRows};

/// A rewrite committed by [`rewrite_manifests`].
pub struct Rewrite {
    pub manifests_before: usize,
    pub manifests_after: usize,
    pub compacted_partitions: usize,
    /// Commits that came first, on each of which the rewrite was listed again.
    pub rebases: usize,
    pub table: Table,
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
    row: &CatalogRows,
    table: &Table,
    policy: &Policy,
) -> anyhow::Result<Option<Rewrite>> {
    let metadata = table.metadata();
    let Some(current) = metadata.current_snapshot() else {
        return Ok(None);
    };
    let manifests = manifests_of(table, current).await?;
    let listed: Vec<Manifest> = manifests.iter().map(Manifest::of).collect();
    let file_io = table.file_io();
    let deleted = deleted_partitions(&manifests, file_io).await?;
    let Some(rewrite) = RewritePlan::new(&listed, deleted, policy) else {
        return Ok(None);
    };
    let by_path: HashMap<&str, &ManifestFile> = manifests.iter().map(|m| (m.manifest_path.as_str(), m)).collect();
    // The manifests whose entries the rewrite lists anew: those the plan names first, and the
    // merged manifests of the partitions their entries touch.
    let mut consumed: BTreeSet<String> = BTreeSet::new();
    let mut by_partition: ByPartition = BTreeMap::new();
    for path in &rewrite.first {
        read_entries(by_path[path.as_str()], file_io, &mut consumed, &mut by_partition).await?;
    }
    let partitions: Partitions = by_partition.keys().cloned().collect();
    for path in rewrite.touched(&listed, &partitions) {
        read_entries(by_path[path], file_io, &mut consumed, &mut by_partition).await?;
    }
    // Compaction, the costly part, is done once; the listing is redone on each newer snapshot.
    let mut plan = Vec::new();
    let mut compacted_files = Vec::new();
    for (key, entries) in by_partition {
        match rewrite.compaction(key.as_deref(), entries.len()) {
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
            ancestors_of(metadata, current).find_map(|snapshot| {
                weather_common::snapshot_summary::checkpoint_properties(&snapshot.summary().additional_properties)
            })
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
    row: &CatalogRows,
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
    let totals = FileTotals::counted(merged.iter().chain(&others));

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

    // The same rows as before; the Kafka checkpoints travel with the table's state. The file
    // totals are what readers show and count against (Trino's `$snapshots`, the query-server).
    let mut properties = checkpoints_of(&base.metadata_ref());
    if let Some(total) = current.summary().additional_properties.get("total-records") {
        properties.insert("total-records".into(), total.clone());
    }
    properties.extend(totals.iter().flat_map(FileTotals::properties));
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

    if !swap(row, base, old_location, &new_location).await? {
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
