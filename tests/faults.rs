//! Fault injection under steady load: each daemon killed with SIGKILL in turn and restarted,
//! the broker down for 10 s, PostgreSQL restarted. After each scenario the load pauses and the
//! test checks that every reading acknowledged with 200 is in the Iceberg table exactly once
//! (read by PyIceberg), that the PostgreSQL windows count exactly what the table holds, and
//! that the dashboard serves those windows; it prints one summary line per scenario.
//!
//! Every reading sent is unique (city and temperature encode a sequence number), so a
//! duplicate or a loss is seen per reading, not only in totals. A reading that was not
//! acknowledged (503, connection cut by a kill) may or may not be stored; the summary counts
//! those separately, and both consumers must agree on them.

use std::{
    collections::{BTreeMap, HashSet},
    process::Command,
    time::{Duration, Instant},
};

use weather_testkit::{
    ChildGuard, MockKafka, Postgres, S3Server, build_workspace_binaries, connect, consume, free_port, http_get,
    load::{Key, Load, Tally, per_city},
    produce, pyiceberg_readings, workspace_binary,
};

const DAEMONS: [&str; 4] = ["logging-server", "window-aggregator", "iceberg-sink", "dashboard"];

struct Stack {
    kafka: MockKafka,
    postgres: Postgres,
    s3: S3Server,
    database_url: String,
    catalog_url: String,
    listen: BTreeMap<&'static str, String>,
    running: BTreeMap<&'static str, ChildGuard>,
}

impl Stack {
    async fn start() -> Self {
        build_workspace_binaries();
        let kafka = MockKafka::start(&["weather", "weather.dlq"]);
        let postgres = Postgres::start().expect("PostgreSQL");
        let database_url = postgres.create_database("weather").await.expect("database");
        let catalog_url = postgres.create_database("iceberg").await.expect("catalog database");
        let s3 = S3Server::start().await.expect("S3 server");
        let listen = DAEMONS
            .into_iter()
            .map(|name| (name, format!("127.0.0.1:{}", free_port())))
            .collect();
        let mut stack = Self {
            kafka,
            postgres,
            s3,
            database_url,
            catalog_url,
            listen,
            running: BTreeMap::new(),
        };
        for name in DAEMONS {
            stack.spawn(name);
        }
        stack
    }

    fn addr(&self, name: &str) -> &str {
        &self.listen[name]
    }

    /// Starts `name` as systemd would and waits for READY=1.
    fn spawn(&mut self, name: &'static str) {
        let mut command = Command::new(workspace_binary(name));
        command.args(["--listen", self.addr(name)]).env("RUST_LOG", "warn");
        if name != "dashboard" {
            command.args(["--kafka-brokers", &self.kafka.brokers()]);
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
        self.running.insert(name, guard);
    }

    fn kill9(&mut self, name: &'static str) {
        let mut guard = self.running.remove(name).expect("running");
        guard.kill9();
    }

    /// `(city → readings)` summed over the window rows.
    async fn window_counts(&self) -> BTreeMap<String, i64> {
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

    async fn window_rows(&self) -> usize {
        let client = connect(&self.database_url).await.expect("connect");
        let row = client
            .query_one("SELECT count(*) FROM weather", &[])
            .await
            .expect("count");
        row.get::<_, i64>(0) as usize
    }

    fn table_readings(&self) -> Vec<Key> {
        pyiceberg_readings(&self.catalog_url, "weather", &self.s3.endpoint, "default.weather")
            .unwrap_or_default()
            .into_iter()
            .map(|(city, temperature)| (city, (temperature * 100.0).round() as i64))
            .collect()
    }
}

/// Ledger counts at the end of the previous scenario, so each summary line covers its own.
#[derive(Default, Clone, Copy)]
struct Totals {
    sent: u64,
    acknowledged: usize,
    unavailable: u64,
    cut_off: u64,
}

/// Pauses the load, waits for both consumers to catch up, checks exactly-once over the whole
/// table and prints the scenario's summary line; resumes the load.
async fn verify(stack: &Stack, load: &Load, scenario: &str, before: &mut Totals) {
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

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_readings_survive_crashes_broker_and_database_outages() {
    let mut stack = Stack::start().await;
    let load = Load::start(stack.addr("logging-server"), 4);
    let mut totals = Totals::default();

    tokio::time::sleep(Duration::from_secs(3)).await;
    // Records no consumer can parse go to the dead-letter topic; the load flows on around them.
    let bad: [&[u8]; 2] = [b"not json", br#"{"city":"Boston","temperature":"warm"}"#];
    let records: Vec<_> = bad.iter().map(|b| (b"Boston".to_vec(), b.to_vec())).collect();
    produce(&stack.kafka.brokers(), "weather", &records).expect("produce bad records");
    tokio::time::sleep(Duration::from_secs(3)).await;
    verify(&stack, &load, "steady load", &mut totals).await;

    for name in DAEMONS {
        tokio::time::sleep(Duration::from_secs(3)).await;
        stack.kill9(name);
        tokio::time::sleep(Duration::from_secs(1)).await;
        stack.spawn(name);
        tokio::time::sleep(Duration::from_secs(3)).await;
        verify(&stack, &load, &format!("kill -9 {name}"), &mut totals).await;
    }

    // Broker down for 10 s: 503s (never a 200 for a reading not stored), then recovery.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let unavailable_before = load.with(|l| l.unavailable);
    stack.kafka.cluster.broker_down(1).expect("broker down");
    tokio::time::sleep(Duration::from_secs(10)).await;
    stack.kafka.cluster.broker_up(1).expect("broker up");
    let back = Instant::now();
    while load.with(|l| l.last_ack).is_none_or(|at| at < back) {
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "logging-server did not recover within 5 s of the broker's return"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("broker back: first 200 after {:?}", back.elapsed());
    assert!(
        load.with(|l| l.unavailable) > unavailable_before,
        "clients heard 503 while the broker was down"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    verify(&stack, &load, "broker down 10 s", &mut totals).await;

    // PostgreSQL (windows and the Iceberg catalog) restarted: everyone recovers by themselves.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.postgres.stop().expect("stop PostgreSQL");
    tokio::time::sleep(Duration::from_secs(5)).await;
    stack.postgres.start_server().expect("start PostgreSQL");
    tokio::time::sleep(Duration::from_secs(3)).await;
    verify(&stack, &load, "PostgreSQL restart", &mut totals).await;

    load.stop().await;
    let dead = consume(
        &stack.kafka.brokers(),
        "weather.dlq",
        2 * bad.len(),
        Duration::from_secs(10),
    )
    .expect("dlq");
    for payload in bad {
        let copies = dead
            .iter()
            .filter(|m| rdkafka::Message::payload(*m) == Some(payload))
            .count();
        assert!(
            copies >= 2,
            "{} dead-lettered by both consumers: {copies}",
            String::from_utf8_lossy(payload)
        );
    }
    for (name, mut guard) in std::mem::take(&mut stack.running) {
        let status = guard.terminate(Duration::from_secs(60)).expect("exit");
        assert!(status.success(), "{name} stopped cleanly: {status:?}");
    }
}
