//! SQL on the table: a day of readings (`--query-rows`, 1M by default) written by the
//! iceberg-sink's table code in commits of 100,000 and maintained as the sink does (manifests
//! merged, closed hours compacted), then the plan's per-city average and a one-hour range query, each through the
//! `trino` Python client against the query-server and in PyIceberg + PyArrow, side by side
//! (bench/query_bench.py, which also checks that both answer alike); then the windows rebuilt
//! from the same table ([`crate::rebuild`]).

use std::{collections::HashMap, process::Command, time::Duration};

use anyhow::Context;
use chrono::{DateTime, TimeDelta, Utc};
use iceberg_sink::{maintenance::Policy, table::WeatherTable};
use weather_common::{
    WeatherReading,
    consumer::{Checkpoint, Checkpoints},
    lakehouse::CatalogConfig,
    reading::DEMO_CITIES,
};
use weather_testkit::{ChildGuard, Postgres, find_tool, free_port, workspace_binary};

use crate::{Args, Row};

/// 2026-01-08 00:00 UTC: the readings cover that day.
const DAY_START: i64 = 1_767_830_400;
const PER_COMMIT: usize = 100_000;
const RUNS: usize = 5;

pub(crate) async fn benchmark(args: &Args, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    for &size in &args.query_rows {
        table_of(size, rows).await?;
    }
    Ok(())
}

