//! The daemons of the pipeline as systemd would run them, each a private process, against a
//! mock Kafka cluster (or nisshi), PostgreSQL and an S3 server, with several instances of the
//! consumers where asked; and the exactly-once check of everything a [`Load`] was told.

use std::{
    collections::{BTreeMap, HashSet},
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    ChildGuard, MockKafka, Nisshi, Postgres, S3Server, build_workspace_binaries, connect, free_port, http_get,
    load::{Key, Load, Tally, per_city},
    metric, pyiceberg_readings, workspace_binary,
};

/// The daemons a [`Stack`] runs.
pub const DAEMONS: [&str; 4] = ["logging-server", "window-aggregator", "iceberg-sink", "dashboard"];

/// The daemons that consume the topic, which a [`Stack`] can run several instances of.
pub const CONSUMERS: [&str; 2] = ["window-aggregator", "iceberg-sink"];

/// A daemon instance: its name and number.
pub type Instance = (&'static str, usize);

pub struct Stack {
    pub kafka: MockKafka,
    /// The broker the daemons use instead of `kafka`, when set.
    pub nisshi: Option<Nisshi>,
    pub postgres: Postgres,
    pub s3: S3Server,
    pub database_url: String,
    pub catalog_url: String,
    listen: BTreeMap<Instance, String>,
    pub running: BTreeMap<Instance, ChildGuard>,
}

impl Stack {
    /// One instance of each daemon, the topic in 3 partitions.
    pub async fn start() -> Self {
        Self::start_with(1, 3).await
    }

    /// `instances` of each consumer and one of the others; the topic in `partitions`.
    pub async fn start_with(instances: usize, partitions: i32) -> Self {
        Self::start_on(None, instances, partitions).await
    }

    /// As [`Stack::start_with`], on nisshi with its log on disk (as `pipeline` runs it) instead of librdkafka's
    /// mock cluster.
    pub async fn start_on_nisshi(instances: usize, partitions: i32) -> Self {
        let nisshi = Nisshi::start_on_disk().expect("nisshi");
        let mut kafka = weather_common::kafka::KafkaArgs::new(nisshi.brokers.clone());
        kafka.topic_partitions = partitions;
        kafka.ensure_topics(&["weather", "weather.dlq"]).await.expect("topics");
        Self::start_on(Some(nisshi), instances, partitions).await
    }

    async fn start_on(nisshi: Option<Nisshi>, instances: usize, partitions: i32) -> Self {
        build_workspace_binaries();
        let kafka = MockKafka::start_with(&["weather", "weather.dlq"], partitions);
        let postgres = Postgres::start().expect("PostgreSQL");
        let database_url = postgres.create_database("weather").await.expect("database");
        let catalog_url = postgres.create_database("iceberg").await.expect("catalog database");
        let s3 = S3Server::start().await.expect("S3 server");
        let listen = DAEMONS
            .into_iter()
            .flat_map(|name| {
                let count = if CONSUMERS.contains(&name) { instances } else { 1 };
                (0..count).map(move |i| (name, i))
            })
            .map(|instance| (instance, format!("127.0.0.1:{}", free_port())))
            .collect();
        let mut stack = Self {
            kafka,
            nisshi,
            postgres,
            s3,
            database_url,
            catalog_url,
            listen,
            running: BTreeMap::new(),
        };
        let all: Vec<Instance> = stack.listen.keys().copied().collect();
        for instance in all {
            stack.spawn_instance(instance);
        }
        stack
    }

    /// The broker the daemons use.
    pub fn brokers(&self) -> String {
        match &self.nisshi {
            Some(nisshi) => nisshi.brokers.clone(),
            None => self.kafka.brokers(),
        }
    }

    /// Where the first instance of `name` listens.
    pub fn addr(&self, name: &str) -> &str {
        self.instance_addr((self.canonical(name), 0))
    }

    pub fn instance_addr(&self, instance: Instance) -> &str {
        &self.listen[&instance]
    }

    fn canonical(&self, name: &str) -> &'static str {
        DAEMONS.into_iter().find(|d| *d == name).expect("a daemon of the stack")
    }

    /// The instances of `name` the stack has (running or not).
    pub fn instances(&self, name: &str) -> Vec<Instance> {
        self.listen.keys().filter(|(n, _)| *n == name).copied().collect()
    }

    /// Starts the first instance of `name`.
    pub fn spawn(&mut self, name: &'static str) {
        self.spawn_instance((name, 0));
    }

    /// Starts `instance` as systemd would and waits for READY=1.
    pub fn spawn_instance(&mut self, instance: Instance) {
        let name = instance.0;
        let mut command = Command::new(workspace_binary(name));
        command
            .args(["--listen", self.instance_addr(instance)])
            .env("RUST_LOG", "warn");
        if name != "dashboard" {
            command.args(["--kafka-brokers", &self.brokers()]);
        }
        match name {
            "window-aggregator" => {
                command.args(["--database-url", &self.database_url, "--commit-interval", "200ms"]);
            }
            "iceberg-sink" => {
                command
                    .args(["--catalog-url", &self.catalog_url, "--s3-endpoint", &self.s3.endpoint])
                    .args(["--commit-interval", "1s"])
                    .env("AWS_ACCESS_KEY_ID", "test")
                    .env("AWS_SECRET_ACCESS_KEY", "test");
            }
            "dashboard" => {
                command.args(["--database-url", &self.database_url]);
            }
            _ => {}
        }
        let guard = ChildGuard::spawn_ready(name, &mut command, Duration::from_secs(120)).expect("READY=1");
        self.running.insert(instance, guard);
    }

    /// `window-aggregator rebuild` on the stack's databases and table, with `args`.
    pub fn rebuild(&self, args: &[&str]) -> Command {
        let mut command = Command::new(workspace_binary("window-aggregator"));
        command
            .arg("rebuild")
            .args(["--database-url", &self.database_url])
            .args(["--catalog-url", &self.catalog_url, "--s3-endpoint", &self.s3.endpoint])
            .args(args)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("RUST_LOG", "info");
        command
    }

    /// The window rows as `(city, start in epoch milliseconds) → (readings, temperature sum)`.
    pub async fn windows(&self) -> BTreeMap<(String, i64), (i64, f64)> {
        let client = connect(&self.database_url).await.expect("connect");
        client
            .query(
                "SELECT city, (extract(epoch FROM window_start) * 1000)::int8, record_count, temperature_sum FROM weather",
                &[],
            )
            .await
            .expect("windows")
            .iter()
            .map(|row| ((row.get(0), row.get(1)), (row.get(2), row.get(3))))
            .collect()
    }

    /// The windows of `seconds` that PyIceberg computes from the table's rows, in the shape of
    /// [`Stack::windows`].
    pub fn table_windows(&self, seconds: u64) -> BTreeMap<(String, i64), (i64, f64)> {
        let found = crate::pyiceberg_check_with(&[
            &self.catalog_url,
            "weather",
            &self.s3.endpoint,
            "default.weather",
            "--windows",
            &seconds.to_string(),
        ])
        .expect("PyIceberg");
        serde_json::from_value::<Vec<(String, i64, i64, f64)>>(found["windows"].clone())
            .expect("windows")
            .into_iter()
            .map(|(city, start, count, sum)| ((city, start), (count, sum)))
            .collect()
    }

    /// SIGKILL of the first instance of `name`.
    pub fn kill9(&mut self, name: &'static str) {
        self.kill9_instance((name, 0));
    }

    pub fn kill9_instance(&mut self, instance: Instance) {
        let mut guard = self.running.remove(&instance).expect("running");
        guard.kill9();
    }

    /// SIGTERM of `instance`; waits for it to exit cleanly.
    pub fn stop_instance(&mut self, instance: Instance) {
        let mut guard = self.running.remove(&instance).expect("running");
        let status = guard.terminate(Duration::from_secs(60)).expect("exit");
        assert!(status.success(), "{instance:?} stopped cleanly: {status:?}");
    }

    /// Sends `signal` to a running instance (SIGSTOP, SIGCONT).
    pub fn signal_instance(&self, instance: Instance, signal: i32) {
        self.running[&instance].signal(signal);
    }

    /// A sample of `instance`'s /metrics.
    pub async fn metric(&self, instance: Instance, name: &str) -> Option<f64> {
        let response = http_get(self.instance_addr(instance), "/metrics").await.ok()?;
        metric(&response.body, name)
    }

    /// The partitions `instance` owns, from its /metrics.
    pub async fn owned_partitions(&self, instance: Instance) -> Vec<i32> {
        crate::owned_partitions(self.instance_addr(instance)).await
    }

    /// `(city → readings)` summed over the window rows.
    pub async fn window_counts(&self) -> BTreeMap<String, i64> {
        let Ok(client) = connect(&self.database_url).await else {
            return BTreeMap::new();
        };
        client
            .query("SELECT city, sum(record_count)::int8 FROM weather GROUP BY city", &[])
            .await
            .unwrap_or_default()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    }

    pub async fn window_rows(&self) -> usize {
        let client = connect(&self.database_url).await.expect("connect");
        let row = client
            .query_one("SELECT count(*) FROM weather", &[])
            .await
            .expect("count");
        row.get::<_, i64>(0) as usize
    }

    pub fn table_readings(&self) -> Vec<Key> {
        pyiceberg_readings(&self.catalog_url, "weather", &self.s3.endpoint, "default.weather")
            .unwrap_or_default()
            .into_iter()
            .map(|(city, temperature)| (city, (temperature * 100.0).round() as i64))
            .collect()
    }
}

