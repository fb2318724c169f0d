//! What a snapshot's manifests say: their partitions (as `hour(ts)` hours), how many files they
//! list, and the manifests themselves.

use iceberg::{
    spec::{Literal, ManifestEntryRef, ManifestFile, PrimitiveLiteral, SnapshotRef},
    table::Table,
};

/// The `hour(ts)` partition of a data file; `None` for other layouts.
pub fn entry_hour(entry: &ManifestEntryRef) -> Option<i32> {
    match entry.data_file().partition().fields().first() {
        Some(Some(Literal::Primitive(PrimitiveLiteral::Int(hour)))) => Some(*hour),
        _ => None,
    }
}

/// The partition of a data file, as the bytes of its hour (Iceberg's single-value encoding of
/// an int, as in manifest summaries); `None` for other layouts, which are merged into one
/// manifest.
pub fn partition_key(entry: &ManifestEntryRef) -> Option<Vec<u8>> {
    entry_hour(entry).map(|hour| hour.to_le_bytes().to_vec())
}

/// The one partition a manifest lists files of, by its partition summary, in the same bytes
/// as [`partition_key`] (Iceberg's single-value encoding of an int).
pub fn single_partition(manifest: &ManifestFile) -> Option<Vec<u8>> {
    match manifest.partitions.as_deref() {
        Some([field]) if !field.contains_null => match (&field.lower_bound, &field.upper_bound) {
            (Some(lower), Some(upper)) if lower == upper && lower.len() == 4 => Some(lower.to_vec()),
            _ => None,
        },
        _ => None,
    }
}

/// The manifests `snapshot` lists.
pub async fn manifests_of(table: &Table, snapshot: &SnapshotRef) -> iceberg::Result<Vec<ManifestFile>> {
    let list = table.manifest_list_reader(snapshot).load().await?;
    Ok(list.consume_entries().into_iter().collect())
}

/// The hour a [`partition_key`] names.
pub fn hour_of(key: &[u8]) -> Option<i32> {
    Some(i32::from_le_bytes(key.try_into().ok()?))
}

/// The newest hour a manifest lists files of, by its partition summary.
pub fn newest_hour(manifest: &ManifestFile) -> Option<i32> {
    match manifest.partitions.as_deref() {
        Some([field]) => hour_of(field.upper_bound.as_deref()?),
        _ => None,
    }
}

/// Live data files a manifest lists.
pub fn file_count(manifest: &ManifestFile) -> usize {
    (manifest.added_files_count.unwrap_or(0) + manifest.existing_files_count.unwrap_or(0)) as usize
}
