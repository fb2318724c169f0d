//! window-aggregator as a process against a private PostgreSQL cluster and a Kafka-protocol
//! broker (librdkafka's mock cluster): exact windows, lateness, kill -9 and database restarts.

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use weather_common::WeatherReading;
use weather_testkit::{
    ChildGuard, MockKafka, Postgres, connect, free_port, header, http_get, produce, produce_readings,
};

/// `(city, window_start)` → `(window_end, count, sum)`.
type Windows = BTreeMap<(String, NaiveDateTime), (NaiveDateTime, i64, f64)>;

struct Harness {
    kafka: MockKafka,
    postgres: Postgres,
    database_url: String,
    metrics_addr: String,
}

impl Harness {
    async fn start() -> Self {
        let kafka = MockKafka::start(&["weather", "weather.dlq"]);
        let postgres = Postgres::start().expect("PostgreSQL");
        let database_url = postgres.create_database("weather").await.expect("create database");
        Self {
            kafka,
            postgres,
            database_url,
            metrics_addr: format!("127.0.0.1:{}", free_port()),
        }
    }

    /// Starts the daemon and waits for READY=1.
    fn aggregator(&self, extra: &[&str]) -> ChildGuard {
        ChildGuard::spawn_ready(
            "window-aggregator",
            Command::new(env!("CARGO_BIN_EXE_window-aggregator"))
                .args([
                    "--kafka-brokers",
                    &self.kafka.brokers(),
                    "--database-url",
                    &self.database_url,
                ])
                .args(["--listen", &self.metrics_addr, "--commit-interval", "100ms"])
                .args(extra)
                .env("RUST_LOG", "warn"),
            Duration::from_secs(60),
        )
        .expect("READY=1")
    }

    fn produce(&self, readings: &[WeatherReading]) {
        produce_readings(&self.kafka.brokers(), "weather", readings).expect("produce");
    }

    async fn rows(&self) -> Windows {
        let Ok(client) = connect(&self.database_url).await else {
            return Windows::new();
        };
        let rows = client
            .query(
                "SELECT city, window_start, window_end, record_count, temperature_sum, avg_temperature FROM weather",
                &[],
            )
            .await
            .unwrap_or_default();
        rows.iter()
            .map(|row| {
                let (count, sum, avg): (i64, f64, f64) = (row.get(3), row.get(4), row.get(5));
                assert!(
                    (avg - sum / count as f64).abs() < 1e-9,
                    "avg_temperature is sum / count"
                );
                ((row.get(0), row.get(1)), (row.get(2), count, sum))
            })
            .collect()
    }

