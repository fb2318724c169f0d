//! The logging-server binary as systemd runs it: sd-notify datagrams and the SIGTERM drain.

use std::{collections::BTreeSet, process::Command, time::Duration};

use rdkafka::Message;
use weather_common::WeatherReading;
use weather_testkit::{ChildGuard, MockKafka, NotifySocket, consume, free_port, http_get};

#[tokio::test(flavor = "multi_thread")]
async fn notifies_ready_and_stopping_and_drains_in_flight_requests_on_sigterm() {
    let kafka = MockKafka::start(&["weather"]);
    let notify = NotifySocket::bind().expect("notify socket");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut server = ChildGuard::spawn(
        "logging-server",
        Command::new(env!("CARGO_BIN_EXE_logging-server"))
            .args(["--listen", &addr, "--kafka-brokers", &kafka.brokers()])
            .env("NOTIFY_SOCKET", notify.path())
            .env("RUST_LOG", "warn"),
    )
    .expect("spawn");
    notify.wait_for("READY=1", Duration::from_secs(30)).expect("READY=1");

    // Slow acknowledgements keep the next requests in flight while SIGTERM arrives.
    kafka
        .cluster
        .broker_round_trip_time(1, Duration::from_millis(1500))
        .expect("rtt");
    let cities: Vec<String> = (0..20).map(|i| format!("Drain City {i}")).collect();
    let requests: Vec<_> = cities
        .iter()
        .map(|city| {
            let addr = addr.clone();
            let target = format!("/log?city={}&temperature=42", city.replace(' ', "%20"));
            tokio::spawn(async move { http_get(&addr, &target).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.sigterm();
    let stopping = tokio::task::spawn_blocking(move || {
        let seen = notify.wait_for("STOPPING=1", Duration::from_secs(10));
        (notify, seen)
    });

    for (request, city) in requests.into_iter().zip(&cities) {
        let response = request.await.expect("join").expect("answered, not reset");
        assert_eq!(response.status, 200, "{city}: {}", response.body);
    }
    let (_notify, seen) = stopping.await.expect("join");
    seen.expect("STOPPING=1 after SIGTERM");
    let status = server.wait(Duration::from_secs(30)).expect("exits");
    assert!(status.success(), "exit status {status:?}");
    assert!(std::net::TcpStream::connect(&addr).is_err(), "no longer listening");

    kafka.cluster.broker_round_trip_time(1, Duration::ZERO).expect("rtt");
    let messages = consume(&kafka.brokers(), "weather", cities.len(), Duration::from_secs(20)).expect("consume");
    let stored: BTreeSet<String> = messages
        .iter()
        .map(|m| {
            WeatherReading::from_json(m.payload().unwrap_or_default())
                .expect("valid")
                .city
        })
        .collect();
    assert_eq!(messages.len(), cities.len(), "each acknowledged reading exactly once");
    assert_eq!(stored, cities.iter().cloned().collect());
}
