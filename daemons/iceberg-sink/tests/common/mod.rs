//! Shared by the iceberg-sink's tests: the sink as a process against real components (a
//! Kafka-protocol broker, PostgreSQL as the catalog, moto as S3), and readings to feed it.
// Each test file uses part of what is here, and of the imports it passes on.
#![allow(dead_code, unused_imports)]

pub use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

pub use arrow_array::{Array, Float64Array, StringArray, TimestampMicrosecondArray};
pub use chrono::{DateTime, TimeDelta, Utc};
pub use futures::TryStreamExt;
pub use iceberg_sink::{
    maintenance::Policy,
    table::{BrokenLineage, WeatherTable},
};
pub use rdkafka::Message;
pub use weather_common::{
    WeatherReading,
    consumer::{Checkpoint, Checkpoints},
    kafka::KafkaArgs,
    lakehouse::CatalogConfig,
    reading::DEMO_CITIES,
    snapshot_summary::offsets_key,
};
pub use weather_testkit::{
    ChildGuard, MockKafka, Nisshi, Postgres, S3Server, consume, free_port, http_get, metric, produce, produce_readings,
    produce_with, pyiceberg_check, reading_records,
};

pub struct Harness {
    pub kafka: MockKafka,
    /// Used instead of `kafka` when set.
    pub nisshi: Option<Nisshi>,
    pub _postgres: Postgres,
    pub s3: S3Server,
    pub catalog_url: String,
    /// `s3://warehouse/` on `s3`, or a directory.
    pub warehouse: String,
    pub _warehouse_dir: Option<tempfile::TempDir>,
    /// The sink's /health and /metrics address.
    pub admin: String,
}

impl Harness {
    pub async fn start() -> Self {
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
    pub async fn start_with_warehouse_dir() -> Self {
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
    pub async fn start_with_nisshi() -> Self {
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

    pub fn brokers(&self) -> String {
        match &self.nisshi {
            Some(nisshi) => nisshi.brokers.clone(),
            None => self.kafka.brokers(),
        }
    }

    /// The sink on this harness's broker, catalog and warehouse, with `extra` flags.
    pub fn sink_command(&self, extra: &[&str]) -> Command {
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

    pub fn sink(&self, extra: &[&str]) -> ChildGuard {
        ChildGuard::spawn_ready("iceberg-sink", &mut self.sink_command(extra), Duration::from_secs(60))
            .expect("READY=1")
    }

    pub async fn table(&self) -> WeatherTable {
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
    pub async fn committed(&self) -> i64 {
        let table = self.table().await;
        match table.committed_offsets("weather") {
            Ok(offsets) => offsets.values().sum(),
            // Until a sink resumes on a broken line of snapshots: nothing known.
            Err(e) if e.is::<BrokenLineage>() => 0,
            Err(e) => panic!("offsets: {e:#}"),
        }
    }

    pub async fn wait_committed(&self, at_least: i64, timeout: Duration) -> i64 {
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
    pub async fn wait_buffered(&self, count: u64) {
        let buffered = |metrics: &str| metric(metrics, "iceberg_sink_records_consumed_total") == Some(count as f64);
        self.wait_metrics(Duration::from_secs(60), &format!("buffered {count} readings"), buffered)
            .await;
    }

    /// Polls the sink's /metrics until `done` holds, for at most `timeout`; returns them then.
    pub async fn wait_metrics(&self, timeout: Duration, what: &str, done: impl Fn(&str) -> bool) -> String {
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
    pub async fn rows(&self) -> Vec<(i64, String, f64)> {
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
pub const BUSY_MAINTENANCE: [&str; 12] = [
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
pub fn readings(count: usize) -> (DateTime<Utc>, Vec<WeatherReading>) {
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

pub fn expected_rows(readings: &[WeatherReading]) -> Vec<(i64, String, f64)> {
    let mut rows: Vec<_> = readings
        .iter()
        .map(|r| (r.ts.timestamp_micros(), r.city.clone(), r.temperature))
        .collect();
    rows.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    rows
}

/// Appends `batch` to `table` as one commit of partition 0, whose offset counts the readings.
pub async fn append(table: &mut WeatherTable, committed: &mut Checkpoints, batch: &[WeatherReading]) {
    let files = table.write(batch).await.expect("write");
    let offset = committed.get(&0).map_or(0, |c| c.next_offset) + batch.len() as i64;
    let next = Checkpoints::from([(0, Checkpoint::start(offset))]);
    table
        .commit("weather", files, committed, &next, &Default::default())
        .await
        .expect("append");
    *committed = next;
}

/// Runs the sink until it exits on its own (within `timeout`, else it is killed and the test
/// fails): its exit status and what it wrote to stderr.
pub fn sink_to_exit(harness: &Harness, extra: &[&str], timeout: Duration) -> (std::process::ExitStatus, String) {
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
