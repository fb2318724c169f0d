//! Carries out an expiry: iceberg's own `expire_snapshots` as [`Keep`] plans it, then the
//! deletion of the files only the expired snapshots referenced, which iceberg 0.10.1's expiry
//! leaves behind.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use iceberg::{
    spec::Snapshot,
    table::Table,
    transaction::{ApplyTransactionAction, Transaction},
};

use super::plan::Keep;
use crate::manifests::manifests_of;

/// Expires snapshots as `keep` says. Returns the snapshots expired (as they were) and the table
/// afterwards.
pub async fn expire_snapshots(
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
pub async fn delete_unreferenced(table: &Table, expired: &[Arc<Snapshot>]) -> anyhow::Result<usize> {
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
