//! Several instances of each consumer: 1, 2 and 4 instances of the window-aggregator and of the
//! iceberg-sink on nisshi, each count on a topic, a database and a table of its own. Once the
//! group has spread the topic's 6 partitions over the instances, `--scale-readings` readings
//! (60 cities, so every partition holds some) are produced at once (about 1M/s, faster than
//! any consumer here reads) and timed until the instances together have taken every one; CPU
//! is the instances' together, so readings per CPU-second is the per-core rate. Then 4 sinks
//! under a steady 200 readings/s with the default 10 s commit interval for a minute: how often
//! one sink's commit meets another's (commit conflicts).

use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use weather_common::{WeatherReading, kafka::KafkaArgs};
use weather_testkit::{ChildGuard, free_port, http_get, metric, owned_partitions, produce_readings};

use crate::{Backbone, Row, cpu_seconds};

const PARTITIONS: i32 = 6;
const CITIES: usize = 60;

/// `count` readings spread over `span` of event time from `base`, `CITIES` cities in turn.
fn readings(count: usize, base: chrono::DateTime<Utc>, span: TimeDelta) -> Vec<WeatherReading> {
    let step = span.num_microseconds().unwrap_or(0) / count.max(1) as i64;
    (0..count)
        .map(|i| WeatherReading {
            city: format!("City {}", i % CITIES),
            temperature: (i % 12_000) as f64 / 100.0,
            ts: base + TimeDelta::microseconds(step * i as i64),
        })
        .collect()
}

/// A consumer's instances: their admin addresses and processes.
struct Instances {
    admins: Vec<String>,
    children: Vec<ChildGuard>,
}

impl Instances {
    fn start(name: &str, count: usize, args: &[String]) -> anyhow::Result<Self> {
        let mut instances = Self {
            admins: Vec::new(),
            children: Vec::new(),
        };
        for _ in 0..count {
            let admin = format!("127.0.0.1:{}", free_port());
            let listen = ["--listen".to_owned(), admin.clone()];
            let child = crate::spawn_daemon(name, listen.iter().chain(args))?;
            instances.admins.push(admin);
            instances.children.push(child);
        }
        Ok(instances)
    }

