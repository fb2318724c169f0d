//! The orphan sweep: files under the table's location that no retained snapshot and no listed
//! metadata version references, older than a safety margin. They are what a sink leaves when
//! it dies between writing files and committing them, and metadata versions that left the log
//! while no sink was running maintenance. `iceberg` 0.10.1's FileIO cannot list, so the
//! listing uses the object store (opendal) directly, configured like the table's FileIO.

use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, SystemTime},
};

use anyhow::Context;
use iceberg::table::Table;
use opendal::{Operator, services};

use crate::manifests::manifests_of;

/// Every file the table's retained state references: metadata versions in the log, manifest
/// lists, manifests and data files of every retained snapshot.
async fn referenced(table: &Table) -> anyhow::Result<BTreeSet<String>> {
    let metadata = table.metadata();
    let mut paths: BTreeSet<String> = metadata
        .metadata_log()
        .iter()
        .map(|e| e.metadata_file.clone())
        .collect();
    paths.extend(table.metadata_location().map(str::to_owned));
    for snapshot in metadata.snapshots() {
        paths.insert(snapshot.manifest_list().to_owned());
        for manifest in manifests_of(table, snapshot).await? {
            // Manifests are shared between snapshots: read each once.
            if paths.insert(manifest.manifest_path.clone()) {
                let (entries, _) = manifest.load_manifest(table.file_io()).await?.into_parts();
                paths.extend(entries.iter().map(|e| e.file_path().to_owned()));
            }
        }
    }
    Ok(paths)
}

/// The object store under `location` (`s3://bucket/…` or `file:///…`), and how its listed
/// paths become URLs again.
fn operator(location: &str, storage: &HashMap<String, String>) -> anyhow::Result<(Operator, String, String)> {
    if let Some(path) = location.strip_prefix("file://") {
        let operator = Operator::new(services::Fs::default().root("/"))?.finish();
        return Ok((operator, path.trim_start_matches('/').to_owned(), "file:///".to_owned()));
    }
    let rest = location
        .strip_prefix("s3://")
        .or_else(|| location.strip_prefix("s3a://"))
        .with_context(|| format!("no listing for {location}"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let mut builder = services::S3::default().bucket(bucket).root("/").disable_config_load();
    let get = |key: &str| storage.get(key).map(String::as_str);
    if let Some(endpoint) = get("s3.endpoint") {
        builder = builder.endpoint(endpoint).disable_ec2_metadata();
    }
    if let Some(region) = get("s3.region") {
        builder = builder.region(region);
    }
    if let (Some(key), Some(secret)) = (get("s3.access-key-id"), get("s3.secret-access-key")) {
        builder = builder.access_key_id(key).secret_access_key(secret);
    }
    if get("s3.path-style-access") == Some("false") {
        builder = builder.enable_virtual_host_style();
    }
    Ok((
        Operator::new(builder)?.finish(),
        prefix.to_owned(),
        format!("s3://{bucket}/"),
    ))
}

/// Deletes the files under the table's location that nothing references and that are older
/// than `min_age`; returns how many.
pub async fn sweep(table: &Table, storage: &HashMap<String, String>, min_age: Duration) -> anyhow::Result<usize> {
    let referenced = referenced(table).await?;
    let (operator, prefix, scheme) = operator(table.metadata().location(), storage)?;
    let cutoff = SystemTime::now() - min_age;
    let listed = operator
        .list_with(&format!("{}/", prefix.trim_end_matches('/')))
        .recursive(true)
        .await?;
    let mut deleted = 0;
    for entry in listed {
        if entry.metadata().is_dir() {
            continue;
        }
        let url = format!("{scheme}{}", entry.path());
        if referenced.contains(&url) {
            continue;
        }
        let modified = match entry.metadata().last_modified() {
            Some(time) => SystemTime::from(time),
            None => operator
                .stat(entry.path())
                .await?
                .last_modified()
                .map_or(SystemTime::now(), SystemTime::from),
        };
        if modified < cutoff {
            table.file_io().delete(&url).await?;
            deleted += 1;
        }
    }
    Ok(deleted)
}
