//! Many commits quickly, to see whether a long-running table stays healthy: the iceberg-sink's
//! table code appends small batches back to back (each a snapshot, as the sink's commit
//! interval makes them) on a directory warehouse with a PostgreSQL catalog, runs the sink's
//! maintenance every `--soak-maintenance-every` commits, and reports per 1,000 commits the
//! commit time, the metadata's size, the table's files, and how long PyIceberg takes to read
//! the whole table (a fresh Python process each time, about 1 s of it start-up).

use std::{collections::HashMap, path::Path, time::Instant};

use chrono::{DateTime, TimeDelta, Utc};
use iceberg_sink::{maintenance::Policy, table::WeatherTable};
use weather_common::{
    WeatherReading,
    consumer::{Checkpoint, Checkpoints},
    lakehouse::CatalogConfig,
    reading::DEMO_CITIES,
};
use weather_testkit::Postgres;

use crate::{Args, Row};

/// Event time between two commits: the sink's default commit interval.
const EVENT_TIME_PER_COMMIT: TimeDelta = TimeDelta::seconds(10);
/// Readings per commit: the weather-client's 10 readings per 5 s, over 10 s.
const READINGS_PER_COMMIT: usize = 20;

pub(crate) async fn benchmark(args: &Args, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let postgres = Postgres::start()?;
    let catalog_url = postgres.create_database("iceberg").await?;
    let warehouse = tempfile_dir()?;
    let config = CatalogConfig {
        url: catalog_url,
        name: "weather".into(),
        warehouse: format!("file://{}", warehouse.display()),
        storage: HashMap::new(),
    };
    let mut table = WeatherTable::open(&config, "default", "weather", 128 << 20).await?;
    // Commits come 10 s of event time apart but a few ms of wall time apart: the retention is
    // scaled the same way (1 h of 10 s commits is 360 snapshots).
    let policy = Policy {
        snapshot_retention: args.soak_retention,
        ..iceberg_sink::maintainer::default_policy()?
    };
    // 2027-01-15 08:00 UTC, the start of an hour.
    let start: DateTime<Utc> = DateTime::from_timestamp(1_800_000_000, 0).expect("ts");
    let mut committed = Checkpoints::new();
    let mut offset = 0;
    let mut window = Vec::new();
    let mut report = Vec::new();
    let started = Instant::now();
    for commit in 1..=args.soak_commits {
        let at = start + EVENT_TIME_PER_COMMIT * commit as i32;
        let readings: Vec<WeatherReading> = (0..READINGS_PER_COMMIT)
            .map(|i| WeatherReading {
                city: DEMO_CITIES[i % DEMO_CITIES.len()].to_owned(),
                temperature: (i % 100) as f64,
                ts: at + TimeDelta::milliseconds(i as i64 * 400),
            })
            .collect();
        offset += READINGS_PER_COMMIT as i64;
        let next = Checkpoints::from([(0, Checkpoint::start(offset))]);
        let timed = Instant::now();
        let files = table.write(&readings).await?;
        table
            .commit("weather", files, &committed, &next, &Default::default())
            .await?;
        window.push(timed.elapsed());
        committed = next;
        if commit % args.soak_maintenance_every == 0 {
            table.maintain("weather", &policy).await?;
        }
        if commit % 1_000 == 0 || commit == 100 {
            let shape = table.shape().await?;
            let files = table.data_files_per_partition().await?;
            let closed: Vec<usize> = files.values().rev().skip(1).copied().collect();
            let (metadata_bytes, data_bytes) = warehouse_bytes(&warehouse)?;
            // PyIceberg plans and reads the whole table (and opens each file's footer); its
            // count must be every reading committed.
            let read = Instant::now();
            let pyiceberg =
                match weather_testkit::pyiceberg_check_with(&[&config.url, "weather", "", "default.weather"]) {
                    Ok(found) => {
                        anyhow::ensure!(
                            found["rows"] == serde_json::json!(offset),
                            "PyIceberg read {} rows of {offset}",
                            found["rows"]
                        );
                        format!(
                            "PyIceberg reads all {offset} rows in {:.2} s",
                            read.elapsed().as_secs_f64()
                        )
                    }
                    Err(e) => format!("PyIceberg unavailable ({})", e.to_string().lines().next().unwrap_or("")),
                };
            window.sort();
            let line = format!(
                "commit p50 {:.1} ms, p99 {:.1} ms; metadata.json {} KiB, {} snapshots, {} manifests; files per \
                 closed hour partition max {}; warehouse metadata {:.1} MiB, data {:.1} MiB; {pyiceberg}",
                crate::percentile(&window, 0.5).as_secs_f64() * 1e3,
                crate::percentile(&window, 0.99).as_secs_f64() * 1e3,
                shape.metadata_bytes / 1024,
                shape.snapshots,
                shape.manifests,
                closed.iter().max().copied().unwrap_or(0),
                metadata_bytes as f64 / (1 << 20) as f64,
                data_bytes as f64 / (1 << 20) as f64,
            );
            println!(
                "soak, after {commit} commits ({:.0} s): {line}",
                started.elapsed().as_secs_f64()
            );
            report.push((commit, line));
            window.clear();
        }
    }
    for (commit, line) in report {
        rows.push(Row {
            what: format!("iceberg table after {commit} commits"),
            value: line,
        });
    }
    std::fs::remove_dir_all(&warehouse)?;
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("weather-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Bytes under `metadata/` directories and elsewhere (Parquet), in the warehouse.
fn warehouse_bytes(dir: &Path) -> anyhow::Result<(u64, u64)> {
    let (mut metadata, mut data) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if entry.path().components().any(|c| c.as_os_str() == "metadata") {
                metadata += entry.metadata()?.len();
            } else {
                data += entry.metadata()?.len();
            }
        }
    }
    Ok((metadata, data))
}
