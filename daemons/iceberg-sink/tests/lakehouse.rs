//! iceberg-sink as a process against real components: a Kafka-protocol broker (librdkafka's
//! mock cluster), PostgreSQL as the Iceberg catalog, an S3-compatible server (moto), and
//! PyIceberg as an independent reader of what was written.

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use arrow_array::{Array, Float64Array, StringArray, TimestampMicrosecondArray};
use chrono::{DateTime, TimeDelta, Utc};
use futures::TryStreamExt;
use iceberg_sink::{
    maintenance::Policy,
    summary::offsets_key,
    table::{BrokenLineage, WeatherTable},
};
use rdkafka::Message;
use weather_common::{
    WeatherReading,
    consumer::{Checkpoint, Checkpoints},
    kafka::KafkaArgs,
    lakehouse::CatalogConfig,
    reading::DEMO_CITIES,
};
use weather_testkit::{
    ChildGuard, MockKafka, Nisshi, Postgres, S3Server, consume, free_port, http_get, metric, produce, produce_readings,
    produce_with, pyiceberg_check, reading_records,
};

struct Harness {
    kafka: MockKafka,
    /// Used instead of `kafka` when set.
    nisshi: Option<Nisshi>,
    _postgres: Postgres,
    s3: S3Server,
    catalog_url: String,
    /// `s3://warehouse/` on `s3`, or a directory.
    warehouse: String,
    _warehouse_dir: Option<tempfile::TempDir>,
    /// The sink's /health and /metrics address.
    admin: String,
}

impl Harness {
    async fn start() -> Self {
        let kafka = MockKafka::start(&["weather", "weather.dlq"]);
        let postgres = Postgres::start().expect("PostgreSQL");
        let catalog_url = postgres.create_database("iceberg").await.expect("catalog database");
        let s3 = S3Server::start().await.expect("S3 server");
        Self {
            kafka,
            nisshi: None,
            _postgres: postgres,
            s3,
            catalog_url,
            warehouse: "s3://warehouse/".into(),
            _warehouse_dir: None,
            admin: format!("127.0.0.1:{}", free_port()),
        }
    }

