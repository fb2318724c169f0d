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

use std::time::{Duration, Instant};

use weather_testkit::{
    consume, header,
    load::Load,
    produce,
    stack::{DAEMONS, Stack, Totals, verify},
};

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
        let mut sources: Vec<String> = dead
            .iter()
            .filter(|m| rdkafka::Message::payload(*m) == Some(payload))
            .filter_map(|m| header(m, "source"))
            .collect();
        sources.sort();
        assert_eq!(
            sources,
            ["iceberg-sink", "window-aggregator"],
            "{} dead-lettered once by each consumer, across their kills",
            String::from_utf8_lossy(payload)
        );
    }
    for (name, mut guard) in std::mem::take(&mut stack.running) {
        let status = guard.terminate(Duration::from_secs(60)).expect("exit");
        assert!(status.success(), "{name:?} stopped cleanly: {status:?}");
    }
}
