//! weather-client against a running logging-server backed by a Kafka-protocol broker.

use std::time::Duration;

use rdkafka::Message;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weather_client::{Args, Totals};
use weather_common::{WeatherReading, reading::DEMO_CITIES};
use weather_testkit::{MockKafka, consume, http_get};

#[tokio::test(flavor = "multi_thread")]
async fn every_batch_arrives_in_kafka() {
    let kafka = MockKafka::start(&["weather"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let stop_server = CancellationToken::new();
    let server = tokio::spawn(logging_server::run(
        logging_server::Args::with_brokers(&kafka.brokers()),
        listener,
        stop_server.clone(),
    ));
    for _ in 0..100 {
        if http_get(&addr, "/ready").await.is_ok_and(|r| r.status == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let args = <Args as clap::Parser>::parse_from([
        "weather-client",
        "--server-url",
        &format!("http://{addr}"),
        "--count",
        "10",
        "--interval",
        "200ms",
        "--batches",
        "4",
    ]);
    let totals = weather_client::run(args, CancellationToken::new())
        .await
        .expect("client run");
    assert_eq!(
        totals,
        Totals {
            sent: 40,
            ok: 40,
            failed: 0
        }
    );

    let brokers = kafka.brokers();
    let messages = tokio::task::spawn_blocking(move || consume(&brokers, "weather", 40, Duration::from_secs(20)))
        .await
        .expect("join")
        .expect("consume");
    assert_eq!(messages.len(), 40);
    for message in &messages {
        let reading = WeatherReading::from_json(message.payload().unwrap_or_default()).expect("valid");
        assert!(DEMO_CITIES.contains(&reading.city.as_str()), "{}", reading.city);
        assert!((0.0..=120.0).contains(&reading.temperature));
    }
    stop_server.cancel();
    server.await.expect("join").expect("clean exit");
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_server_counts_failures_instead_of_hanging() {
    let port = weather_testkit::free_port();
    let args = <Args as clap::Parser>::parse_from([
        "weather-client",
        "--server-url",
        &format!("http://127.0.0.1:{port}"),
        "--count",
        "3",
        "--batches",
        "1",
        "--retries",
        "2",
    ]);
    let totals = weather_client::run(args, CancellationToken::new())
        .await
        .expect("client run");
    assert_eq!(
        totals,
        Totals {
            sent: 3,
            ok: 0,
            failed: 3
        }
    );
}