    /// Waits until the table holds `expected` exactly (counts equal, sums within rounding).
    async fn wait_for(&self, expected: &Windows, timeout: Duration) -> Windows {
        let deadline = Instant::now() + timeout;
        loop {
            let rows = self.rows().await;
            if same(&rows, expected) || Instant::now() > deadline {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn committed_offsets(&self) -> i64 {
        let Ok(client) = connect(&self.database_url).await else {
            return 0;
        };
        client
            .query_one(
                "SELECT COALESCE(SUM(next_offset), 0)::int8 FROM aggregator_offsets",
                &[],
            )
            .await
            .map(|row| row.get(0))
            .unwrap_or(0)
    }

    async fn metric(&self, name: &str) -> f64 {
        let body = http_get(&self.metrics_addr, "/metrics").await.expect("metrics").body;
        body.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in\n{body}"))
    }
}

fn same(rows: &Windows, expected: &Windows) -> bool {
    rows.len() == expected.len()
        && rows
            .iter()
            .zip(expected)
            .all(|((k1, (e1, n1, s1)), (k2, (e2, n2, s2)))| k1 == k2 && e1 == e2 && n1 == n2 && (s1 - s2).abs() < 1e-6)
}

fn assert_same(rows: &Windows, expected: &Windows) {
    if !same(rows, expected) {
        let missing: Vec<_> = expected
            .iter()
            .filter(|(k, v)| rows.get(*k) != Some(v))
            .take(5)
            .collect();
        let extra: Vec<_> = rows
            .iter()
            .filter(|(k, v)| expected.get(*k) != Some(v))
            .take(5)
            .collect();
        panic!(
            "{} rows, expected {}; expected but not found (first 5): {missing:?}; found but not expected: {extra:?}",
            rows.len(),
            expected.len()
        );
    }
}

/// A time well in the past, aligned to the 5-second windows.
fn base_time(minutes_ago: i64) -> DateTime<Utc> {
    let ts = Utc::now() - TimeDelta::minutes(minutes_ago);
    DateTime::from_timestamp(ts.timestamp() - ts.timestamp().rem_euclid(5), 0).expect("ts")
}

/// Readings for `cities` over `windows` windows with varying counts per window, in event-time
/// order (shuffled within each window), and the windows they must produce.
fn stream(base: DateTime<Utc>, cities: usize, windows: i64, per_window: usize) -> (Vec<WeatherReading>, Windows) {
    let mut readings = Vec::new();
    let mut expected = Windows::new();
    for w in 0..windows {
        let start = base + TimeDelta::seconds(5 * w);
        let mut in_window = Vec::new();
        for c in 0..cities {
            let count = 1 + (c * 7 + w as usize) % per_window;
            for i in 0..count {
                let temperature = ((c * 31 + i * 17 + w as usize * 3) % 12_000) as f64 / 100.0;
                let ts = start + TimeDelta::milliseconds(((i * 997 + c * 13) % 5000) as i64);
                in_window.push(WeatherReading {
                    city: format!("City {c}"),
                    temperature,
                    ts,
                });
                let entry = expected.entry((format!("City {c}"), start.naive_utc())).or_insert((
                    (start + TimeDelta::seconds(5)).naive_utc(),
                    0,
                    0.0,
                ));
                entry.1 += 1;
                entry.2 += temperature;
            }
        }
        // Out of order inside the window, which the watermark allows.
        in_window.sort_by_key(|r| (r.ts.timestamp_subsec_millis() * 7919) % 5000);
        readings.extend(in_window);
    }
    (readings, expected)
}

#[tokio::test(flavor = "multi_thread")]
async fn known_stream_gives_exactly_the_expected_windows() {
    let harness = Harness::start().await;
    let (readings, expected) = stream(base_time(10), 4, 12, 5);
    harness.produce(&readings);
    // A record that is not a reading goes to the dead-letter topic, not into a window.
    produce(
        &harness.kafka.brokers(),
        "weather",
        &[(b"x".to_vec(), b"{not json".to_vec())],
    )
    .expect("produce");
    let mut aggregator = harness.aggregator(&[]);

    let rows = harness.wait_for(&expected, Duration::from_secs(30)).await;
    assert_same(&rows, &expected);
    assert_eq!(harness.metric("window_aggregator_dead_letters_total").await, 1.0);
    let dead =
        weather_testkit::consume(&harness.kafka.brokers(), "weather.dlq", 1, Duration::from_secs(10)).expect("dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(
        aggregator.terminate(Duration::from_secs(20)).expect("exit").code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_order_and_late_readings_land_in_their_window_and_too_late_ones_are_counted() {
    let harness = Harness::start().await;
    let base = base_time(30);
    let at = |s: f64| base + TimeDelta::milliseconds((s * 1000.0) as i64);
    let reading = |t: f64, s: f64| WeatherReading {
        city: "Lateville".into(),
        temperature: t,
        ts: at(s),
    };
    harness.produce(&[
        reading(10.0, 1.0),
        reading(20.0, 6.0),
        reading(30.0, 3.0),  // out of order, window [0,5) still open (watermark 4)
        reading(40.0, 20.0), // watermark 18: [0,5) and [5,10) emitted
        reading(50.0, 12.0), // [10,15) ended before the watermark: a late update
        reading(60.0, 2.0),  // [0,5) late but within a minute: merged
        reading(70.0, 200.0),
        reading(80.0, 4.0), // watermark 198: [0,5) ended 193 s ago: dropped
    ]);
    let _aggregator = harness.aggregator(&[]);
    let window = |s: i64, n: i64, sum: f64| {
        (
            ("Lateville".to_owned(), (base + TimeDelta::seconds(s)).naive_utc()),
            ((base + TimeDelta::seconds(s + 5)).naive_utc(), n, sum),
        )
    };
    let expected: Windows = [
        window(0, 3, 100.0),
        window(5, 1, 20.0),
        window(10, 1, 50.0),
        window(20, 1, 40.0),
        window(200, 1, 70.0),
    ]
    .into_iter()
    .collect();
    let rows = harness.wait_for(&expected, Duration::from_secs(30)).await;
    assert_same(&rows, &expected);
    assert_eq!(
        harness
            .metric("window_aggregator_records_total{outcome=\"dropped_late\"}")
            .await,
        1.0
    );
    assert_eq!(
        harness
            .metric("window_aggregator_records_total{outcome=\"late\"}")
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_and_restart_counts_every_reading_exactly_once() {
    let harness = Harness::start().await;
    let (readings, expected) = stream(base_time(20), 6, 120, 60);
    let total = readings.len() as i64;
    let (first, rest) = readings.split_at(readings.len() / 2);
    harness.produce(first);
    let args = ["--max-records", "300"];
    let mut aggregator = harness.aggregator(&args);
    let mut kills = 0;
    let mut before = 0;
    for batch in [None, Some(rest)] {
        // Kill as soon as this run committed something: mid-stream, with open windows in flight.
        let deadline = Instant::now() + Duration::from_secs(60);
        while harness.committed_offsets().await <= before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        aggregator.kill9();
        let committed = harness.committed_offsets().await;
        before = committed;
        kills += 1;
        eprintln!("kill -9 #{kills} after {committed} of {total} records committed");
        if let Some(rest) = batch {
            harness.produce(rest);
        }
        aggregator = harness.aggregator(&args);
    }
    let rows = harness.wait_for(&expected, Duration::from_secs(60)).await;
    assert_same(&rows, &expected);
    assert_eq!(harness.committed_offsets().await, total, "every offset committed once");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restart_mid_stream_recovers_with_an_exact_result() {
    let harness = Harness::start().await;
    let (readings, expected) = stream(base_time(40), 5, 100, 50);
    let (first, rest) = readings.split_at(readings.len() / 2);
    harness.produce(first);
    let _aggregator = harness.aggregator(&["--max-records", "300"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while harness.committed_offsets().await == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    harness.postgres.stop().expect("stop PostgreSQL");
    harness.produce(rest);
    tokio::time::sleep(Duration::from_secs(2)).await;
    harness.postgres.start_server().expect("start PostgreSQL");

    let rows = harness.wait_for(&expected, Duration::from_secs(90)).await;
    assert_same(&rows, &expected);
    assert!(
        harness.metric("window_aggregator_recoveries_total").await >= 1.0,
        "it noticed the outage"
    );
}

/// A topic that starts over (recreated, or an in-memory broker restarted) is read from its
/// beginning: the stored offsets lie past the end of the new log, and seeking to them would
/// skip the new readings silently.
#[tokio::test(flavor = "multi_thread")]
async fn a_topic_that_starts_over_is_read_from_its_beginning() {
    let mut harness = Harness::start().await;
    let (first, mut expected) = stream(base_time(20), 4, 12, 5);
    harness.produce(&first);
    let mut aggregator = harness.aggregator(&[]);
    assert_same(&harness.wait_for(&expected, Duration::from_secs(30)).await, &expected);
    assert_eq!(
        aggregator.terminate(Duration::from_secs(20)).expect("exit").code(),
        Some(0)
    );

    harness.kafka = MockKafka::start(&["weather", "weather.dlq"]);
    let (second, more) = stream(base_time(10), 4, 6, 5);
    assert!(second.len() < first.len(), "the new log is shorter than the old one");
    harness.produce(&second);
    expected.extend(more);
    let mut aggregator = harness.aggregator(&[]);
    assert_same(&harness.wait_for(&expected, Duration::from_secs(30)).await, &expected);
    assert_eq!(
        aggregator.terminate(Duration::from_secs(20)).expect("exit").code(),
        Some(0)
    );

    // A new log that already reaches past the stored offsets when the aggregator starts: only
    // the records themselves tell it apart from the old one.
    let client = connect(&harness.database_url).await.expect("connect");
    let stored: i64 = client
        .query_one("SELECT count(*) FROM aggregator_offsets WHERE next_offset > 0", &[])
        .await
        .expect("offsets")
        .get(0);
    harness.kafka = MockKafka::start(&["weather", "weather.dlq"]);
    let (third, more) = stream(base_time(5), 4, 20, 5);
    assert!(third.len() > 2 * second.len(), "the new log is longer than the old one");
    harness.produce(&third);
    expected.extend(more);
    let mut aggregator = harness.aggregator(&[]);
    assert_same(&harness.wait_for(&expected, Duration::from_secs(30)).await, &expected);
    assert_eq!(
        harness.metric("window_aggregator_new_logs_total").await,
        stored as f64,
        "every partition with stored offsets is seen to hold a new log"
    );
    assert_eq!(
        aggregator.terminate(Duration::from_secs(20)).expect("exit").code(),
        Some(0)
    );
    assert_eq!(harness.committed_offsets().await, third.len() as i64);
}

/// Readings stamped far ahead of their Kafka record (a wrong clock, a hostile producer) are
/// dead letters: they never move the watermark, so the readings after them all count.
#[tokio::test(flavor = "multi_thread")]
async fn readings_from_the_future_are_dead_letters_and_move_no_watermark() {
    let harness = Harness::start().await;
    let (readings, expected) = stream(base_time(10), 4, 12, 5);
    let (before, after) = readings.split_at(readings.len() / 2);
    harness.produce(before);
    let future: Vec<WeatherReading> = (0..3)
        .map(|i| WeatherReading {
            city: format!("City {i}"),
            temperature: 1.0,
            ts: DateTime::parse_from_rfc3339("2099-01-01T00:00:00Z")
                .expect("ts")
                .to_utc(),
        })
        .collect();
    harness.produce(&future);
    harness.produce(after);
    let mut aggregator = harness.aggregator(&[]);
    assert_same(&harness.wait_for(&expected, Duration::from_secs(30)).await, &expected);
    assert_eq!(harness.metric("window_aggregator_dead_letters_total").await, 3.0);
    let metrics = http_get(&harness.metrics_addr, "/metrics").await.expect("metrics").body;
    assert!(
        !metrics.contains("outcome=\"dropped_late\""),
        "nothing dropped as too late:\n{metrics}"
    );
    let dead =
        weather_testkit::consume(&harness.kafka.brokers(), "weather.dlq", 3, Duration::from_secs(10)).expect("dlq");
    assert_eq!(dead.len(), 3);
    let reason = header(&dead[0], "error").expect("error header");
    assert!(reason.contains("ahead of the record's Kafka timestamp"), "{reason}");
    assert_eq!(
        aggregator.terminate(Duration::from_secs(20)).expect("exit").code(),
        Some(0)
    );
}

/// Windows older than the retention are deleted in batches; newer ones stay.
#[tokio::test(flavor = "multi_thread")]
async fn windows_past_their_retention_are_deleted_in_batches() {
    let harness = Harness::start().await;
    // Connecting applies the migrations, the window_start index among them.
    let _store = window_aggregator::store::Store::connect(&harness.database_url, "weather")
        .await
        .expect("store");
    let client = connect(&harness.database_url).await.expect("connect");
    client
        .batch_execute(
            "INSERT INTO weather (city, avg_temperature, window_start, window_end, record_count)
             SELECT 'Old ' || i, 1.0, now() - interval '40 days' + i * interval '5 seconds',
                    now() - interval '40 days' + (i + 1) * interval '5 seconds', 1
             FROM generate_series(1, 2500) AS i;
             INSERT INTO weather (city, avg_temperature, window_start, window_end, record_count)
             SELECT 'New ' || i, 1.0, now() - interval '1 day', now() - interval '1 day' + interval '5 seconds', 1
             FROM generate_series(1, 10) AS i;",
        )
        .await
        .expect("insert");
    let index: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'weather_window_start'",
            &[],
        )
        .await
        .expect("index")
        .get(0);
    assert_eq!(index, 1, "the window_start index exists");
    let deleted = window_aggregator::store::delete_expired(&client, Duration::from_secs(30 * 86_400))
        .await
        .expect("delete");
    assert_eq!(deleted, 2_500);
    let left: Vec<String> = client
        .query("SELECT city FROM weather ORDER BY city", &[])
        .await
        .expect("select")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left.len(), 10, "{left:?}");
    assert!(left.iter().all(|c| c.starts_with("New")), "{left:?}");
}