    /// Waits until every partition is owned and, where there are enough, every instance owns
    /// some; how long that took.
    async fn wait_for_spread(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let mut owned = Vec::new();
            for admin in &self.admins {
                owned.push(owned_partitions(admin).await.len());
            }
            let spread = owned.iter().all(|&n| n > 0 || self.admins.len() > PARTITIONS as usize);
            if spread && owned.iter().sum::<usize>() == PARTITIONS as usize {
                return Ok(started.elapsed());
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(120),
                "the group did not spread the partitions: {owned:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `name` summed over the instances' /metrics.
    async fn sum(&self, name: &str) -> f64 {
        let mut sum = 0.0;
        for admin in &self.admins {
            let body = http_get(admin, "/metrics").await.map(|r| r.body).unwrap_or_default();
            sum += metric(&body, name).unwrap_or(0.0);
        }
        sum
    }

    fn cpu(&self) -> f64 {
        self.children.iter().map(|c| cpu_seconds(c.child.id())).sum()
    }

    fn stop(self) -> anyhow::Result<()> {
        for mut child in self.children {
            child.terminate(Duration::from_secs(60))?;
        }
        Ok(())
    }
}

pub(crate) async fn benchmark(args: &crate::Args, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let backbone = Backbone::start().await?;
    let brokers = backbone.kafka.brokers.clone();
    let total = args.scale_readings as f64;
    let mut base_rates: Vec<(String, f64)> = Vec::new();
    for count in [1usize, 2, 4] {
        let topic = format!("weather-scale-{count}");
        let kafka = KafkaArgs {
            topic_partitions: PARTITIONS,
            ..KafkaArgs::new(&brokers)
        };
        kafka.ensure_topics(&[&topic]).await?;
        let database_url = backbone.postgres.create_database(&format!("scale{count}")).await?;
        let common = |group: &str| {
            vec![
                "--kafka-brokers".to_owned(),
                brokers.clone(),
                "--topic".to_owned(),
                topic.clone(),
                "--group-id".to_owned(),
                format!("{group}-{count}"),
            ]
        };
        for (name, done_metric, extra) in [
            (
                "window-aggregator",
                "window_aggregator_records_total{outcome=\"windowed\"}",
                vec!["--database-url".to_owned(), database_url.clone()],
            ),
            (
                "iceberg-sink",
                "iceberg_sink_records_written_total",
                vec![
                    "--catalog-url".to_owned(),
                    backbone.catalog_url.clone(),
                    "--s3-endpoint".to_owned(),
                    backbone.s3.endpoint.clone(),
                    "--table".to_owned(),
                    format!("weather_scale_{count}"),
                    "--commit-interval".to_owned(),
                    "2s".to_owned(),
                ],
            ),
        ] {
            let instances = Instances::start(name, count, &[common(name), extra].concat())?;
            let settled = instances.wait_for_spread().await?;
            let cpu_before = instances.cpu();
            let before = instances.sum(done_metric).await;
            let started = Instant::now();
            produce_readings(
                &brokers,
                &topic,
                &readings(
                    args.scale_readings,
                    Utc::now() - TimeDelta::hours(2),
                    TimeDelta::hours(1),
                ),
            )?;
            loop {
                let done = instances.sum(done_metric).await - before;
                if done >= total {
                    break;
                }
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(600),
                    "{count} × {name} did not finish: {done} of {total}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let elapsed = started.elapsed().as_secs_f64();
            let cpu = instances.cpu() - cpu_before;
            let rate = total / elapsed;
            let conflicts = if name == "iceberg-sink" {
                format!(
                    ", {} commit conflicts",
                    instances.sum("iceberg_sink_commit_conflicts_total").await
                )
            } else {
                String::new()
            };
            let speedup = match base_rates.iter().find(|(n, _)| n == name) {
                Some((_, base)) => format!(", {:.2}× one instance", rate / base),
                None => {
                    base_rates.push((name.to_owned(), rate));
                    String::new()
                }
            };
            let value = format!(
                "{rate:.0} readings/s ({} in {elapsed:.1} s{speedup}); {:.0} readings per CPU-second{conflicts}; the group spread the partitions {:.1} s after the instances were ready",
                args.scale_readings,
                total / cpu.max(1e-9),
                settled.as_secs_f64(),
            );
            println!("{count} × {name}: {value}");
            rows.push(Row {
                what: format!(
                    "{count} × {name}, {} readings on {PARTITIONS} partitions",
                    args.scale_readings
                ),
                value,
            });
            instances.stop()?;
        }
    }

    // Commit conflicts of 4 sinks at the daemons' default commit interval under steady load.
    let topic = "weather-scale-steady";
    KafkaArgs {
        topic_partitions: PARTITIONS,
        ..KafkaArgs::new(&brokers)
    }
    .ensure_topics(&[topic])
    .await?;
    let sinks = Instances::start(
        "iceberg-sink",
        4,
        &[
            "--kafka-brokers".to_owned(),
            brokers.clone(),
            "--topic".to_owned(),
            topic.to_owned(),
            "--group-id".to_owned(),
            "iceberg-sink-steady".to_owned(),
            "--catalog-url".to_owned(),
            backbone.catalog_url.clone(),
            "--s3-endpoint".to_owned(),
            backbone.s3.endpoint.clone(),
            "--table".to_owned(),
            "weather_scale_steady".to_owned(),
        ],
    )?;
    // Let the group settle before counting.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (conflicts_before, commits_before) = (
        sinks.sum("iceberg_sink_commit_conflicts_total").await,
        sinks.sum("iceberg_sink_commits_total").await,
    );
    let minute = Duration::from_secs(60);
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < minute {
        let batch = readings(200, Utc::now(), TimeDelta::seconds(1));
        produce_readings(&brokers, topic, &batch)?;
        sent += batch.len();
        tokio::time::sleep(
            Duration::from_secs(1).saturating_sub(Duration::from_millis((started.elapsed().as_millis() % 1000) as u64)),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(12)).await;
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let conflicts = sinks.sum("iceberg_sink_commit_conflicts_total").await - conflicts_before;
    let commits = sinks.sum("iceberg_sink_commits_total").await - commits_before;
    let written = sinks.sum("iceberg_sink_records_written_total").await;
    anyhow::ensure!(
        written >= sent as f64,
        "4 sinks wrote {written} of {sent} steady readings"
    );
    let value = format!(
        "{:.1} conflicts per minute ({conflicts} over {commits} commits in {minutes:.1} min), each met by merging again on the other's snapshot; {sent} readings written once",
        conflicts / minutes
    );
    println!("4 sinks, steady: {value}");
    rows.push(Row {
        what: "4 × iceberg-sink at 200 readings/s, commit interval 10 s (default)".to_owned(),
        value,
    });
    sinks.stop()
}