/// Ledger counts at the end of the previous scenario, so each summary line covers its own.
#[derive(Default, Clone, Copy)]
pub struct Totals {
    sent: u64,
    acknowledged: usize,
    unavailable: u64,
    cut_off: u64,
}

/// Pauses the load, waits for both consumers to catch up, checks exactly-once over the whole
/// table and prints the scenario's summary line; resumes the load.
pub async fn verify(stack: &Stack, load: &Load, scenario: &str, before: &mut Totals) {
    load.pause().await;
    let paused = Instant::now();
    let (totals, acknowledged, unacknowledged, unexpected) = load.with(|l| {
        let totals = Totals {
            sent: l.sent,
            acknowledged: l.acknowledged.len(),
            unavailable: l.unavailable,
            cut_off: l.cut_off,
        };
        (
            totals,
            l.acknowledged.clone(),
            l.unacknowledged.clone(),
            l.unexpected.clone(),
        )
    });
    assert!(
        unexpected.is_empty(),
        "{scenario}: answers other than 200 and 503: {unexpected:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut in_iceberg, mut in_windows) = (None, None);
    let (stored, windows) = loop {
        let stored = stack.table_readings();
        let present: HashSet<&Key> = stored.iter().collect();
        if acknowledged.iter().all(|k| present.contains(k)) {
            in_iceberg.get_or_insert_with(|| paused.elapsed());
        }
        let windows = stack.window_counts().await;
        if windows.values().sum::<i64>() >= stored.len() as i64 {
            in_windows.get_or_insert_with(|| paused.elapsed());
        }
        if (in_iceberg.is_some() && windows == per_city(&stored)) || Instant::now() > deadline {
            break (stored, windows);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let Tally {
        duplicates,
        lost,
        unknown,
        stored_unacknowledged,
    } = Tally::of(&stored, &acknowledged, &unacknowledged);
    println!(
        "{scenario}: sent {}, acknowledged {} ({} answered 503, {} cut off); whole table: {} stored \
         (+{stored_unacknowledged} never acknowledged), duplicates {duplicates}, lost {lost}, \
         PostgreSQL windows count {}; after the load paused, Iceberg had every acknowledged reading in \
         {:.1} s and the windows caught up in {:.1} s",
        totals.sent - before.sent,
        totals.acknowledged - before.acknowledged,
        totals.unavailable - before.unavailable,
        totals.cut_off - before.cut_off,
        stored.len() - stored_unacknowledged,
        windows.values().sum::<i64>(),
        in_iceberg.unwrap_or_default().as_secs_f64(),
        in_windows.unwrap_or_default().as_secs_f64(),
    );
    *before = totals;
    // Recovering "by themselves" means promptly: typically under 10 s (idle windows close 3 s
    // after the last reading); a stalled consumer shows up here.
    let windows_in = in_windows.unwrap_or(Duration::MAX);
    assert!(
        windows_in < Duration::from_secs(30),
        "{scenario}: the windows took {windows_in:?} to catch up"
    );
    assert_eq!(lost, 0, "{scenario}: acknowledged readings missing from Iceberg");
    assert_eq!(duplicates, 0, "{scenario}: readings twice in Iceberg");
    assert!(unknown.is_empty(), "{scenario}: rows nobody sent: {unknown:?}");
    assert_eq!(
        windows,
        per_city(&stored),
        "{scenario}: PostgreSQL windows count what Iceberg holds"
    );

    // The dashboard serves every window row.
    let rows = stack.window_rows().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let api = http_get(stack.addr("dashboard"), "/api/weather").await;
        let points: usize = api
            .ok()
            .filter(|r| r.status == 200)
            .map(|r| {
                r.json()["data"]
                    .as_object()
                    .map_or(0, |d| d.values().filter_map(|v| v.as_array()).map(Vec::len).sum())
            })
            .unwrap_or(0);
        if points == rows {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{scenario}: dashboard shows {points} of {rows} windows"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    load.resume();
}
