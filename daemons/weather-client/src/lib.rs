//! `weather-client`: sends batches of fake readings to the logging-server's `GET /log`,
//! retrying with backoff when the server cannot store them right now.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use fake::{Fake, faker::address::en::CityName};
use http_body_util::{BodyExt, Empty};
use hyper::{StatusCode, Uri};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use weather_common::reading::DEMO_CITIES;

#[derive(clap::Parser, Debug, Clone)]
#[command(version, about)]
pub struct Args {
    /// Base URL of the logging-server.
    #[arg(long, env = "LOGGING_SERVER_URL", default_value = "http://localhost:9998")]
    pub server_url: String,

    /// Readings per batch.
    #[arg(long, env = "READINGS_PER_BATCH", default_value_t = 10)]
    pub count: usize,

    /// Time between the starts of two batches.
    #[arg(long, env = "BATCH_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub interval: Duration,

    /// Readings per second; overrides --interval (interval = count / rate).
    #[arg(long, env = "READINGS_PER_SECOND")]
    pub rate: Option<f64>,

    /// Stop after this many batches (default: run until stopped).
    #[arg(long, env = "BATCHES")]
    pub batches: Option<u64>,

    /// Use random city names from `fake` instead of the ten demo cities.
    #[arg(long, env = "FAKE_CITIES")]
    pub fake_cities: bool,

    /// Requests in flight at once within a batch.
    #[arg(long, env = "CONCURRENCY", default_value_t = 8)]
    pub concurrency: usize,

    /// Retries per reading after a 503 or a connection failure.
    #[arg(long, env = "RETRIES", default_value_t = 5)]
    pub retries: u32,
}

impl Args {
    fn period(&self) -> anyhow::Result<Duration> {
        match self.rate {
            None => Ok(self.interval),
            Some(rate) if rate.is_finite() && rate > 0.0 => Ok(Duration::from_secs_f64(self.count as f64 / rate)),
            Some(rate) => anyhow::bail!("--rate must be a positive number, got {rate}"),
        }
    }
}

/// What happened to the readings sent so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
}

/// Sends batches until `--batches` is reached or `shutdown` is cancelled; a batch in progress
/// is always finished.
pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<Totals> {
    let period = args.period()?;
    anyhow::ensure!(args.count > 0, "--count must be at least 1");
    let base: Uri = args.server_url.trim_end_matches('/').parse().context("--server-url")?;
    anyhow::ensure!(base.scheme_str() == Some("http"), "--server-url must be an http:// URL");
    let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let sender = Arc::new(Sender {
        client,
        base: args.server_url.trim_end_matches('/').to_owned(),
        retries: args.retries,
    });
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    tracing::info!(server = %args.server_url, count = args.count, ?period, "weather-client starting");
    weather_common::runtime::notify_ready();

    let mut totals = Totals::default();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = 0u64;
    while args.batches.is_none_or(|limit| batch < limit) {
        tokio::select! {
            _ = tick.tick() => {},
            () = shutdown.cancelled() => break,
        }
        batch += 1;
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        for _ in 0..args.count {
            let (city, temperature) = fake_reading(args.fake_cities);
            let sender = sender.clone();
            let permits = permits.clone();
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                sender.send(&city, temperature).await
            });
        }
        let mut outcome = Totals::default();
        while let Some(result) = tasks.join_next().await {
            outcome.sent += 1;
            match result {
                Ok(Ok(())) => outcome.ok += 1,
                Ok(Err(e)) => {
                    outcome.failed += 1;
                    tracing::warn!(error = %e, "reading not logged");
                }
                Err(e) => {
                    outcome.failed += 1;
                    tracing::error!(error = %e, "send task failed");
                }
            }
        }
        tracing::info!(
            batch,
            sent = outcome.sent,
            ok = outcome.ok,
            failed = outcome.failed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "batch done"
        );
        totals.sent += outcome.sent;
        totals.ok += outcome.ok;
        totals.failed += outcome.failed;
    }
    tracing::info!(
        batches = batch,
        sent = totals.sent,
        ok = totals.ok,
        failed = totals.failed,
        "weather-client stopped"
    );
    Ok(totals)
}

/// A city and a temperature in 0–120 °F with two decimals.
pub fn fake_reading(fake_cities: bool) -> (String, f64) {
    let city = if fake_cities {
        CityName().fake::<String>()
    } else {
        DEMO_CITIES[fake::rand::random_range(0..DEMO_CITIES.len())].to_owned()
    };
    let hundredths: u32 = fake::rand::random_range(0..=12_000);
    (city, f64::from(hundredths) / 100.0)
}

struct Sender {
    client: Client<HttpConnector, Empty<Bytes>>,
    base: String,
    retries: u32,
}

impl Sender {
    /// Sends one reading; retries what the server could not store (503) or never saw
    /// (connection failure), never what it refused as invalid.
    async fn send(&self, city: &str, temperature: f64) -> anyhow::Result<()> {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("city", city)
            .append_pair("temperature", &temperature.to_string())
            .finish();
        let uri: Uri = format!("{}/log?{query}", self.base).parse()?;
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0;
        loop {
            let error = match self.client.get(uri.clone()).await {
                Ok(response) if response.status() == StatusCode::OK => return Ok(()),
                Ok(response) => {
                    let status = response.status();
                    let body = response
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let message = format!("{status}: {}", String::from_utf8_lossy(&body));
                    if status != StatusCode::SERVICE_UNAVAILABLE {
                        anyhow::bail!("{city}: {message}");
                    }
                    message
                }
                Err(e) => e.to_string(),
            };
            attempt += 1;
            if attempt > self.retries {
                anyhow::bail!("{city}: giving up after {attempt} attempts: {error}");
            }
            tracing::debug!(%city, attempt, %error, "retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_in_range_with_two_decimals() {
        for fake_cities in [false, true] {
            for _ in 0..1000 {
                let (city, temperature) = fake_reading(fake_cities);
                assert!(weather_common::reading::validate_city(&city).is_ok(), "{city:?}");
                assert!((0.0..=120.0).contains(&temperature));
                assert!(((temperature * 100.0).round() - temperature * 100.0).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn rate_sets_the_period() {
        let args = <Args as clap::Parser>::parse_from(["weather-client", "--count", "10", "--rate", "100"]);
        assert_eq!(args.period().ok(), Some(Duration::from_millis(100)));
        let args = <Args as clap::Parser>::parse_from(["weather-client", "--rate", "0"]);
        assert!(args.period().is_err());
    }
}
