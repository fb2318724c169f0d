//! Table maintenance, run by the sink between its commits so that the table's metadata stays
//! bounded however long it runs: the current snapshot's manifests are merged into one per
//! `hour(ts)` partition, snapshots past their retention are expired, and the files only they
//! referenced (manifest lists, manifests, old metadata versions) are deleted.
//!
//! `iceberg` 0.10.1 can expire snapshots but has no manifest rewrite, and its `TableCommit`
//! cannot be built outside the crate. The merge is therefore its own small snapshot producer:
//! it writes the merged manifests, a manifest list and the next metadata file, then swaps the
//! table's `metadata_location` in the SQL catalog with the same compare-and-set the catalog
//! uses. A concurrent commit makes the swap match no row: the merge is dropped (its files
//! deleted) and tried again next time, never written over the other commit. The merge snapshot
//! is a `replace` that carries the Kafka checkpoints of the snapshot it replaces, so the next
//! append finds them in the current snapshot whatever was expired.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use iceberg::{
    MetadataLocation,
    spec::{
        Literal, MAIN_BRANCH, ManifestContentType, ManifestEntryRef, ManifestFile, ManifestListWriter,
        ManifestWriterBuilder, Operation, PrimitiveLiteral, Snapshot, SnapshotReference, SnapshotRetention, Summary,
        TableMetadata, TableMetadataBuilder,
    },
    table::Table,
    transaction::{ApplyTransactionAction, Transaction},
};

/// How much history the table keeps.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Snapshots older than this are expired...
    pub snapshot_retention: Duration,
    /// ...except the newest this many.
    pub min_snapshots: usize,
    /// Manifests written by appends are merged once more than this many wait.
    pub max_unmerged_manifests: usize,
}

/// What one maintenance run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Manifests before and after a merge.
    pub merged: Option<(usize, usize)>,
    pub expired_snapshots: usize,
    pub deleted_files: usize,
}

/// Where the catalog keeps the table's current metadata file, for the compare-and-set.
pub struct CatalogRow {
    pub pool: sqlx::AnyPool,
    /// `$1`-style placeholders (PostgreSQL) rather than `?` (SQLite).
    pub numbered: bool,
    pub catalog_name: String,
}