/// The measurements on a table of `size` readings.
async fn table_of(size: usize, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let postgres = Postgres::start()?;
    let catalog_url = postgres.create_database("iceberg").await?;
    let warehouse = std::env::temp_dir().join(format!("weather-query-bench-{}", std::process::id()));
    std::fs::create_dir_all(&warehouse)?;
    let config = CatalogConfig {
        url: catalog_url.clone(),
        name: "weather".into(),
        warehouse: format!("file://{}", warehouse.display()),
        storage: HashMap::new(),
    };
    let mut table = WeatherTable::open(&config, "default", "weather", 128 << 20).await?;
    let start = DateTime::<Utc>::from_timestamp(DAY_START, 0).expect("day start");
    let mut committed = Checkpoints::new();
    let mut written = 0;
    while written < size {
        let count = PER_COMMIT.min(size - written);
        let readings: Vec<WeatherReading> = (written..written + count)
            .map(|n| WeatherReading {
                city: DEMO_CITIES[n % DEMO_CITIES.len()].to_owned(),
                temperature: ((n * 37) % 1_000) as f64 / 10.0 - 20.0,
                // Spread over the day, so that each commit touches every hour.
                ts: start + TimeDelta::milliseconds((n as i64 * 86_399) % 86_400_000),
            })
            .collect();
        written += count;
        let next = Checkpoints::from([(0, Checkpoint::start(written as i64))]);
        let files = table.write(&readings).await?;
        table
            .commit("weather", files, &committed, &next, &Default::default())
            .await?;
        committed = next;
    }
    // As the sink keeps a day-old table: the appends' manifests merged per hour (at once here,
    // not after 20), then the closed hours compacted.
    let policy = Policy {
        max_unmerged_manifests: 0,
        ..iceberg_sink::maintainer::default_policy()?
    };
    table.maintain("weather", &policy).await?;
    table.maintain("weather", &policy).await?;
    let files: usize = table.data_files_per_partition().await?.values().sum();

    let addr = format!("127.0.0.1:{}", free_port());
    let server = ChildGuard::spawn_ready(
        "query-server",
        Command::new(workspace_binary("query-server"))
            .args(["--listen", &addr])
            .env("CATALOG_URL", &catalog_url)
            .env("WAREHOUSE", &config.warehouse)
            .env("RUST_LOG", "warn"),
        Duration::from_secs(60),
    )?;
    let python = find_tool("PYTHON", "python3").context("python3 not found")?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/query_bench.py");
    let output = Command::new(python)
        .args([
            script,
            &format!("http://{addr}"),
            &catalog_url,
            "2026-01-08",
            "14",
            &RUNS.to_string(),
        ])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "query_bench.py: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let found: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let peak = crate::peak_rss_mib(server.pid() as u32);
    drop(server);
    let table_note = format!("{} rows, {files} data files", found["rows"]);
    let seconds = |key: &str| found[key].as_f64().unwrap_or(f64::NAN);
    rows.push(Row {
        what: format!("SQL: per-city average ({table_note}), median of {RUNS}"),
        value: format!(
            "query-server via the trino client {:.3} s; PyIceberg + PyArrow {:.3} s ({} cities, same averages)",
            seconds("server_average_s"),
            seconds("pyiceberg_average_s"),
            found["cities"],
        ),
    });
    rows.push(Row {
        what: format!("SQL: one-hour range `ts >= … AND ts < …` ({table_note}), median of {RUNS}"),
        value: format!(
            "{} rows: query-server via the trino client {:.3} s (Python objects), PyIceberg + PyArrow {:.3} s \
             (an Arrow table), {:.3} s with `to_pylist()`; `count(*)` of the range on the query-server {:.3} s",
            found["range_rows"],
            seconds("server_range_s"),
            seconds("pyiceberg_range_s"),
            seconds("pyiceberg_range_pylist_s"),
            seconds("server_range_count_s"),
        ),
    });
    let duck = |name: &str| {
        let part = &found["duckdb"][name];
        format!(
            "{:.3} s / {:.3} s ({} rows)",
            part["server_s"].as_f64().unwrap_or(f64::NAN),
            part["duckdb_s"].as_f64().unwrap_or(f64::NAN),
            part["rows"]
        )
    };
    rows.push(Row {
        what: format!(
            "SQL against DuckDB {} `iceberg_scan` of the same metadata file ({table_note}), median of {RUNS}: query-server via the trino client / DuckDB in process",
            found["duckdb_version"].as_str().unwrap_or("")
        ),
        value: format!(
            "`count(*)` {}; per-city average {}; `SELECT *` where `hour(ts) = 14` {}; a `TIMESTAMP` range outside the data {}",
            duck("count"),
            duck("average"),
            duck("hour"),
            duck("pruned"),
        ),
    });
    let delivery = &found["delivery"];
    let delivered = |key: &str| delivery[key].as_f64().unwrap_or(f64::NAN);
    let per_second = |key: &str| delivery["rows"].as_f64().unwrap_or(f64::NAN) / delivered(key);
    rows.push(Row {
        what: format!(
            "SQL: rows delivered to Python, `SELECT *` where `hour(ts) = 14` ({table_note}), median of {RUNS}"
        ),
        value: format!(
            "{} rows: the trino client {:.3} s ({:.0} rows/s), of which its conversion of the JSON rows to Python \
             objects {:.3} s; the pages alone (HTTP and JSON, as the client fetches them) {:.3} s ({:.0} rows/s); \
             DuckDB `fetchall()` {:.3} s ({:.0} rows/s), `fetch_arrow_table()` {:.3} s; the first row of `SELECT *` \
             of the whole table {:.3} s after the statement",
            delivery["rows"],
            delivered("client_s"),
            per_second("client_s"),
            delivered("mapping_s"),
            delivered("pages_s"),
            per_second("pages_s"),
            delivered("duckdb_s"),
            per_second("duckdb_s"),
            delivered("duckdb_arrow_s"),
            delivered("first_row_s"),
        ),
    });
    rows.push(Row {
        what: format!("SQL: query-server memory ({table_note})"),
        value: format!(
            "peak RSS {peak:.0} MiB over the runs above (each query may hold up to `--query-memory-limit`, 1 GiB by default)"
        ),
    });
    crate::rebuild::measure(&postgres, &catalog_url, &config.warehouse, size, &table_note, rows).await?;
    std::fs::remove_dir_all(&warehouse)?;
    Ok(())
}