    /// With the warehouse in a directory, for tests where PyIceberg writes too (see
    /// `pyiceberg_writer.py`).
    async fn start_with_warehouse_dir() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("weather-warehouse-")
            .tempdir()
            .expect("warehouse");
        Self {
            warehouse: format!("file://{}", dir.path().display()),
            _warehouse_dir: Some(dir),
            ..Self::start().await
        }
    }

    /// On nisshi with its log on disk, as `pipeline` runs it.
    async fn start_with_nisshi() -> Self {
        let nisshi = Nisshi::start_on_disk().expect("nisshi");
        KafkaArgs::new(nisshi.brokers.clone())
            .ensure_topics(&["weather", "weather.dlq"])
            .await
            .expect("topics");
        Self {
            nisshi: Some(nisshi),
            ..Self::start().await
        }
    }

    fn brokers(&self) -> String {
        match &self.nisshi {
            Some(nisshi) => nisshi.brokers.clone(),
            None => self.kafka.brokers(),
        }
    }

    /// The sink on this harness's broker, catalog and warehouse, with `extra` flags.
    fn sink_command(&self, extra: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_iceberg-sink"));
        command
            .args(["--kafka-brokers", &self.brokers(), "--catalog-url", &self.catalog_url])
            .args(["--s3-endpoint", &self.s3.endpoint, "--warehouse", &self.warehouse])
            .args(["--listen", &self.admin])
            .args(extra)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("RUST_LOG", "warn");
        command
    }

    fn sink(&self, extra: &[&str]) -> ChildGuard {
        ChildGuard::spawn_ready("iceberg-sink", &mut self.sink_command(extra), Duration::from_secs(60))
            .expect("READY=1")
    }

    async fn table(&self) -> WeatherTable {
        let config = CatalogConfig {
            url: self.catalog_url.clone(),
            name: "weather".into(),
            warehouse: self.warehouse.clone(),
            storage: [
                ("s3.endpoint", self.s3.endpoint.as_str()),
                ("s3.region", "us-east-1"),
                ("s3.path-style-access", "true"),
                ("s3.access-key-id", "test"),
                ("s3.secret-access-key", "test"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        };
        WeatherTable::open(&config, "default", "weather", 128 << 20)
            .await
            .expect("open table")
    }

    /// Records the table's last snapshot accounts for (sum of next offsets).
    async fn committed(&self) -> i64 {
        let table = self.table().await;
        match table.committed_offsets("weather") {
            Ok(offsets) => offsets.values().sum(),
            // Until a sink resumes on a broken line of snapshots: nothing known.
            Err(e) if e.is::<BrokenLineage>() => 0,
            Err(e) => panic!("offsets: {e:#}"),
        }
    }

    async fn wait_committed(&self, at_least: i64, timeout: Duration) -> i64 {
        let deadline = Instant::now() + timeout;
        loop {
            let committed = self.committed().await;
            if committed >= at_least || Instant::now() > deadline {
                return committed;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the sink holds `count` readings (its commit interval kept long).
    async fn wait_buffered(&self, count: u64) {
        let buffered = |metrics: &str| metric(metrics, "iceberg_sink_records_consumed_total") == Some(count as f64);
        self.wait_metrics(Duration::from_secs(60), &format!("buffered {count} readings"), buffered)
            .await;
    }

    /// Polls the sink's /metrics until `done` holds, for at most `timeout`; returns them then.
    async fn wait_metrics(&self, timeout: Duration, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let metrics = http_get(&self.admin, "/metrics").await.expect("metrics").body;
            if done(&metrics) {
                return metrics;
            }
            assert!(Instant::now() < deadline, "the sink never {what}:\n{metrics}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every row of the table as `(ts µs, city, temperature)`, sorted.
    async fn rows(&self) -> Vec<(i64, String, f64)> {
        let table = self.table().await;
        let batches: Vec<_> = table
            .table
            .scan()
            .build()
            .expect("scan")
            .to_arrow()
            .await
            .expect("arrow stream")
            .try_collect()
            .await
            .expect("batches");
        let mut rows = Vec::new();
        for batch in batches {
            let city = batch
                .column_by_name("city")
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .expect("city");
            let temperature = batch
                .column_by_name("temperature")
                .and_then(|c| c.as_any().downcast_ref::<Float64Array>())
                .expect("temperature");
            let ts = batch
                .column_by_name("ts")
                .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
                .expect("ts");
            for i in 0..batch.num_rows() {
                assert!(!city.is_null(i) && !temperature.is_null(i) && !ts.is_null(i));
                rows.push((ts.value(i), city.value(i).to_owned(), temperature.value(i)));
            }
        }
        rows.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        rows
    }
}

/// Commits every 100 ms and maintenance as often as the sink runs it, keeping few snapshots:
/// every kind of maintenance commit lands between the appends.
const BUSY_MAINTENANCE: [&str; 12] = [
    "--commit-interval",
    "100ms",
    "--max-records",
    "300",
    "--maintenance-interval",
    "1ms",
    "--max-unmerged-manifests",
    "4",
    "--snapshot-retention",
    "1s",
    "--min-snapshots",
    "3",
];

/// `count` readings spread evenly over three whole hours, each with a distinct timestamp.
fn readings(count: usize) -> (DateTime<Utc>, Vec<WeatherReading>) {
    let now = Utc::now().timestamp();
    let base = DateTime::from_timestamp(now - now.rem_euclid(3600) - 5 * 3600, 0).expect("ts");
    let step = TimeDelta::hours(3).num_microseconds().expect("µs") / count as i64;
    let readings = (0..count)
        .map(|i| WeatherReading {
            city: DEMO_CITIES[i % DEMO_CITIES.len()].to_owned(),
            temperature: (i % 12_000) as f64 / 100.0,
            ts: base + TimeDelta::microseconds(step * i as i64),
        })
        .collect();
    (base, readings)
}

fn expected_rows(readings: &[WeatherReading]) -> Vec<(i64, String, f64)> {
    let mut rows: Vec<_> = readings
        .iter()
        .map(|r| (r.ts.timestamp_micros(), r.city.clone(), r.temperature))
        .collect();
    rows.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn hundred_thousand_readings_over_three_hours_land_once_and_pyiceberg_agrees() {
    let harness = Harness::start().await;
    let (base, readings) = readings(100_000);
    let (first, second) = readings.split_at(50_000);
    produce_readings(&harness.brokers(), "weather", first).expect("produce");
    // Malformed records between good ones go to the dead-letter topic; the rest flows on.
    produce(
        &harness.brokers(),
        "weather",
        &[
            (b"Boston".to_vec(), b"not json".to_vec()),
            (
                b"Boston".to_vec(),
                br#"{"city":"Boston","temperature":"warm","ts":"2026-01-01T00:00:00.000Z"}"#.to_vec(),
            ),
        ],
    )
    .expect("produce bad records");
    produce_readings(&harness.brokers(), "weather", second).expect("produce");

    let mut sink = harness.sink(&["--commit-interval", "1s"]);
    let committed = harness.wait_committed(100_002, Duration::from_secs(120)).await;
    assert_eq!(committed, 100_002, "offsets of every record, good or bad, committed");
    // /metrics shows the same offsets (set just after the catalog commit returns).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = weather_testkit::http_get(&harness.admin, "/metrics")
            .await
            .expect("metrics")
            .body;
        let shown: i64 = metrics
            .lines()
            .filter_map(|l| {
                l.strip_prefix("iceberg_sink_committed_offset{")?
                    .split_once("} ")?
                    .1
                    .parse::<i64>()
                    .ok()
            })
            .sum();
        if shown == 100_002 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/metrics shows {shown} committed:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));

    let rows = harness.rows().await;
    assert_eq!(rows.len(), 100_000);
    assert_eq!(
        rows,
        expected_rows(&readings),
        "every reading exactly once, with its values"
    );

    let dead = consume(&harness.brokers(), "weather.dlq", 2, Duration::from_secs(10)).expect("dlq");
    assert_eq!(dead.len(), 2, "both malformed records dead-lettered");
    let headers: Vec<_> = dead
        .iter()
        .map(|m| {
            use rdkafka::message::Headers;
            let headers = m.headers().expect("headers");
            (0..headers.count())
                .map(|i| headers.get(i))
                .find(|h| h.key == "error")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .expect("error header")
        })
        .collect();
    assert!(headers.iter().any(|h| h.contains("temperature")), "{headers:?}");

    let hour = |h: i64| (base.timestamp() / 3600 + h) as u64;
    let found =
        pyiceberg_check(&harness.catalog_url, "weather", &harness.s3.endpoint, "default.weather").expect("pyiceberg");
    assert_eq!(found["rows"], 100_000, "{found}");
    assert_eq!(found["distinct_ts"], 100_000, "{found}");
    assert_eq!(found["format_version"], 2, "{found}");
    assert_eq!(found["partition_fields"], serde_json::json!(["hour(ts)"]), "{found}");
    assert_eq!(
        found["partition_hours"],
        serde_json::json!([hour(0), hour(1), hour(2)]),
        "{found}"
    );
    assert_eq!(found["compressions"], serde_json::json!(["ZSTD"]), "{found}");
    let sum: f64 = readings.iter().map(|r| r.temperature).sum();
    assert!(
        (found["temperature_sum"].as_f64().expect("sum") - sum).abs() < 1e-3,
        "{found}"
    );
    let offsets: BTreeMap<String, i64> = serde_json::from_str(
        found["snapshot_summary"][offsets_key("weather")]
            .as_str()
            .expect("offsets in the summary"),
    )
    .expect("offsets JSON");
    assert_eq!(offsets.values().sum::<i64>(), 100_002);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_stream_and_restart_keeps_every_reading_exactly_once() {
    let harness = Harness::start().await;
    let (_, readings) = readings(60_000);
    let (first, second) = readings.split_at(40_000);
    produce_readings(&harness.brokers(), "weather", first).expect("produce");
    let args = ["--commit-interval", "200ms", "--max-records", "2000"];
    let mut sink = harness.sink(&args);
    let before = harness.wait_committed(1, Duration::from_secs(60)).await;
    sink.kill9();
    let at_kill = harness.committed().await;
    eprintln!("kill -9 with {at_kill} of 40000 committed (first seen {before})");
    assert!(at_kill < 40_000, "the kill landed mid-stream");

    produce_readings(&harness.brokers(), "weather", second).expect("produce");
    let mut sink = harness.sink(&args);
    assert_eq!(harness.wait_committed(60_000, Duration::from_secs(120)).await, 60_000);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    assert_eq!(harness.rows().await, expected_rows(&readings), "no loss, no duplicate");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_commits_what_is_buffered() {
    let harness = Harness::start().await;
    let (_, readings) = readings(5_000);
    produce_readings(&harness.brokers(), "weather", &readings).expect("produce");
    // No commit would happen for an hour: only the shutdown path can put the rows in the table.
    let mut sink = harness.sink(&["--commit-interval", "1h"]);
    harness.wait_buffered(5_000).await;
    assert_eq!(harness.committed().await, 0, "nothing committed before SIGTERM");
    assert_eq!(sink.terminate(Duration::from_secs(60)).expect("exit").code(), Some(0));
    assert_eq!(harness.committed().await, 5_000);
    assert_eq!(harness.rows().await, expected_rows(&readings));
}

/// A topic that starts over (recreated, or an in-memory broker restarted) is read from its
/// beginning: the table's offsets lie past the end of the new log, and seeking to them would
/// skip the new readings silently.
#[tokio::test(flavor = "multi_thread")]
async fn a_topic_that_starts_over_is_read_from_its_beginning() {
    let mut harness = Harness::start().await;
    let (_, readings) = readings(8_000);
    let (first, rest) = readings.split_at(2_000);
    let (second, third) = rest.split_at(1_000);
    produce_readings(&harness.brokers(), "weather", first).expect("produce");
    let mut sink = harness.sink(&["--commit-interval", "200ms"]);
    assert_eq!(harness.wait_committed(2_000, Duration::from_secs(60)).await, 2_000);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));

    harness.kafka = MockKafka::start(&["weather", "weather.dlq"]);
    produce_readings(&harness.brokers(), "weather", second).expect("produce");
    let mut sink = harness.sink(&["--commit-interval", "200ms"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let committed = harness.committed().await;
        if committed == 1_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "offsets of the new log never committed: {committed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));

    // A new log that already reaches past the table's offsets when the sink starts: only the
    // records themselves tell it apart from the old one.
    harness.kafka = MockKafka::start(&["weather", "weather.dlq"]);
    produce_readings(&harness.brokers(), "weather", third).expect("produce");
    let mut sink = harness.sink(&["--commit-interval", "200ms"]);
    assert_eq!(harness.wait_committed(5_000, Duration::from_secs(60)).await, 5_000);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    assert_eq!(
        harness.rows().await,
        expected_rows(&readings),
        "the readings of all three logs, each once"
    );
}

/// Readings stamped far ahead of their Kafka record are dead letters, not rows: the
/// window-aggregator refuses the same ones, so the table and the windows agree.
#[tokio::test(flavor = "multi_thread")]
async fn readings_from_the_future_are_dead_letters() {
    let harness = Harness::start().await;
    let (_, readings) = readings(1_000);
    produce_readings(&harness.brokers(), "weather", &readings[..500]).expect("produce");
    let future: Vec<WeatherReading> = ["Boston", "Paris"]
        .iter()
        .map(|city| WeatherReading {
            city: (*city).to_owned(),
            temperature: 1.0,
            ts: WeatherReading::now() + chrono::TimeDelta::minutes(10),
        })
        .collect();
    produce_readings(&harness.brokers(), "weather", &future).expect("produce");
    produce_readings(&harness.brokers(), "weather", &readings[500..]).expect("produce");
    let mut sink = harness.sink(&["--commit-interval", "200ms"]);
    assert_eq!(harness.wait_committed(1_002, Duration::from_secs(60)).await, 1_002);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    assert_eq!(
        harness.rows().await,
        expected_rows(&readings),
        "only the readings of now"
    );
    let dead = weather_testkit::consume(&harness.brokers(), "weather.dlq", 2, Duration::from_secs(10)).expect("dlq");
    assert_eq!(dead.len(), 2);
    let reason = weather_testkit::header(&dead[0], "error").expect("error header");
    assert!(reason.contains("more than 1m ahead"), "{reason}");
}

/// On the broker `pipeline` runs, with batches of hundreds of records as a producer with
/// `linger.ms` sends them: a sink killed after commits that end inside batches, and started
/// again, reads nothing twice and skips nothing (the consumer fetches from the checkpoint
/// itself, inside a batch).
#[tokio::test(flavor = "multi_thread")]
async fn a_sink_restarted_inside_batches_reads_nothing_twice_and_skips_nothing() {
    let harness = Harness::start_with_nisshi().await;
    let (_, readings) = readings(2_000);
    let (first, second) = readings.split_at(1_500);
    let produce = |readings: &[WeatherReading]| {
        let records = reading_records(readings);
        let batched = [("linger.ms", "200"), ("batch.num.messages", "500")];
        produce_with(&harness.brokers(), "weather", &records, &batched).expect("produce");
    };
    produce(first);
    let mut sink = harness.sink(&["--commit-interval", "1h", "--max-records", "70"]);
    assert!(harness.wait_committed(700, Duration::from_secs(60)).await >= 700);
    sink.kill9();
    let at_kill = harness.committed().await;
    assert!(
        at_kill < 1_500,
        "killed with {at_kill} of 1500 committed: not inside the batches"
    );

    let mut sink = harness.sink(&["--commit-interval", "200ms"]);
    produce(second);
    assert_eq!(harness.wait_committed(2_000, Duration::from_secs(60)).await, 2_000);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    // Once more from a checkpoint at the end of the log.
    let mut sink = harness.sink(&["--commit-interval", "200ms"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    assert_eq!(harness.rows().await, expected_rows(&readings), "every reading once");
}

/// SIGTERM while the broker is frozen (it holds its connections and answers nothing, as a
/// broker stopped at the same moment can): the sink commits what it read and exits within its
/// bound on leaving the group, instead of waiting for the broker's answer without end.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_the_broker_frozen_commits_and_exits_in_time() {
    let harness = Harness::start_with_nisshi().await;
    let (_, readings) = readings(500);
    produce_readings(&harness.brokers(), "weather", &readings).expect("produce");
    let mut sink = harness.sink(&["--commit-interval", "1h"]);
    harness.wait_buffered(500).await;
    let nisshi = harness.nisshi.as_ref().expect("nisshi");
    nisshi.freeze();
    let stopping = Instant::now();
    let status = sink.terminate(Duration::from_secs(60)).expect("exit");
    let took = stopping.elapsed();
    nisshi.thaw();
    assert_eq!(status.code(), Some(0), "a clean exit");
    assert!(took < Duration::from_secs(20), "exited {took:?} after SIGTERM");
    assert_eq!(
        harness.rows().await,
        expected_rows(&readings),
        "every reading, committed on the way out"
    );
}

/// Maintenance after every commit (manifest merges, compaction of closed hours, snapshot
/// expiry, deleting what no retained snapshot needs) while readings stream in, and the sink killed with kill -9 twice on the way
/// (with maintenance that often, a kill lands in or next to a maintenance commit): every
/// reading is in the table exactly once, PyIceberg reads the same, and the metadata stays small.
#[tokio::test(flavor = "multi_thread")]
async fn maintenance_keeps_every_reading_exactly_once_and_the_metadata_small() {
    let harness = Harness::start().await;
    let (_, readings) = readings(30_000);
    let args = BUSY_MAINTENANCE;
    for (i, chunk) in readings.chunks(10_000).enumerate() {
        produce_readings(&harness.brokers(), "weather", chunk).expect("produce");
        let mut sink = harness.sink(&args);
        let goal = 10_000 * i as i64 + 3_000;
        assert!(harness.wait_committed(goal, Duration::from_secs(120)).await >= goal);
        if i < 2 {
            sink.kill9();
            continue;
        }
        assert_eq!(harness.wait_committed(30_000, Duration::from_secs(120)).await, 30_000);
        // Maintenance runs beside the commits: two more runs, so that one started after the last.
        let runs = |metrics: &str| metric(metrics, "iceberg_sink_maintenance_runs_total").unwrap_or(0.0);
        let before = runs(&http_get(&harness.admin, "/metrics").await.expect("metrics").body);
        let metrics = harness
            .wait_metrics(Duration::from_secs(30), "ran maintenance twice more", |m| {
                runs(m) >= before + 2.0
            })
            .await;
        let value = |name: &str| metric(&metrics, name).unwrap_or(-1.0);
        eprintln!(
            "merges {}, compactions {}, expired {}, deleted {}, snapshots {}, manifests {}, metadata {} bytes",
            value("iceberg_sink_manifest_merges_total"),
            value("iceberg_sink_compacted_partitions_total"),
            value("iceberg_sink_expired_snapshots_total"),
            value("iceberg_sink_deleted_files_total"),
            value("iceberg_sink_table_snapshots"),
            value("iceberg_sink_table_manifests"),
            value("iceberg_sink_table_metadata_bytes"),
        );
        assert!(value("iceberg_sink_manifest_merges_total") > 0.0, "{metrics}");
        assert!(value("iceberg_sink_compacted_partitions_total") > 0.0, "{metrics}");
        assert!(value("iceberg_sink_expired_snapshots_total") > 0.0, "{metrics}");
        assert!(value("iceberg_sink_deleted_files_total") > 0.0, "{metrics}");
        assert_eq!(value("iceberg_sink_maintenance_failures_total"), 0.0, "{metrics}");
        assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    }
    let table = harness.table().await;
    let shape = table.shape().await.expect("shape");
    // Every hour but the newest holds at most --max-files-per-partition (4) files after the last
    // maintenance: compacted into one, plus what the Kafka partitions still behind sent later.
    let files = table.data_files_per_partition().await.expect("files");
    let closed: Vec<usize> = files.values().rev().skip(1).copied().collect();
    assert!(
        closed.iter().all(|&n| n <= 4),
        "files per closed hour partition: {files:?}"
    );
    // Three or four hour partitions, one merged manifest each, plus the appends since.
    assert!(shape.manifests <= 4 + 4, "{shape:?}");
    assert!(shape.snapshots < 40, "{shape:?}");
    assert_eq!(harness.rows().await, expected_rows(&readings), "no loss, no duplicate");
    let found =
        pyiceberg_check(&harness.catalog_url, "weather", &harness.s3.endpoint, "default.weather").expect("pyiceberg");
    assert_eq!(found["rows"], 30_000, "{found}");
    assert_eq!(found["distinct_ts"], 30_000, "{found}");
}

/// Appends `batch` to `table` as one commit of partition 0, whose offset counts the readings.
async fn append(table: &mut WeatherTable, committed: &mut Checkpoints, batch: &[WeatherReading]) {
    let files = table.write(batch).await.expect("write");
    let offset = committed.get(&0).map_or(0, |c| c.next_offset) + batch.len() as i64;
    let next = Checkpoints::from([(0, Checkpoint::start(offset))]);
    table
        .commit("weather", files, committed, &next, &Default::default())
        .await
        .expect("append");
    *committed = next;
}

/// Maintenance that meets other sinks' appends while it compacts lists its rewrite again on
/// them instead of giving it up (with several sinks appending every few seconds, a compaction of
/// many files would otherwise never land): it lands, and every reading appended before, during
/// and after is in the table once, with the newest offsets.
#[tokio::test(flavor = "multi_thread")]
async fn maintenance_lands_on_top_of_concurrent_appends() {
    let harness = Harness::start().await;
    let (_, readings) = readings(12_000);
    const COMMITS: usize = 120;
    // Each commit takes readings from all three hours: a file in each.
    let batch = |k: usize| -> Vec<WeatherReading> { readings.iter().skip(k).step_by(COMMITS).cloned().collect() };
    let mut writer = harness.table().await;
    let mut committed = Checkpoints::new();
    for k in 0..80 {
        append(&mut writer, &mut committed, &batch(k)).await;
    }
    let policy = Policy {
        max_unmerged_manifests: 4,
        ..iceberg_sink::maintainer::default_policy().expect("the sink's defaults")
    };
    let mut maintainer = harness.table().await;
    let appends = async {
        for k in 80..COMMITS {
            append(&mut writer, &mut committed, &batch(k)).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (report, ()) = tokio::join!(maintainer.maintain("weather", &policy), appends);
    let report = report.expect("maintenance");
    eprintln!("{report:?}");
    assert!(report.merged.is_some(), "the rewrite landed: {report:?}");
    assert_eq!(
        report.compacted_partitions, 2,
        "both closed hours compacted: {report:?}"
    );
    assert!(
        report.rebases > 0,
        "appends came first and the rewrite was listed on them: {report:?}"
    );
    assert_eq!(harness.rows().await, expected_rows(&readings), "no loss, no duplicate");
    assert_eq!(harness.committed().await, 12_000, "the newest offsets");
    let found =
        pyiceberg_check(&harness.catalog_url, "weather", &harness.s3.endpoint, "default.weather").expect("pyiceberg");
    assert_eq!(found["rows"], 12_000, "{found}");
}

/// Files nothing references, as a sink killed between writing and committing leaves them, are
/// deleted by the orphan sweep once older than `--orphan-age`; everything referenced stays.
#[tokio::test(flavor = "multi_thread")]
async fn the_orphan_sweep_deletes_only_unreferenced_files() {
    let harness = Harness::start().await;
    let (_, readings) = readings(3_000);
    let chunks: Vec<&[WeatherReading]> = readings.chunks(1_000).collect();
    produce_readings(&harness.brokers(), "weather", chunks[0]).expect("produce");
    let mut sink = harness.sink(&["--commit-interval", "200ms"]);
    assert_eq!(harness.wait_committed(1_000, Duration::from_secs(60)).await, 1_000);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));

    let table = harness.table().await;
    let location = table.table.metadata().location().to_owned();
    let strays = [
        format!("{location}/data/ts_hour=1/00000-0-orphan.parquet"),
        format!("{location}/metadata/00099-orphan.metadata.json"),
    ];
    let file_io = table.table.file_io().clone();
    for stray in &strays {
        file_io
            .new_output(stray)
            .expect("output")
            .write("junk".into())
            .await
            .expect("write");
    }
    let exists = |path: String| {
        let file_io = file_io.clone();
        async move { file_io.exists(&path).await.expect("exists") }
    };

    for (chunk, age, kept) in [(chunks[1], "1h", true), (chunks[2], "0s", false)] {
        produce_readings(&harness.brokers(), "weather", chunk).expect("produce");
        let mut sink = harness.sink(&[
            "--commit-interval",
            "200ms",
            "--maintenance-interval",
            "1ms",
            "--orphan-age",
            age,
        ]);
        let goal = if kept { 2_000 } else { 3_000 };
        assert_eq!(harness.wait_committed(goal, Duration::from_secs(60)).await, goal);
        // The sweep runs with the first maintenance, a moment after the start.
        let deadline = Instant::now() + Duration::from_secs(30);
        let metrics = loop {
            let metrics = http_get(&harness.admin, "/metrics").await.expect("metrics").body;
            if metric(&metrics, "iceberg_sink_maintenance_runs_total").unwrap_or(0.0) >= 1.0
                || Instant::now() > deadline
            {
                break metrics;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let deleted = metric(&metrics, "iceberg_sink_orphans_deleted_total").unwrap_or(-1.0);
        assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
        for stray in &strays {
            assert_eq!(exists(stray.clone()).await, kept, "{stray} with --orphan-age {age}");
        }
        assert_eq!(
            deleted,
            if kept { 0.0 } else { 2.0 },
            "orphans deleted with --orphan-age {age}"
        );
    }
    assert_eq!(harness.rows().await, expected_rows(&readings), "every reading once");
    let found =
        pyiceberg_check(&harness.catalog_url, "weather", &harness.s3.endpoint, "default.weather").expect("pyiceberg");
    assert_eq!(found["rows"], 3_000, "{found}");
}

/// Runs the sink until it exits on its own (within `timeout`, else it is killed and the test
/// fails): its exit status and what it wrote to stderr.
fn sink_to_exit(harness: &Harness, extra: &[&str], timeout: Duration) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let mut child = harness
        .sink_command(extra)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("iceberg-sink");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let mut stderr = String::new();
            let _ = child.stderr.take().expect("stderr").read_to_string(&mut stderr);
            panic!("the sink did not stop on its own within {timeout:?}:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    (status, stderr)
}

/// Another engine appends and then expires every older snapshot, the sink's included: the table
/// no longer says where the Kafka partitions stand. The sink must not start over from offset 0
/// (which writes everything the topic holds again): it refuses, says what to do, and resumes
/// exactly when the operator names the consumer group's offsets.
#[tokio::test(flavor = "multi_thread")]
async fn a_broken_line_of_snapshots_stops_the_sink_until_an_operator_says_where_to_resume() {
    let harness = Harness::start_with_warehouse_dir().await;
    let (_, readings) = readings(3_000);
    let (first, second) = readings.split_at(2_000);
    produce_readings(&harness.brokers(), "weather", first).expect("produce");
    let args = ["--commit-interval", "200ms"];
    let mut sink = harness.sink(&args);
    assert_eq!(harness.wait_committed(2_000, Duration::from_secs(60)).await, 2_000);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));

    let other = weather_testkit::pyiceberg_write(
        &harness.catalog_url,
        "weather",
        &harness.s3.endpoint,
        "default.weather",
        &["append:3:Elsewhere", "expire-all"],
    )
    .expect("PyIceberg");
    assert_eq!(other["snapshots"], 1, "{other}");
    produce_readings(&harness.brokers(), "weather", second).expect("produce");

    let (status, stderr) = sink_to_exit(&harness, &args, Duration::from_secs(60));
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("line of snapshots is broken"), "{stderr}");
    assert!(stderr.contains("--resume-from group"), "{stderr}");
    let rows = harness.rows().await;
    assert_eq!(rows.len(), 2_003, "nothing written while the sink refused");

    let mut sink = harness.sink(&["--commit-interval", "200ms", "--resume-from", "group"]);
    assert_eq!(harness.wait_committed(3_000, Duration::from_secs(60)).await, 3_000);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    let mut rows = harness.rows().await;
    let elsewhere: Vec<_> = rows.extract_if(.., |(_, city, _)| city == "Elsewhere").collect();
    assert_eq!(elsewhere.len(), 3, "the other engine's rows are intact");
    assert_eq!(rows, expected_rows(&readings), "no loss, no duplicate");
}

/// Another engine works on the table while the sink writes under load and maintains it as often
/// as it can: it appends, overwrites its own rows, deletes the sink's rows of one city by a
/// filter, and expires every older snapshot; then the sink is killed with -9 and restarted.
/// Every reading is in the table once but those the other engine deleted, which stay deleted
/// through the compactions after; the other engine's rows are as it left them; and PyIceberg,
/// DuckDB and the query-server count the same rows.
#[tokio::test(flavor = "multi_thread")]
async fn another_engines_appends_overwrites_deletes_and_expiry_beside_the_sink_stay_as_it_left_them() {
    let harness = Harness::start_with_warehouse_dir().await;
    let (_, readings) = readings(30_000);
    let args = BUSY_MAINTENANCE;
    // What the other engine deletes: one city's readings before the 24,000th, all committed by
    // then; the third hour goes on receiving files afterwards, so it is compacted after the delete.
    let (city, cut) = (DEMO_CITIES[3], 24_000);
    let before = readings[cut].ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
    produce_readings(&harness.brokers(), "weather", &readings[..cut]).expect("produce");
    let mut sink = harness.sink(&args);
    assert_eq!(
        harness.wait_committed(cut as i64, Duration::from_secs(120)).await,
        cut as i64
    );

    // The other engine's commits and the sink's race each other: the load goes on meanwhile.
    let load = |slices: Vec<WeatherReading>| {
        let brokers = harness.brokers();
        tokio::task::spawn_blocking(move || {
            for slice in slices.chunks(250) {
                produce_readings(&brokers, "weather", slice).expect("produce");
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let other_engine = |operations: &[&str]| {
        let other = weather_testkit::pyiceberg_write(
            &harness.catalog_url,
            "weather",
            &harness.s3.endpoint,
            "default.weather",
            operations,
        )
        .expect("PyIceberg");
        eprintln!("the other engine: {other}");
    };
    let loading = load(readings[cut..28_000].to_vec());
    let delete = format!("delete:city = '{city}' AND ts < '{before}'");
    other_engine(&["append:40:Elsewhere", "overwrite:Elsewhere:20:Overwritten", &delete]);
    loading.await.expect("load");
    // A sink commit above the other engine's: its expiry of everything older keeps the sink's
    // checkpoints (an expiry with nothing of the sink's above stops the sink: see
    // a_broken_line_of_snapshots_stops_the_sink_until_an_operator_says_where_to_resume).
    produce_readings(&harness.brokers(), "weather", &readings[28_000..29_000]).expect("produce");
    assert_eq!(harness.wait_committed(29_000, Duration::from_secs(60)).await, 29_000);
    let loading = load(readings[29_000..].to_vec());
    other_engine(&["expire-all"]);
    loading.await.expect("load");
    assert_eq!(harness.wait_committed(30_000, Duration::from_secs(120)).await, 30_000);
    sink.kill9();

    let mut sink = harness.sink(&args);
    let runs = |metrics: &str| metric(metrics, "iceberg_sink_maintenance_runs_total").unwrap_or(0.0);
    let metrics = harness
        .wait_metrics(Duration::from_secs(60), "ran maintenance twice", |m| runs(m) >= 2.0)
        .await;
    assert_eq!(
        metric(&metrics, "iceberg_sink_maintenance_failures_total"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(harness.wait_committed(30_000, Duration::from_secs(10)).await, 30_000);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));

    let files = harness.table().await.data_files_per_partition().await.expect("files");
    let closed: Vec<usize> = files.values().take(3).copied().collect();
    assert!(
        closed.iter().all(|&n| n <= 4),
        "the closed hours were compacted: {files:?}"
    );
    let kept: Vec<WeatherReading> = readings
        .iter()
        .enumerate()
        .filter(|(i, r)| !(r.city == city && *i < cut))
        .map(|(_, r)| r.clone())
        .collect();
    let mut rows = harness.rows().await;
    let theirs: Vec<_> = rows
        .extract_if(.., |(_, c, _)| !DEMO_CITIES.contains(&c.as_str()))
        .collect();
    assert_eq!(theirs.len(), 20, "{theirs:?}");
    assert!(theirs.iter().all(|(_, c, _)| c == "Overwritten"), "{theirs:?}");
    assert_eq!(
        rows,
        expected_rows(&kept),
        "no loss, no duplicate, the deleted rows stay deleted"
    );

    let total = kept.len() + 20;
    let found = weather_testkit::pyiceberg_check_with(&[
        &harness.catalog_url,
        "weather",
        &harness.s3.endpoint,
        "default.weather",
        "--duckdb",
    ])
    .expect("pyiceberg");
    assert_eq!(found["rows"], total, "PyIceberg");
    assert_eq!(found["duckdb"]["rows"], total, "DuckDB");
    assert_eq!(
        found["duckdb"]["per_city"], found["per_city"],
        "DuckDB and PyIceberg per city"
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let _server = ChildGuard::spawn_ready(
        "query-server",
        Command::new(weather_testkit::workspace_binary("query-server"))
            .args(["--listen", &addr, "--warehouse", &harness.warehouse])
            .env("CATALOG_URL", &harness.catalog_url),
        Duration::from_secs(60),
    )
    .expect("query-server");
    let answer = weather_testkit::trino_statement(&addr, "SELECT count(*) FROM iceberg.default.weather")
        .await
        .expect("count");
    assert_eq!(
        weather_testkit::trino_rows(&answer),
        [serde_json::json!([total])],
        "the query-server"
    );
}

/// Maintenance as slow as on a large table (held 12 s before each commit, longer than the
/// group's poll limit of 8 s) runs beside the commits: they go on at their interval meanwhile,
/// the group does not evict the sink, and the rewrite lands on the appends made meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn slow_maintenance_neither_holds_commits_back_nor_costs_the_group_membership() {
    let harness = Harness::start().await;
    let (_, readings) = readings(2_000);
    let args = [
        "--commit-interval",
        "200ms",
        "--maintenance-interval",
        "1ms",
        "--max-unmerged-manifests",
        "2",
        "--maintenance-delay",
        "12s",
        "--kafka-option",
        "session.timeout.ms=6000",
        "--kafka-option",
        "max.poll.interval.ms=8000",
    ];
    let mut sink = harness.sink(&args);
    let mut sent = 0;
    for (i, slice) in readings.chunks(100).enumerate() {
        produce_readings(&harness.brokers(), "weather", slice).expect("produce");
        sent += slice.len() as i64;
        // The first waits for the group to assign the partitions.
        let timeout = Duration::from_secs(if i == 0 { 30 } else { 3 });
        let committed = harness.wait_committed(sent, timeout).await;
        assert_eq!(
            committed, sent,
            "a commit within 3 s of the readings, maintenance running"
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let metrics = http_get(&harness.admin, "/metrics").await.expect("metrics").body;
    let value = |name: &str| metric(&metrics, name).unwrap_or(-1.0);
    assert!(value("iceberg_sink_maintenance_runs_total") >= 1.0, "{metrics}");
    assert!(value("iceberg_sink_maintenance_rebases_total") >= 1.0, "{metrics}");
    assert_eq!(value("iceberg_sink_maintenance_failures_total"), 0.0, "{metrics}");
    assert_eq!(
        value("iceberg_sink_rebalances_total"),
        1.0,
        "assigned once, never evicted: {metrics}"
    );
    assert_eq!(value("iceberg_sink_fenced_partitions_total"), 0.0, "{metrics}");
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    assert_eq!(harness.rows().await, expected_rows(&readings));
}

/// Records that are not readings move the table's checkpoint although they add no row: after a
/// kill -9 and a restart they are neither read nor dead-lettered again.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_alone_move_the_checkpoint_and_are_sent_once() {
    let harness = Harness::start().await;
    let (_, readings) = readings(500);
    produce_readings(&harness.brokers(), "weather", &readings).expect("produce");
    let args = ["--commit-interval", "200ms"];
    let mut sink = harness.sink(&args);
    assert_eq!(harness.wait_committed(500, Duration::from_secs(60)).await, 500);
    let bad: Vec<(Vec<u8>, Vec<u8>)> = (0..5)
        .map(|i| (format!("bad-{i}").into_bytes(), b"not json".to_vec()))
        .collect();
    produce(&harness.brokers(), "weather", &bad).expect("produce");
    assert_eq!(
        harness.wait_committed(505, Duration::from_secs(30)).await,
        505,
        "the checkpoint moved past the dead letters"
    );
    sink.kill9();
    let mut sink = harness.sink(&args);
    // Positioned at the checkpoint, or past the bad records after reading them again.
    let read = |metrics: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("iceberg_sink_read_offset{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    harness
        .wait_metrics(Duration::from_secs(30), "got to 505", |m| read(m) == 505.0)
        .await;
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    let dead = consume(&harness.brokers(), "weather.dlq", 5, Duration::from_secs(10)).expect("dlq");
    assert_eq!(dead.len(), 5, "each bad record dead-lettered once");
    assert_eq!(harness.rows().await, expected_rows(&readings));
}

/// A crash after a dead letter was acknowledged and before the checkpoint past it was committed
/// reads the record again: it is not dead-lettered again, across two such crashes.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_sent_before_a_crash_is_not_sent_again() {
    let harness = Harness::start().await;
    let bad = |from: usize, to: usize| -> Vec<(Vec<u8>, Vec<u8>)> {
        (from..to)
            .map(|i| (format!("bad-{i}").into_bytes(), b"not json".to_vec()))
            .collect()
    };
    // Never commits by itself: every kill lands between the letters and their checkpoint.
    let idle = ["--commit-interval", "1h"];
    let mut sink = harness.sink(&idle);
    produce(&harness.brokers(), "weather", &bad(0, 3)).expect("produce");
    assert_eq!(
        consume(&harness.brokers(), "weather.dlq", 3, Duration::from_secs(30))
            .expect("dlq")
            .len(),
        3
    );
    sink.kill9();
    let mut sink = harness.sink(&idle);
    harness
        .wait_metrics(Duration::from_secs(30), "owns a partition", |m| {
            m.lines().any(|l| l.starts_with("iceberg_sink_partition_owned{"))
        })
        .await;
    produce(&harness.brokers(), "weather", &bad(3, 5)).expect("produce");
    let dead = consume(&harness.brokers(), "weather.dlq", 5, Duration::from_secs(30)).expect("dlq");
    assert_eq!(
        dead.len(),
        5,
        "the first three were not sent again after the first crash"
    );
    sink.kill9();
    let (_, readings) = readings(20);
    produce_readings(&harness.brokers(), "weather", &readings).expect("produce");
    let mut sink = harness.sink(&["--commit-interval", "200ms"]);
    assert_eq!(harness.wait_committed(25, Duration::from_secs(60)).await, 25);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    let dead = consume(&harness.brokers(), "weather.dlq", 5, Duration::from_secs(10)).expect("dlq");
    let mut keys: Vec<_> = dead.iter().filter_map(|m| m.key()).map(<[u8]>::to_vec).collect();
    keys.sort();
    assert_eq!(
        keys,
        bad(0, 5).into_iter().map(|(k, _)| k).collect::<Vec<_>>(),
        "each once"
    );
    assert_eq!(harness.rows().await, expected_rows(&readings));
}

/// Maintenance commits with the catalog's own compare-and-set: on the table's row of
/// `iceberg_tables`, told apart from a view's by `iceberg_type`, NULL in catalogs made before
/// Iceberg had views. Its commit and the catalog's own commits follow each other either way.
#[tokio::test(flavor = "multi_thread")]
async fn maintenance_commits_on_the_tables_catalog_row_as_the_catalog_does() {
    let harness = Harness::start().await;
    let (_, readings) = readings(900);
    let chunks: Vec<&[WeatherReading]> = readings.chunks(100).collect();
    let mut table = harness.table().await;
    let mut committed = Checkpoints::new();
    let policy = Policy {
        max_unmerged_manifests: 0,
        ..iceberg_sink::maintainer::default_policy().expect("the sink's defaults")
    };
    let db = weather_testkit::connect(&harness.catalog_url)
        .await
        .expect("catalog database");
    for (i, record_type) in [Some("TABLE"), None].into_iter().enumerate() {
        for chunk in &chunks[i * 4..i * 4 + 4] {
            append(&mut table, &mut committed, chunk).await;
        }
        db.execute("UPDATE iceberg_tables SET iceberg_type = $1", &[&record_type])
            .await
            .expect("iceberg_type");
        let before = table.table.metadata_location().expect("location").to_owned();
        let report = table.maintain("weather", &policy).await.expect("maintenance");
        assert!(report.merged.is_some(), "{record_type:?}: {report:?}");
        let row = db
            .query_one(
                "SELECT metadata_location FROM iceberg_tables WHERE table_name = 'weather'",
                &[],
            )
            .await
            .expect("catalog row");
        assert_eq!(
            row.get::<_, String>(0),
            table.table.metadata_location().expect("location"),
            "{record_type:?}: the catalog points at the maintenance's metadata"
        );
        // A file of its own: one written over the current one would make the compare-and-set
        // pass for a writer that loaded the table before.
        assert_ne!(row.get::<_, String>(0), before, "{record_type:?}: a new metadata file");
    }
    // The catalog's own commit follows the maintenance's.
    append(&mut table, &mut committed, chunks[8]).await;
    assert_eq!(harness.rows().await, expected_rows(&readings));
}

/// The first start of several sinks and query-servers on a new catalog: each creates the SQL
/// catalog's tables if they are missing, at the same moment, and PostgreSQL can answer all but
/// one of those `CREATE TABLE IF NOT EXISTS` with a unique violation. Every one must open the
/// table at its first attempt, not by a restart.
#[tokio::test(flavor = "multi_thread")]
async fn many_first_starts_at_once_on_a_new_catalog_all_open_the_table() {
    for round in 0..5 {
        let harness = Harness::start().await;
        let opened = futures::future::join_all((0..8).map(|_| harness.table())).await;
        let ids: std::collections::BTreeSet<_> = opened.iter().map(|t| t.table.metadata().uuid()).collect();
        assert_eq!(ids.len(), 1, "round {round}: one table, opened by all: {ids:?}");
    }
}