impl CatalogRow {
    pub async fn connect(url: &str, catalog_name: &str) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .context("connecting to the catalog database")?;
        Ok(Self {
            pool,
            numbered: !url.starts_with("sqlite:"),
            catalog_name: catalog_name.to_owned(),
        })
    }

    /// Points the table at `new` if it still points at `old`; false when another commit came
    /// first.
    async fn swap(&self, table: &Table, old: &str, new: &str) -> anyhow::Result<bool> {
        let mut sql = "UPDATE iceberg_tables SET metadata_location = ?, previous_metadata_location = ? \
                       WHERE catalog_name = ? AND table_namespace = ? AND table_name = ? AND metadata_location = ?"
            .to_owned();
        if self.numbered {
            for n in 1..=6 {
                sql = sql.replacen('?', &format!("${n}"), 1);
            }
        }
        let ident = table.identifier();
        let done = sqlx::query(&sql)
            .bind(new)
            .bind(old)
            .bind(&self.catalog_name)
            .bind(ident.namespace().join("."))
            .bind(ident.name())
            .bind(old)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// State kept between runs: the metadata files seen, so that those dropped from the table's
/// metadata log since can be deleted.
#[derive(Default)]
pub struct Maintenance {
    known_metadata: BTreeSet<String>,
}

impl Maintenance {
    /// One run on `table` (freshly loaded); returns the table as it is afterwards.
    pub async fn run(
        &mut self,
        catalog: &dyn iceberg::Catalog,
        row: &CatalogRow,
        mut table: Table,
        policy: &Policy,
    ) -> anyhow::Result<(Table, Report)> {
        let mut report = Report::default();
        if let Some((before, after, merged)) =
            merge_manifests(catalog, row, &table, policy.max_unmerged_manifests).await?
        {
            report.merged = Some((before, after));
            table = merged;
        }
        let (expired, table) = expire_snapshots(catalog, table, policy).await?;
        report.expired_snapshots = expired.len();
        report.deleted_files += delete_unreferenced(&table, &expired).await?;
        report.deleted_files += self.delete_old_metadata(&table).await?;
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

/// Merges manifests so that each partition is listed by one manifest of its own. Appends add
/// a manifest each; once more than `max_unmerged` of them wait, they and the merged manifests
/// of the partitions they touch are rewritten as one manifest per partition. Partitions no
/// append touched keep their manifest, so a merge costs what was appended since the last one,
/// not the table's age. Returns the manifest counts and the table after the merge, or `None`
/// when nothing was merged (few waiting, or another commit came first).
pub async fn merge_manifests(
    catalog: &dyn iceberg::Catalog,
    row: &CatalogRow,
    table: &Table,
    max_unmerged: usize,
) -> anyhow::Result<Option<(usize, usize, Table)>> {
    let metadata = table.metadata();
    let Some(current) = metadata.current_snapshot() else {
        return Ok(None);
    };
    let old_location = table.metadata_location().context("table without metadata location")?;
    let manifests: Vec<ManifestFile> = table
        .manifest_list_reader(current)
        .load()
        .await?
        .consume_entries()
        .into_iter()
        .collect();
    let mut per_partition: HashMap<Vec<u8>, usize> = HashMap::new();
    for key in manifests.iter().filter_map(single_partition) {
        *per_partition.entry(key).or_default() += 1;
    }
    let settled = |m: &ManifestFile| {
        m.content == ManifestContentType::Data && single_partition(m).is_some_and(|k| per_partition[&k] == 1)
    };
    let unsettled: Vec<&ManifestFile> = manifests
        .iter()
        .filter(|m| m.content == ManifestContentType::Data && !settled(m))
        .collect();
    if unsettled.len() <= max_unmerged {
        return Ok(None);
    }

    let snapshot_id = new_snapshot_id(metadata);
    let sequence_number = metadata.next_sequence_number();
    let schema = metadata.current_schema().clone();
    let spec = metadata.default_partition_spec().as_ref().clone();
    let file_io = table.file_io();
    let metadata_dir = format!("{}/metadata", metadata.location());
    let mut by_partition: BTreeMap<Option<Vec<u8>>, Vec<ManifestEntryRef>> = BTreeMap::new();
    for manifest in &unsettled {
        let (entries, _) = manifest.load_manifest(file_io).await?.into_parts();
        for entry in entries.into_iter().filter(|e| e.is_alive()) {
            by_partition.entry(partition_key(&entry)).or_default().push(entry);
        }
    }
    // The merged manifests of the partitions touched join the merge; the others stay.
    let mut others = Vec::new();
    for manifest in manifests
        .iter()
        .filter(|m| m.content != ManifestContentType::Data || settled(m))
    {
        let touched = single_partition(manifest).is_some_and(|k| by_partition.contains_key(&Some(k)));
        if !touched {
            others.push(manifest.clone());
            continue;
        }
        let (entries, _) = manifest.load_manifest(file_io).await?.into_parts();
        for entry in entries.into_iter().filter(|e| e.is_alive()) {
            by_partition.entry(partition_key(&entry)).or_default().push(entry);
        }
    }
    let mut written = Vec::new();
    let mut merged = Vec::new();
    for (i, entries) in by_partition.into_values().enumerate() {
        let path = format!("{metadata_dir}/{}-m{i}.avro", uuid::Uuid::new_v4());
        written.push(path.clone());
        let mut writer = ManifestWriterBuilder::new(
            file_io.new_output(&path)?,
            Some(snapshot_id),
            schema.clone(),
            spec.clone(),
        )
        .build_v2_data();
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

    // Same totals as before; the Kafka checkpoints travel with the table's state.
    let mut properties: HashMap<String, String> = current.summary().additional_properties.clone();
    properties.retain(|k, _| k.starts_with("kafka.") || k.starts_with("total-"));
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
    let location = MetadataLocation::from_str(old_location)?.with_new_metadata(&next);
    let new_location = location.to_string();
    written.push(new_location.clone());
    next.write_to(file_io, &location).await?;

    if !row.swap(table, old_location, &new_location).await? {
        tracing::info!("another commit came first; the manifest merge is retried later");
        for path in written {
            file_io.delete(&path).await?;
        }
        return Ok(None);
    }
    let table = catalog.load_table(table.identifier()).await?;
    Ok(Some((manifests.len(), after, table)))
}

/// The partition of a data file, as the bytes of its first partition value (the `hour(ts)`
/// of this table); `None` for other layouts, which are merged into one manifest.
fn partition_key(entry: &ManifestEntryRef) -> Option<Vec<u8>> {
    match entry.data_file().partition().fields().first() {
        Some(Some(Literal::Primitive(PrimitiveLiteral::Int(hour)))) => Some(hour.to_le_bytes().to_vec()),
        _ => None,
    }
}

/// The one partition a manifest lists files of, by its partition summary, in the same bytes
/// as [`partition_key`] (Iceberg's single-value encoding of an int).
fn single_partition(manifest: &ManifestFile) -> Option<Vec<u8>> {
    match manifest.partitions.as_deref() {
        Some([field]) if !field.contains_null => match (&field.lower_bound, &field.upper_bound) {
            (Some(lower), Some(upper)) if lower == upper && lower.len() == 4 => Some(lower.to_vec()),
            _ => None,
        },
        _ => None,
    }
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

/// Expires snapshots older than the retention, keeping at least the newest `min_snapshots`.
/// Returns the snapshots expired (as they were) and the table afterwards.
async fn expire_snapshots(
    catalog: &dyn iceberg::Catalog,
    table: Table,
    policy: &Policy,
) -> anyhow::Result<(Vec<Arc<Snapshot>>, Table)> {
    let retention = chrono::Duration::from_std(policy.snapshot_retention).unwrap_or(chrono::Duration::MAX);
    let cutoff = chrono::Utc::now()
        .checked_sub_signed(retention)
        .map_or(0, |t| t.timestamp_millis());
    let expirable = table
        .metadata()
        .snapshots()
        .filter(|s| s.timestamp_ms() < cutoff)
        .count();
    if expirable == 0 || table.metadata().snapshots().len() <= policy.min_snapshots {
        return Ok((Vec::new(), table));
    }
    let before: Vec<Arc<Snapshot>> = table.metadata().snapshots().cloned().collect();
    let transaction = Transaction::new(&table);
    let action = transaction
        .expire_snapshots()
        .expire_older_than_ms(cutoff)
        .retain_last(policy.min_snapshots.max(1));
    let table = action.apply(transaction)?.commit(catalog).await?;
    let expired = before
        .into_iter()
        .filter(|s| table.metadata().snapshot_by_id(s.snapshot_id()).is_none())
        .collect();
    Ok((expired, table))
}

/// Deletes the manifest lists of `expired` snapshots and the manifests that only they listed.
/// History is linear and a manifest, once merged away, never comes back, so a manifest is
/// still needed exactly when the oldest retained snapshot lists it (or it is newer than that).
async fn delete_unreferenced(table: &Table, expired: &[Arc<Snapshot>]) -> anyhow::Result<usize> {
    if expired.is_empty() {
        return Ok(0);
    }
    let metadata = table.metadata();
    let Some(oldest) = metadata.snapshots().min_by_key(|s| s.sequence_number()) else {
        return Ok(0);
    };
    let keep: BTreeSet<String> = table
        .manifest_list_reader(oldest)
        .load()
        .await?
        .consume_entries()
        .into_iter()
        .map(|m| m.manifest_path)
        .collect();
    let mut doomed = BTreeSet::new();
    for snapshot in expired {
        let list = table.manifest_list_reader(snapshot).load().await?;
        for manifest in list.consume_entries() {
            if !keep.contains(&manifest.manifest_path) {
                doomed.insert(manifest.manifest_path);
            }
        }
        doomed.insert(snapshot.manifest_list().to_owned());
    }
    for path in &doomed {
        table.file_io().delete(path).await?;
    }
    Ok(doomed.len())
}
