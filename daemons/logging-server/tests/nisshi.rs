//! logging-server against a real out-of-process Kafka-protocol broker (nisshi).

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use logging_server::Args;
use rdkafka::Message;
use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use weather_common::WeatherReading;
use weather_testkit::{Nisshi, consume, http_get};

const READINGS: usize = 10_000;

/// Runs the server in this process and waits until it is ready against the broker.
async fn start_ready(args: Args) -> (String, CancellationToken, JoinHandle<anyhow::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(logging_server::run(args, listener, shutdown.clone()));
    for _ in 0..150 {
        if http_get(&addr, "/ready").await.is_ok_and(|r| r.status == 200) {
            return (addr, shutdown, server);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("logging-server never became ready against nisshi");
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_readings_produced_and_consumed_back() {
    let nisshi = Nisshi::start().expect("nisshi");
    // The broker starts empty: the server must create the topic itself.
    let (addr, shutdown, server) = start_ready(Args::with_brokers(&nisshi.brokers)).await;

    let permits = Arc::new(Semaphore::new(32));
    let requests: Vec<_> = (0..READINGS)
        .map(|i| {
            let addr = addr.clone();
            let permits = permits.clone();
            tokio::spawn(async move {
                let _permit = permits.acquire_owned().await;
                let target = format!("/log?city=City%20{}&temperature={}", i % 10, i as f64 / 100.0);
                http_get(&addr, &target).await
            })
        })
        .collect();
    for request in requests {
        let response = request.await.expect("join").expect("response");
        assert_eq!(response.status, 200, "{}", response.body);
    }

    let brokers = nisshi.brokers.clone();
    let messages =
        tokio::task::spawn_blocking(move || consume(&brokers, "weather", READINGS, Duration::from_secs(120)))
            .await
            .expect("join")
            .expect("consume");
    let mut seen = BTreeSet::new();
    for message in &messages {
        let reading = WeatherReading::from_json(message.payload().unwrap_or_default()).expect("valid record");
        assert_eq!(message.key(), Some(reading.city.as_bytes()));
        let hundredths = (reading.temperature * 100.0).round() as usize;
        assert_eq!(reading.city, format!("City {}", hundredths % 10));
        assert!(seen.insert(hundredths), "duplicate reading {hundredths}");
    }
    assert_eq!(messages.len(), READINGS);
    assert_eq!(seen, (0..READINGS).collect());
    shutdown.cancel();
    server.await.expect("join").expect("clean exit");
}

/// A batch at the documented limit on a healthy broker is answered 200, even with one record
/// per broker batch, the slowest way to send it: readings are handed to the producer as
/// acknowledgements come back, so none waits out its produce timeout in the local queue.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_at_the_limit_is_stored_whole() {
    let nisshi = Nisshi::start().expect("nisshi");
    let mut args = Args::with_brokers(&nisshi.brokers);
    args.kafka.kafka_options.push(("batch.num.messages".into(), "1".into()));
    let limit = args.max_batch_readings;
    let (addr, shutdown, server) = start_ready(args).await;
    let body: String = (0..limit)
        .map(|i| {
            format!(
                "{{\"city\":\"City {}\",\"temperature\":{}}}\n",
                i % 10,
                i as f64 / 100.0
            )
        })
        .collect();
    let started = std::time::Instant::now();
    let response = weather_testkit::http_request(&addr, "POST", "/logs", body.as_bytes())
        .await
        .expect("post");
    eprintln!("{limit} readings in one POST /logs: {:?}", started.elapsed());
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.json()["count"], limit);
    let brokers = nisshi.brokers.clone();
    let messages = tokio::task::spawn_blocking(move || consume(&brokers, "weather", limit, Duration::from_secs(120)))
        .await
        .expect("join")
        .expect("consume");
    assert_eq!(messages.len(), limit, "every reading once");
    shutdown.cancel();
    server.await.expect("join").expect("clean exit");
}
