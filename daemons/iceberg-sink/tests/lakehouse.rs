//! iceberg-sink as a process against real components: a Kafka-protocol broker (librdkafka's
//! mock cluster), PostgreSQL as the Iceberg catalog, an S3-compatible server (moto), and
//! PyIceberg as an independent reader of what was written.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn hundred_thousand_readings_over_three_hours_land_once_and_pyiceberg_agrees() {
    let harness = Harness::start().await;
    let (base, readings) = readings(100_000);
    let (first, second) = readings.split_at(50_000);
    produce_readings(&harness.brokers(), "weather", first).expect("produce");
    // Malformed records between good ones go to the dead-letter topic; the rest flows on.
    produce(
        &harness.brokers(),
        "weather",
        &[
            (b"Boston".to_vec(), b"not json".to_vec()),
            (
                b"Boston".to_vec(),
                br#"{"city":"Boston","temperature":"warm","ts":"2026-01-01T00:00:00.000Z"}"#.to_vec(),
            ),
        ],
    )
    .expect("produce bad records");
    produce_readings(&harness.brokers(), "weather", second).expect("produce");

    let mut sink = harness.sink(&["--commit-interval", "1s"]);
    let committed = harness.wait_committed(100_002, Duration::from_secs(120)).await;
    assert_eq!(committed, 100_002, "offsets of every record, good or bad, committed");
    // /metrics shows the same offsets (set just after the catalog commit returns).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = weather_testkit::http_get(&harness.admin, "/metrics")
            .await
            .expect("metrics")
            .body;
        let shown: i64 = metrics
            .lines()
            .filter_map(|l| {
                l.strip_prefix("iceberg_sink_committed_offset{")?
                    .split_once("} ")?
                    .1
                    .parse::<i64>()
                    .ok()
            })
            .sum();
        if shown == 100_002 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/metrics shows {shown} committed:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));

    let rows = harness.rows().await;
    assert_eq!(rows.len(), 100_000);
    assert_eq!(
        rows,
        expected_rows(&readings),
        "every reading exactly once, with its values"
    );

    let dead = consume(&harness.brokers(), "weather.dlq", 2, Duration::from_secs(10)).expect("dlq");
    assert_eq!(dead.len(), 2, "both malformed records dead-lettered");
    let headers: Vec<_> = dead
        .iter()
        .map(|m| {
            use rdkafka::message::Headers;
            let headers = m.headers().expect("headers");
            (0..headers.count())
                .map(|i| headers.get(i))
                .find(|h| h.key == "error")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .expect("error header")
        })
        .collect();
    assert!(headers.iter().any(|h| h.contains("temperature")), "{headers:?}");

    let hour = |h: i64| (base.timestamp() / 3600 + h) as u64;
    let found =
        pyiceberg_check(&harness.catalog_url, "weather", &harness.s3.endpoint, "default.weather").expect("pyiceberg");
    assert_eq!(found["rows"], 100_000, "{found}");
    assert_eq!(found["distinct_ts"], 100_000, "{found}");
    assert_eq!(found["format_version"], 2, "{found}");
    assert_eq!(found["partition_fields"], serde_json::json!(["hour(ts)"]), "{found}");
    assert_eq!(
        found["partition_hours"],
        serde_json::json!([hour(0), hour(1), hour(2)]),
        "{found}"
    );
    assert_eq!(found["compressions"], serde_json::json!(["ZSTD"]), "{found}");
    let sum: f64 = readings.iter().map(|r| r.temperature).sum();
    assert!(
        (found["temperature_sum"].as_f64().expect("sum") - sum).abs() < 1e-3,
        "{found}"
    );
    let offsets: BTreeMap<String, i64> = serde_json::from_str(
        found["snapshot_summary"][offsets_key("weather")]
            .as_str()
            .expect("offsets in the summary"),
    )
    .expect("offsets JSON");
    assert_eq!(offsets.values().sum::<i64>(), 100_002);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_stream_and_restart_keeps_every_reading_exactly_once() {
    let harness = Harness::start().await;
    let (_, readings) = readings(60_000);
    let (first, second) = readings.split_at(40_000);
    produce_readings(&harness.brokers(), "weather", first).expect("produce");
    let args = ["--commit-interval", "200ms", "--max-records", "2000"];
    let mut sink = harness.sink(&args);
    let before = harness.wait_committed(1, Duration::from_secs(60)).await;
    sink.kill9();
    let at_kill = harness.committed().await;
    eprintln!("kill -9 with {at_kill} of 40000 committed (first seen {before})");
    assert!(at_kill < 40_000, "the kill landed mid-stream");

    produce_readings(&harness.brokers(), "weather", second).expect("produce");
    let mut sink = harness.sink(&args);
    assert_eq!(harness.wait_committed(60_000, Duration::from_secs(120)).await, 60_000);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    assert_eq!(harness.rows().await, expected_rows(&readings), "no loss, no duplicate");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_commits_what_is_buffered() {
    let harness = Harness::start().await;
    let (_, readings) = readings(5_000);
    produce_readings(&harness.brokers(), "weather", &readings).expect("produce");
    // No commit would happen for an hour: only the shutdown path can put the rows in the table.
    let mut sink = harness.sink(&["--commit-interval", "1h"]);
    harness.wait_buffered(5_000).await;
    assert_eq!(harness.committed().await, 0, "nothing committed before SIGTERM");
    assert_eq!(sink.terminate(Duration::from_secs(60)).expect("exit").code(), Some(0));
    assert_eq!(harness.committed().await, 5_000);
    assert_eq!(harness.rows().await, expected_rows(&readings));
}

/// A topic that starts over (recreated, or an in-memory broker restarted) is read from its
/// beginning: the table's offsets lie past the end of the new log, and seeking to them would
/// skip the new readings silently.
#[tokio::test(flavor = "multi_thread")]
async fn a_topic_that_starts_over_is_read_from_its_beginning() {
    let mut harness = Harness::start().await;
    let (_, readings) = readings(8_000);
    let (first, rest) = readings.split_at(2_000);
    let (second, third) = rest.split_at(1_000);
    produce_readings(&harness.brokers(), "weather", first).expect("produce");
    let mut sink = harness.sink(&["--commit-interval", "200ms"]);
    assert_eq!(harness.wait_committed(2_000, Duration::from_secs(60)).await, 2_000);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));

    harness.kafka = MockKafka::start(&["weather", "weather.dlq"]);
    produce_readings(&harness.brokers(), "weather", second).expect("produce");
    let mut sink = harness.sink(&["--commit-interval", "200ms"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let committed = harness.committed().await;
        if committed == 1_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "offsets of the new log never committed: {committed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));

    // A new log that already reaches past the table's offsets when the sink starts: only the
    // records themselves tell it apart from the old one.
    harness.kafka = MockKafka::start(&["weather", "weather.dlq"]);
    produce_readings(&harness.brokers(), "weather", third).expect("produce");
    let mut sink = harness.sink(&["--commit-interval", "200ms"]);
    assert_eq!(harness.wait_committed(5_000, Duration::from_secs(60)).await, 5_000);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    assert_eq!(
        harness.rows().await,
        expected_rows(&readings),
        "the readings of all three logs, each once"
    );
}

/// Readings stamped far ahead of their Kafka record are dead letters, not rows: the
/// window-aggregator refuses the same ones, so the table and the windows agree.
#[tokio::test(flavor = "multi_thread")]
async fn readings_from_the_future_are_dead_letters() {
    let harness = Harness::start().await;
    let (_, readings) = readings(1_000);
    produce_readings(&harness.brokers(), "weather", &readings[..500]).expect("produce");
    let future: Vec<WeatherReading> = ["Boston", "Paris"]
        .iter()
        .map(|city| WeatherReading {
            city: (*city).to_owned(),
            temperature: 1.0,
            ts: WeatherReading::now() + chrono::TimeDelta::minutes(10),
        })
        .collect();
    produce_readings(&harness.brokers(), "weather", &future).expect("produce");
    produce_readings(&harness.brokers(), "weather", &readings[500..]).expect("produce");
    let mut sink = harness.sink(&["--commit-interval", "200ms"]);
    assert_eq!(harness.wait_committed(1_002, Duration::from_secs(60)).await, 1_002);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    assert_eq!(
        harness.rows().await,
        expected_rows(&readings),
        "only the readings of now"
    );
    let dead = weather_testkit::consume(&harness.brokers(), "weather.dlq", 2, Duration::from_secs(10)).expect("dlq");
    assert_eq!(dead.len(), 2);
    let reason = weather_testkit::header(&dead[0], "error").expect("error header");
    assert!(reason.contains("more than 1m ahead"), "{reason}");
}

/// On the broker `pipeline` runs, with batches of hundreds of records as a producer with
/// `linger.ms` sends them: a sink killed after commits that end inside batches, and started
/// again, reads nothing twice and skips nothing (the consumer fetches from the checkpoint
/// itself, inside a batch).
#[tokio::test(flavor = "multi_thread")]
async fn a_sink_restarted_inside_batches_reads_nothing_twice_and_skips_nothing() {
    let harness = Harness::start_with_nisshi().await;
    let (_, readings) = readings(2_000);
    let (first, second) = readings.split_at(1_500);
    let produce = |readings: &[WeatherReading]| {
        let records = reading_records(readings);
        let batched = [("linger.ms", "200"), ("batch.num.messages", "500")];
        produce_with(&harness.brokers(), "weather", &records, &batched).expect("produce");
    };
    produce(first);
    let mut sink = harness.sink(&["--commit-interval", "1h", "--max-records", "70"]);
    assert!(harness.wait_committed(700, Duration::from_secs(60)).await >= 700);
    sink.kill9();
    let at_kill = harness.committed().await;
    assert!(
        at_kill < 1_500,
        "killed with {at_kill} of 1500 committed: not inside the batches"
    );

    let mut sink = harness.sink(&["--commit-interval", "200ms"]);
    produce(second);
    assert_eq!(harness.wait_committed(2_000, Duration::from_secs(60)).await, 2_000);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    // Once more from a checkpoint at the end of the log.
    let mut sink = harness.sink(&["--commit-interval", "200ms"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    assert_eq!(harness.rows().await, expected_rows(&readings), "every reading once");
}

/// SIGTERM while the broker is frozen (it holds its connections and answers nothing, as a
/// broker stopped at the same moment can): the sink commits what it read and exits within its
/// bound on leaving the group, instead of waiting for the broker's answer without end.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_the_broker_frozen_commits_and_exits_in_time() {
    let harness = Harness::start_with_nisshi().await;
    let (_, readings) = readings(500);
    produce_readings(&harness.brokers(), "weather", &readings).expect("produce");
    let mut sink = harness.sink(&["--commit-interval", "1h"]);
    harness.wait_buffered(500).await;
    let nisshi = harness.nisshi.as_ref().expect("nisshi");
    nisshi.freeze();
    let stopping = Instant::now();
    let status = sink.terminate(Duration::from_secs(60)).expect("exit");
    let took = stopping.elapsed();
    nisshi.thaw();
    assert_eq!(status.code(), Some(0), "a clean exit");
    assert!(took < Duration::from_secs(20), "exited {took:?} after SIGTERM");
    assert_eq!(
        harness.rows().await,
        expected_rows(&readings),
        "every reading, committed on the way out"
    );
}

/// Maintenance after every commit (manifest merges, compaction of closed hours, snapshot
/// expiry, deleting what no retained snapshot needs) while readings stream in, and the sink killed with kill -9 twice on the way
/// (with maintenance that often, a kill lands in or next to a maintenance commit): every
/// reading is in the table exactly once, PyIceberg reads the same, and the metadata stays small.
#[tokio::test(flavor = "multi_thread")]
async fn maintenance_keeps_every_reading_exactly_once_and_the_metadata_small() {
    let harness = Harness::start().await;
    let (_, readings) = readings(30_000);
    let args = BUSY_MAINTENANCE;
    for (i, chunk) in readings.chunks(10_000).enumerate() {
        produce_readings(&harness.brokers(), "weather", chunk).expect("produce");
        let mut sink = harness.sink(&args);
        let goal = 10_000 * i as i64 + 3_000;
        assert!(harness.wait_committed(goal, Duration::from_secs(120)).await >= goal);
        if i < 2 {
            sink.kill9();
            continue;
        }
        assert_eq!(harness.wait_committed(30_000, Duration::from_secs(120)).await, 30_000);
        // Maintenance runs beside the commits: two more runs, so that one started after the last.
        let runs = |metrics: &str| metric(metrics, "iceberg_sink_maintenance_runs_total").unwrap_or(0.0);
        let before = runs(&http_get(&harness.admin, "/metrics").await.expect("metrics").body);
        let metrics = harness
            .wait_metrics(Duration::from_secs(30), "ran maintenance twice more", |m| {
                runs(m) >= before + 2.0
            })
            .await;
        let value = |name: &str| metric(&metrics, name).unwrap_or(-1.0);
        eprintln!(
            "merges {}, compactions {}, expired {}, deleted {}, snapshots {}, manifests {}, metadata {} bytes",
            value("iceberg_sink_manifest_merges_total"),
            value("iceberg_sink_compacted_partitions_total"),
            value("iceberg_sink_expired_snapshots_total"),
            value("iceberg_sink_deleted_files_total"),
            value("iceberg_sink_table_snapshots"),
            value("iceberg_sink_table_manifests"),
            value("iceberg_sink_table_metadata_bytes"),
        );
        assert!(value("iceberg_sink_manifest_merges_total") > 0.0, "{metrics}");
        assert!(value("iceberg_sink_compacted_partitions_total") > 0.0, "{metrics}");
        assert!(value("iceberg_sink_expired_snapshots_total") > 0.0, "{metrics}");
        assert!(value("iceberg_sink_deleted_files_total") > 0.0, "{metrics}");
        assert_eq!(value("iceberg_sink_maintenance_failures_total"), 0.0, "{metrics}");
        assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    }
    let table = harness.table().await;
    let shape = table.shape().await.expect("shape");
    // Every hour but the newest holds at most --max-files-per-partition (4) files after the last
    // maintenance: compacted into one, plus what the Kafka partitions still behind sent later.
    let files = table.data_files_per_partition().await.expect("files");
    let closed: Vec<usize> = files.values().rev().skip(1).copied().collect();
    assert!(
        closed.iter().all(|&n| n <= 4),
        "files per closed hour partition: {files:?}"
    );
    // Three or four hour partitions, one merged manifest each, plus the appends since.
    assert!(shape.manifests <= 4 + 4, "{shape:?}");
    assert!(shape.snapshots < 40, "{shape:?}");
    assert_eq!(harness.rows().await, expected_rows(&readings), "no loss, no duplicate");
    let found =
        pyiceberg_check(&harness.catalog_url, "weather", &harness.s3.endpoint, "default.weather").expect("pyiceberg");
    assert_eq!(found["rows"], 30_000, "{found}");
    assert_eq!(found["distinct_ts"], 30_000, "{found}");
    assert_totals_true(&found);
}

/// The current snapshot's summary counts the data files the table has: maintenance snapshots
/// record the totals, and the appends after them (which add to the totals before) stay true.
fn assert_totals_true(found: &serde_json::Value) {
    assert_eq!(
        found["snapshot_summary"]["total-data-files"].as_str(),
        Some(found["files"].to_string().as_str()),
        "{found}"
    );
    assert_eq!(
        found["snapshot_summary"]["total-delete-files"].as_str(),
        Some("0"),
        "{found}"
    );
}

/// Maintenance that meets other sinks' appends while it compacts lists its rewrite again on
/// them instead of giving it up (with several sinks appending every few seconds, a compaction of
/// many files would otherwise never land): it lands, and every reading appended before, during
/// and after is in the table once, with the newest offsets.
#[tokio::test(flavor = "multi_thread")]
async fn maintenance_lands_on_top_of_concurrent_appends() {
    let harness = Harness::start().await;
    let (_, readings) = readings(12_000);
    const COMMITS: usize = 120;
    // Each commit takes readings from all three hours: a file in each.
    let batch = |k: usize| -> Vec<WeatherReading> { readings.iter().skip(k).step_by(COMMITS).cloned().collect() };
    let mut writer = harness.table().await;
    let mut committed = Checkpoints::new();
    for k in 0..80 {
        append(&mut writer, &mut committed, &batch(k)).await;
    }
    let policy = Policy {
        max_unmerged_manifests: 4,
        ..iceberg_sink::maintainer::default_policy().expect("the sink's defaults")
    };
    let mut maintainer = harness.table().await;
    let appends = async {
        for k in 80..COMMITS {
            append(&mut writer, &mut committed, &batch(k)).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (report, ()) = tokio::join!(maintainer.maintain("weather", &policy), appends);
    let report = report.expect("maintenance");
    eprintln!("{report:?}");
    assert!(report.merged.is_some(), "the rewrite landed: {report:?}");
    assert_eq!(
        report.compacted_partitions, 2,
        "both closed hours compacted: {report:?}"
    );
    assert!(
        report.rebases > 0,
        "appends came first and the rewrite was listed on them: {report:?}"
    );
    assert_eq!(harness.rows().await, expected_rows(&readings), "no loss, no duplicate");
    assert_eq!(harness.committed().await, 12_000, "the newest offsets");
    let found =
        pyiceberg_check(&harness.catalog_url, "weather", &harness.s3.endpoint, "default.weather").expect("pyiceberg");
    assert_eq!(found["rows"], 12_000, "{found}");
    assert_totals_true(&found);
}

/// Files nothing references, as a sink killed between writing and committing leaves them, are
/// deleted by the orphan sweep once older than `--orphan-age`; everything referenced stays.
#[tokio::test(flavor = "multi_thread")]
async fn the_orphan_sweep_deletes_only_unreferenced_files() {
    let harness = Harness::start().await;
    let (_, readings) = readings(3_000);
    let chunks: Vec<&[WeatherReading]> = readings.chunks(1_000).collect();
    produce_readings(&harness.brokers(), "weather", chunks[0]).expect("produce");
    let mut sink = harness.sink(&["--commit-interval", "200ms"]);
    assert_eq!(harness.wait_committed(1_000, Duration::from_secs(60)).await, 1_000);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));

    let table = harness.table().await;
    let location = table.table.metadata().location().to_owned();
    let strays = [
        format!("{location}/data/ts_hour=1/00000-0-orphan.parquet"),
        format!("{location}/metadata/00099-orphan.metadata.json"),
    ];
    let file_io = table.table.file_io().clone();
    for stray in &strays {
        file_io
            .new_output(stray)
            .expect("output")
            .write("junk".into())
            .await
            .expect("write");
    }
    let exists = |path: String| {
        let file_io = file_io.clone();
        async move { file_io.exists(&path).await.expect("exists") }
    };

    for (chunk, age, kept) in [(chunks[1], "1h", true), (chunks[2], "0s", false)] {
        produce_readings(&harness.brokers(), "weather", chunk).expect("produce");
        let mut sink = harness.sink(&[
            "--commit-interval",
            "200ms",
            "--maintenance-interval",
            "1ms",
            "--orphan-age",
            age,
        ]);
        let goal = if kept { 2_000 } else { 3_000 };
        assert_eq!(harness.wait_committed(goal, Duration::from_secs(60)).await, goal);
        // The sweep runs with the first maintenance, a moment after the start.
        let deadline = Instant::now() + Duration::from_secs(30);
        let metrics = loop {
            let metrics = http_get(&harness.admin, "/metrics").await.expect("metrics").body;
            if metric(&metrics, "iceberg_sink_maintenance_runs_total").unwrap_or(0.0) >= 1.0
                || Instant::now() > deadline
            {
                break metrics;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let deleted = metric(&metrics, "iceberg_sink_orphans_deleted_total").unwrap_or(-1.0);
        assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
        for stray in &strays {
            assert_eq!(exists(stray.clone()).await, kept, "{stray} with --orphan-age {age}");
        }
        assert_eq!(
            deleted,
            if kept { 0.0 } else { 2.0 },
            "orphans deleted with --orphan-age {age}"
        );
    }
    assert_eq!(harness.rows().await, expected_rows(&readings), "every reading once");
    let found =
        pyiceberg_check(&harness.catalog_url, "weather", &harness.s3.endpoint, "default.weather").expect("pyiceberg");
    assert_eq!(found["rows"], 3_000, "{found}");
}
