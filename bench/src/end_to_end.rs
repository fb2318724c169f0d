//! The four daemons running together against nisshi, PostgreSQL and moto: start-up time,
//! memory at idle and under load, and how long an acknowledged reading takes to show up
//! downstream. Each acknowledgement says where the reading was stored (Kafka partition and
//! offset) and its timestamp, so its Iceberg commit and its window can be found exactly.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::{DateTime, NaiveDateTime, Utc};
use tokio_util::sync::CancellationToken;
use weather_common::reading::DEMO_CITIES;
use weather_testkit::{connect, free_port, http_get};

use crate::{Args, Backbone, Row, percentile, rss_mib};

/// A reading the logging-server acknowledged.
struct Ack {
    at: Instant,
    city: String,
    window_start_ms: i64,
    partition: i32,
    offset: i64,
}

/// `(city, window start in ms)` → when it was first seen.
type Seen = Arc<Mutex<HashMap<(String, i64), (Instant, DateTime<Utc>)>>>;

/// Partition → each committed offset the sink showed, with when it first showed it.
type Commits = Arc<Mutex<BTreeMap<i32, Vec<(i64, Instant)>>>>;

pub(crate) async fn benchmark(args: &Args, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let Backbone {
        kafka,
        database_url,
        catalog_url,
        s3,
        postgres: _postgres,
    } = Backbone::start().await?;
    let [logging, aggregator, sink, dashboard] = [(); 4].map(|()| format!("127.0.0.1:{}", free_port()));
    let brokers = kafka.brokers.as_str();
    let specs: [(&str, Vec<&str>); 4] = [
        ("logging-server", vec!["--listen", &logging, "--kafka-brokers", brokers]),
        (
            "window-aggregator",
            vec![
                "--listen",
                &aggregator,
                "--kafka-brokers",
                brokers,
                "--database-url",
                &database_url,
            ],
        ),
        (
            "iceberg-sink",
            vec![
                "--listen",
                &sink,
                "--kafka-brokers",
                brokers,
                "--catalog-url",
                &catalog_url,
                "--s3-endpoint",
                &s3.endpoint,
            ],
        ),
        (
            "dashboard",
            vec!["--listen", &dashboard, "--database-url", &database_url],
        ),
    ];
    let mut daemons = Vec::new();
    for (name, flags) in specs {
        let started = Instant::now();
        let guard = crate::spawn_daemon(name, flags)?;
        daemons.push((name, guard, started.elapsed()));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle: Vec<f64> = daemons.iter().map(|(_, g, _)| rss_mib(g.child.id())).collect();

    let stop = CancellationToken::new();
    let in_postgres = Seen::default();
    let on_dashboard = Seen::default();
    let in_iceberg = Commits::default();
    let watchers = [
        tokio::spawn(watch_postgres(database_url.clone(), in_postgres.clone(), stop.clone())),
        tokio::spawn(watch_dashboard(dashboard.clone(), on_dashboard.clone(), stop.clone())),
        tokio::spawn(watch_sink(sink.clone(), in_iceberg.clone(), stop.clone())),
    ];
    let pids: Vec<u32> = daemons.iter().map(|(_, g, _)| g.child.id()).collect();
    let peak = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut peak = vec![0.0f64; pids.len()];
            while !stop.is_cancelled() {
                for (p, pid) in peak.iter_mut().zip(&pids) {
                    *p = p.max(rss_mib(*pid));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            peak
        }
    });

    let acks = load(&logging, args.e2e_rate, args.e2e_duration).await?;
    let sent = args.e2e_rate as f64 * args.e2e_duration.as_secs_f64();
    println!("end to end: {} of about {sent:.0} readings acknowledged", acks.len());

    // Wait until every acknowledged reading is visible everywhere (or give up after a minute).
    let deadline = Instant::now() + Duration::from_secs(90);
    let (dashboard_latency, iceberg_latency) = loop {
        let dashboard_latency = latencies(&acks, |a| {
            on_dashboard
                .lock()
                .ok()?
                .get(&(a.city.clone(), a.window_start_ms))
                .map(|(at, _)| *at)
        });
        let iceberg_latency = latencies(&acks, |a| {
            in_iceberg
                .lock()
                .ok()?
                .get(&a.partition)?
                .iter()
                .find(|(committed, _)| *committed > a.offset)
                .map(|(_, at)| *at)
        });
        if (dashboard_latency.len() == acks.len() && iceberg_latency.len() == acks.len()) || Instant::now() > deadline {
            break (dashboard_latency, iceberg_latency);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    stop.cancel();
    for watcher in watchers {
        watcher.await??;
    }
    let peak = peak.await?;
    let window_close: Vec<Duration> = {
        let seen = in_postgres.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let mut closes: Vec<Duration> = seen
            .iter()
            .filter_map(|((_, start_ms), (_, at))| {
                let end = DateTime::from_timestamp_millis(start_ms + WINDOW_MS)?;
                (*at - end).to_std().ok()
            })
            .collect();
        closes.sort();
        closes
    };

    let describe = |what: &str, latencies: &[Duration]| {
        format!(
            "p50 {:.2} s, p99 {:.2} s ({} of {} {what})",
            percentile(latencies, 0.5).as_secs_f64(),
            percentile(latencies, 0.99).as_secs_f64(),
            latencies.len(),
            acks.len(),
        )
    };
    let rate = args.e2e_rate;
    rows.push(Row {
        what: format!("end to end at {rate} readings/s: HTTP 200 → its window on the dashboard API"),
        value: describe("readings seen", &dashboard_latency),
    });
    rows.push(Row {
        what: format!("end to end at {rate} readings/s: HTTP 200 → committed to Iceberg (commit interval 10 s)"),
        value: describe("readings seen", &iceberg_latency),
    });
    rows.push(Row {
        what: "window-aggregator: window end → row in PostgreSQL (allowed lateness 2 s)".into(),
        value: format!(
            "p50 {:.2} s, p99 {:.2} s over {} windows",
            percentile(&window_close, 0.5).as_secs_f64(),
            percentile(&window_close, 0.99).as_secs_f64(),
            window_close.len()
        ),
    });
    for (((name, _, ready), idle), peak) in daemons.iter().zip(idle).zip(peak) {
        rows.push(Row {
            what: format!("{name}: cold start and memory"),
            value: format!(
                "READY=1 after {:.0} ms; RSS idle {idle:.0} MiB, peak {peak:.0} MiB at {rate} readings/s",
                ready.as_secs_f64() * 1e3
            ),
        });
    }
    for row in &rows[rows.len() - 7..] {
        println!("{}: {}", row.what, row.value);
    }
    anyhow::ensure!(
        dashboard_latency.len() == acks.len() && iceberg_latency.len() == acks.len(),
        "not every acknowledged reading showed up downstream"
    );
    for (_, mut guard, _) in daemons {
        guard.terminate(Duration::from_secs(60))?;
    }
    Ok(())
}

/// Sorted delays from each acknowledgement to when `seen` first saw it (unseen ones left out).
fn latencies(acks: &[Ack], seen: impl Fn(&Ack) -> Option<Instant>) -> Vec<Duration> {
    let mut delays: Vec<Duration> = acks
        .iter()
        .filter_map(|a| Some(seen(a)?.saturating_duration_since(a.at)))
        .collect();
    delays.sort();
    delays
}

/// `GET /log` at `rate` per second for `duration`, as many independent clients would (a new
/// connection per reading); returns the acknowledged ones.
async fn load(addr: &str, rate: u32, duration: Duration) -> anyhow::Result<Vec<Ack>> {
    let acks = Arc::new(Mutex::new(Vec::new()));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    let started = Instant::now();
    let mut requests = Vec::new();
    let mut i = 0usize;
    while started.elapsed() < duration {
        tick.tick().await;
        let target = format!(
            "/log?city={}&temperature={}",
            DEMO_CITIES[i % DEMO_CITIES.len()].replace(' ', "%20"),
            (i % 10_000) as f64 / 100.0
        );
        i += 1;
        let (addr, acks) = (addr.to_owned(), acks.clone());
        requests.push(tokio::spawn(async move {
            let response = http_get(&addr, &target).await?;
            let at = Instant::now();
            if response.status != 200 {
                return anyhow::Ok(());
            }
            let body: serde_json::Value = serde_json::from_str(&response.body)?;
            let ts = DateTime::parse_from_rfc3339(body["data"]["ts"].as_str().context("ts")?)?;
            let ms = ts.timestamp_millis();
            let ack = Ack {
                at,
                city: body["data"]["city"].as_str().context("city")?.to_owned(),
                window_start_ms: ms - ms.rem_euclid(WINDOW_MS),
                partition: body["kafka"]["partition"].as_i64().context("partition")? as i32,
                offset: body["kafka"]["offset"].as_i64().context("offset")?,
            };
            acks.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push(ack);
            Ok(())
        }));
    }
    for request in requests {
        request.await??;
    }
    let acks = std::mem::take(&mut *acks.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    Ok(acks)
}

/// The aggregator's default window.
const WINDOW_MS: i64 = 5_000;

const POLL: Duration = Duration::from_millis(50);

async fn watch_postgres(url: String, seen: Seen, stop: CancellationToken) -> anyhow::Result<()> {
    let client = connect(&url).await?;
    while !stop.is_cancelled() {
        for row in client.query("SELECT city, window_start FROM weather", &[]).await? {
            let start: NaiveDateTime = row.get(1);
            let key = (row.get(0), start.and_utc().timestamp_millis());
            if let Ok(mut seen) = seen.lock() {
                seen.entry(key).or_insert_with(|| (Instant::now(), Utc::now()));
            }
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

async fn watch_dashboard(addr: String, seen: Seen, stop: CancellationToken) -> anyhow::Result<()> {
    while !stop.is_cancelled() {
        let response = http_get(&addr, "/api/weather").await?;
        let body: serde_json::Value = serde_json::from_str(&response.body)?;
        for (city, points) in body["data"].as_object().into_iter().flatten() {
            for point in points.as_array().into_iter().flatten() {
                let Some(time) = point["time"]
                    .as_str()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                else {
                    continue;
                };
                if let Ok(mut seen) = seen.lock() {
                    seen.entry((city.clone(), time.timestamp_millis()))
                        .or_insert_with(|| (Instant::now(), Utc::now()));
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// Records each new `iceberg_sink_committed_offset` per partition with when it appeared.
async fn watch_sink(addr: String, seen: Commits, stop: CancellationToken) -> anyhow::Result<()> {
    while !stop.is_cancelled() {
        let metrics = http_get(&addr, "/metrics").await?.body;
        for line in metrics.lines() {
            let Some((labels, value)) = line
                .strip_prefix("iceberg_sink_committed_offset{partition=\"")
                .and_then(|rest| rest.split_once("\"} "))
            else {
                continue;
            };
            let (Ok(partition), Ok(offset)) = (labels.parse::<i32>(), value.trim().parse::<i64>()) else {
                continue;
            };
            if let Ok(mut seen) = seen.lock() {
                let history = seen.entry(partition).or_default();
                if history.last().is_none_or(|(last, _)| *last < offset) {
                    history.push((offset, Instant::now()));
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}
