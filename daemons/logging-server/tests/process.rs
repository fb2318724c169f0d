//! The logging-server binary as systemd runs it: sd-notify datagrams and the SIGTERM drain.

use std::{collections::BTreeSet, process::Command, time::Duration};

use rdkafka::Message;
use weather_common::WeatherReading;
use weather_testkit::{ChildGuard, MockKafka, NotifySocket, consume, free_port, http_get};

/// The binary on a free port against `kafka`, with `extra` flags; returns once it sent READY=1.
fn start(kafka: &MockKafka, extra: &[&str]) -> (ChildGuard, NotifySocket, String) {
    let notify = NotifySocket::bind().expect("notify socket");
    let addr = format!("127.0.0.1:{}", free_port());
    let server = ChildGuard::spawn(
        "logging-server",
        Command::new(env!("CARGO_BIN_EXE_logging-server"))
            .args(["--listen", &addr, "--kafka-brokers", &kafka.brokers()])
            .args(extra)
            .env("NOTIFY_SOCKET", notify.path())
            .env("RUST_LOG", "warn"),
    )
    .expect("spawn");
    notify.wait_for("READY=1", Duration::from_secs(30)).expect("READY=1");
    (server, notify, addr)
}

#[tokio::test(flavor = "multi_thread")]
async fn notifies_ready_and_stopping_and_drains_in_flight_requests_on_sigterm() {
    let kafka = MockKafka::start(&["weather"]);
    let (mut server, notify, addr) = start(&kafka, &[]);

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

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Uploads that stall part-way hold little memory: `POST /logs` is parsed line by line as it
/// arrives, so 40 uploads stalled after 8 MiB each (2,000 readings and then blank lines) add a
/// few MiB to the server, where buffering the bodies would add over 320 MiB.
#[tokio::test(flavor = "multi_thread")]
async fn stalled_uploads_hold_little_memory() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let kafka = MockKafka::start(&["weather"]);
    let (mut server, _notify, addr) = start(&kafka, &["--body-read-timeout", "120s"]);
    let before = rss_kib(server.pid());

    let mut body: Vec<u8> = (0..2_000)
        .flat_map(|i| format!("{{\"city\":\"Stall City {}\",\"temperature\":{}}}\n", i % 10, i % 100).into_bytes())
        .collect();
    body.resize(8 << 20, b'\n');
    let head = format!(
        "POST /logs HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n",
        16_000_000
    );
    let mut stalled = Vec::new();
    for _ in 0..40 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.expect("connect");
        stream.write_all(head.as_bytes()).await.expect("head");
        stream.write_all(&body).await.expect("body");
        stalled.push(stream);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = rss_kib(server.pid());
    let grown_mib = during.saturating_sub(before) / 1024;
    eprintln!(
        "RSS {} MiB before, {} MiB with 40 stalled 8 MiB uploads",
        before / 1024,
        during / 1024
    );
    assert!(grown_mib < 64, "40 stalled uploads grew the server by {grown_mib} MiB");

    // Each is still a request in progress: finishing it gets the usual answer.
    let mut stream = stalled.pop().expect("one");
    stream.shutdown().await.expect("finish");
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "a body cut short: {answer}");
    drop(stalled);
    assert!(server.terminate(Duration::from_secs(30)).expect("exits").success());
}
