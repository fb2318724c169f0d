//! iceberg-sink on a table it shares: another engine's commits, deletes and expiry beside
//! it, a broken line of snapshots, slow maintenance, first starts at once on a new catalog, and
//! dead letters sent exactly once across crashes.

mod common;

use common::*;

/// Another engine appends and then expires every older snapshot, the sink's included: the table
/// no longer says where the Kafka partitions stand. The sink must not start over from offset 0
/// (which writes everything the topic holds again): it refuses, says what to do, and resumes
/// exactly when the operator names the consumer group's offsets.
#[tokio::test(flavor = "multi_thread")]
async fn a_broken_line_of_snapshots_stops_the_sink_until_an_operator_says_where_to_resume() {
    let harness = Harness::start_with_warehouse_dir().await;
    let (_, readings) = readings(3_000);
    let (first, second) = readings.split_at(2_000);
    produce_readings(&harness.brokers(), "weather", first).expect("produce");
    let args = ["--commit-interval", "200ms"];
    let mut sink = harness.sink(&args);
    assert_eq!(harness.wait_committed(2_000, Duration::from_secs(60)).await, 2_000);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));

    let other = weather_testkit::pyiceberg_write(
        &harness.catalog_url,
        "weather",
        &harness.s3.endpoint,
        "default.weather",
        &["append:3:Elsewhere", "expire-all"],
    )
    .expect("PyIceberg");
    assert_eq!(other["snapshots"], 1, "{other}");
    produce_readings(&harness.brokers(), "weather", second).expect("produce");

    let (status, stderr) = sink_to_exit(&harness, &args, Duration::from_secs(60));
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("line of snapshots is broken"), "{stderr}");
    assert!(stderr.contains("--resume-from group"), "{stderr}");
    let rows = harness.rows().await;
    assert_eq!(rows.len(), 2_003, "nothing written while the sink refused");

    let mut sink = harness.sink(&["--commit-interval", "200ms", "--resume-from", "group"]);
    assert_eq!(harness.wait_committed(3_000, Duration::from_secs(60)).await, 3_000);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    let mut rows = harness.rows().await;
    let elsewhere: Vec<_> = rows.extract_if(.., |(_, city, _)| city == "Elsewhere").collect();
    assert_eq!(elsewhere.len(), 3, "the other engine's rows are intact");
    assert_eq!(rows, expected_rows(&readings), "no loss, no duplicate");
}

/// Another engine works on the table while the sink writes under load and maintains it as often
/// as it can: it appends, overwrites its own rows, deletes the sink's rows of one city by a
/// filter, and expires every older snapshot; then the sink is killed with -9 and restarted.
/// Every reading is in the table once but those the other engine deleted, which stay deleted
/// through the compactions after; the other engine's rows are as it left them; and PyIceberg,
/// DuckDB and the query-server count the same rows.
#[tokio::test(flavor = "multi_thread")]
async fn another_engines_appends_overwrites_deletes_and_expiry_beside_the_sink_stay_as_it_left_them() {
    let harness = Harness::start_with_warehouse_dir().await;
    let (_, readings) = readings(30_000);
    let args = BUSY_MAINTENANCE;
    // What the other engine deletes: one city's readings before the 24,000th, all committed by
    // then; the third hour goes on receiving files afterwards, so it is compacted after the delete.
    let (city, cut) = (DEMO_CITIES[3], 24_000);
    let before = readings[cut].ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
    produce_readings(&harness.brokers(), "weather", &readings[..cut]).expect("produce");
    let mut sink = harness.sink(&args);
    assert_eq!(
        harness.wait_committed(cut as i64, Duration::from_secs(120)).await,
        cut as i64
    );

    // The other engine's commits and the sink's race each other: the load goes on meanwhile.
    let load = |slices: Vec<WeatherReading>| {
        let brokers = harness.brokers();
        tokio::task::spawn_blocking(move || {
            for slice in slices.chunks(250) {
                produce_readings(&brokers, "weather", slice).expect("produce");
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let other_engine = |operations: &[&str]| {
        let other = weather_testkit::pyiceberg_write(
            &harness.catalog_url,
            "weather",
            &harness.s3.endpoint,
            "default.weather",
            operations,
        )
        .expect("PyIceberg");
        eprintln!("the other engine: {other}");
    };
    let loading = load(readings[cut..28_000].to_vec());
    let delete = format!("delete:city = '{city}' AND ts < '{before}'");
    other_engine(&["append:40:Elsewhere", "overwrite:Elsewhere:20:Overwritten", &delete]);
    loading.await.expect("load");
    // A sink commit above the other engine's: its expiry of everything older keeps the sink's
    // checkpoints (an expiry with nothing of the sink's above stops the sink: see
    // a_broken_line_of_snapshots_stops_the_sink_until_an_operator_says_where_to_resume).
    produce_readings(&harness.brokers(), "weather", &readings[28_000..29_000]).expect("produce");
    assert_eq!(harness.wait_committed(29_000, Duration::from_secs(60)).await, 29_000);
    let loading = load(readings[29_000..].to_vec());
    other_engine(&["expire-all"]);
    loading.await.expect("load");
    assert_eq!(harness.wait_committed(30_000, Duration::from_secs(120)).await, 30_000);
    sink.kill9();

    let mut sink = harness.sink(&args);
    let runs = |metrics: &str| metric(metrics, "iceberg_sink_maintenance_runs_total").unwrap_or(0.0);
    let metrics = harness
        .wait_metrics(Duration::from_secs(60), "ran maintenance twice", |m| runs(m) >= 2.0)
        .await;
    assert_eq!(
        metric(&metrics, "iceberg_sink_maintenance_failures_total"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(harness.wait_committed(30_000, Duration::from_secs(10)).await, 30_000);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));

    let files = harness.table().await.data_files_per_partition().await.expect("files");
    let closed: Vec<usize> = files.values().take(3).copied().collect();
    assert!(
        closed.iter().all(|&n| n <= 4),
        "the closed hours were compacted: {files:?}"
    );
    let kept: Vec<WeatherReading> = readings
        .iter()
        .enumerate()
        .filter(|(i, r)| !(r.city == city && *i < cut))
        .map(|(_, r)| r.clone())
        .collect();
    let mut rows = harness.rows().await;
    let theirs: Vec<_> = rows
        .extract_if(.., |(_, c, _)| !DEMO_CITIES.contains(&c.as_str()))
        .collect();
    assert_eq!(theirs.len(), 20, "{theirs:?}");
    assert!(theirs.iter().all(|(_, c, _)| c == "Overwritten"), "{theirs:?}");
    assert_eq!(
        rows,
        expected_rows(&kept),
        "no loss, no duplicate, the deleted rows stay deleted"
    );

    let total = kept.len() + 20;
    let found = weather_testkit::pyiceberg_check_with(&[
        &harness.catalog_url,
        "weather",
        &harness.s3.endpoint,
        "default.weather",
        "--duckdb",
    ])
    .expect("pyiceberg");
    assert_eq!(found["rows"], total, "PyIceberg");
    assert_eq!(found["duckdb"]["rows"], total, "DuckDB");
    assert_eq!(
        found["duckdb"]["per_city"], found["per_city"],
        "DuckDB and PyIceberg per city"
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let _server = ChildGuard::spawn_ready(
        "query-server",
        Command::new(weather_testkit::workspace_binary("query-server"))
            .args(["--listen", &addr, "--warehouse", &harness.warehouse])
            .env("CATALOG_URL", &harness.catalog_url),
        Duration::from_secs(60),
    )
    .expect("query-server");
    let answer = weather_testkit::trino_statement(&addr, "SELECT count(*) FROM iceberg.default.weather")
        .await
        .expect("count");
    assert_eq!(
        weather_testkit::trino_rows(&answer),
        [serde_json::json!([total])],
        "the query-server"
    );
}

/// Maintenance as slow as on a large table (held 12 s before each commit, longer than the
/// group's poll limit of 8 s) runs beside the commits: they go on at their interval meanwhile,
/// the group does not evict the sink, and the rewrite lands on the appends made meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn slow_maintenance_neither_holds_commits_back_nor_costs_the_group_membership() {
    let harness = Harness::start().await;
    let (_, readings) = readings(2_000);
    let args = [
        "--commit-interval",
        "200ms",
        "--maintenance-interval",
        "1ms",
        "--max-unmerged-manifests",
        "2",
        "--maintenance-delay",
        "12s",
        "--kafka-option",
        "session.timeout.ms=6000",
        "--kafka-option",
        "max.poll.interval.ms=8000",
    ];
    let mut sink = harness.sink(&args);
    let mut sent = 0;
    for (i, slice) in readings.chunks(100).enumerate() {
        produce_readings(&harness.brokers(), "weather", slice).expect("produce");
        sent += slice.len() as i64;
        // The first waits for the group to assign the partitions.
        let timeout = Duration::from_secs(if i == 0 { 30 } else { 3 });
        let committed = harness.wait_committed(sent, timeout).await;
        assert_eq!(
            committed, sent,
            "a commit within 3 s of the readings, maintenance running"
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let metrics = http_get(&harness.admin, "/metrics").await.expect("metrics").body;
    let value = |name: &str| metric(&metrics, name).unwrap_or(-1.0);
    assert!(value("iceberg_sink_maintenance_runs_total") >= 1.0, "{metrics}");
    assert!(value("iceberg_sink_maintenance_rebases_total") >= 1.0, "{metrics}");
    assert_eq!(value("iceberg_sink_maintenance_failures_total"), 0.0, "{metrics}");
    assert_eq!(
        value("iceberg_sink_rebalances_total"),
        1.0,
        "assigned once, never evicted: {metrics}"
    );
    assert_eq!(value("iceberg_sink_fenced_partitions_total"), 0.0, "{metrics}");
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    assert_eq!(harness.rows().await, expected_rows(&readings));
}

/// Records that are not readings move the table's checkpoint although they add no row: after a
/// kill -9 and a restart they are neither read nor dead-lettered again.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_alone_move_the_checkpoint_and_are_sent_once() {
    let harness = Harness::start().await;
    let (_, readings) = readings(500);
    produce_readings(&harness.brokers(), "weather", &readings).expect("produce");
    let args = ["--commit-interval", "200ms"];
    let mut sink = harness.sink(&args);
    assert_eq!(harness.wait_committed(500, Duration::from_secs(60)).await, 500);
    let bad: Vec<(Vec<u8>, Vec<u8>)> = (0..5)
        .map(|i| (format!("bad-{i}").into_bytes(), b"not json".to_vec()))
        .collect();
    produce(&harness.brokers(), "weather", &bad).expect("produce");
    assert_eq!(
        harness.wait_committed(505, Duration::from_secs(30)).await,
        505,
        "the checkpoint moved past the dead letters"
    );
    sink.kill9();
    let mut sink = harness.sink(&args);
    // Positioned at the checkpoint, or past the bad records after reading them again.
    let read = |metrics: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("iceberg_sink_read_offset{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    harness
        .wait_metrics(Duration::from_secs(30), "got to 505", |m| read(m) == 505.0)
        .await;
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    let dead = consume(&harness.brokers(), "weather.dlq", 5, Duration::from_secs(10)).expect("dlq");
    assert_eq!(dead.len(), 5, "each bad record dead-lettered once");
    assert_eq!(harness.rows().await, expected_rows(&readings));
}

/// A crash after a dead letter was acknowledged and before the checkpoint past it was committed
/// reads the record again: it is not dead-lettered again, across two such crashes.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_sent_before_a_crash_is_not_sent_again() {
    let harness = Harness::start().await;
    let bad = |from: usize, to: usize| -> Vec<(Vec<u8>, Vec<u8>)> {
        (from..to)
            .map(|i| (format!("bad-{i}").into_bytes(), b"not json".to_vec()))
            .collect()
    };
    // Never commits by itself: every kill lands between the letters and their checkpoint.
    let idle = ["--commit-interval", "1h"];
    let mut sink = harness.sink(&idle);
    produce(&harness.brokers(), "weather", &bad(0, 3)).expect("produce");
    assert_eq!(
        consume(&harness.brokers(), "weather.dlq", 3, Duration::from_secs(30))
            .expect("dlq")
            .len(),
        3
    );
    sink.kill9();
    let mut sink = harness.sink(&idle);
    harness
        .wait_metrics(Duration::from_secs(30), "owns a partition", |m| {
            m.lines().any(|l| l.starts_with("iceberg_sink_partition_owned{"))
        })
        .await;
    produce(&harness.brokers(), "weather", &bad(3, 5)).expect("produce");
    let dead = consume(&harness.brokers(), "weather.dlq", 5, Duration::from_secs(30)).expect("dlq");
    assert_eq!(
        dead.len(),
        5,
        "the first three were not sent again after the first crash"
    );
    sink.kill9();
    let (_, readings) = readings(20);
    produce_readings(&harness.brokers(), "weather", &readings).expect("produce");
    let mut sink = harness.sink(&["--commit-interval", "200ms"]);
    assert_eq!(harness.wait_committed(25, Duration::from_secs(60)).await, 25);
    assert_eq!(sink.terminate(Duration::from_secs(30)).expect("exit").code(), Some(0));
    let dead = consume(&harness.brokers(), "weather.dlq", 5, Duration::from_secs(10)).expect("dlq");
    let mut keys: Vec<_> = dead.iter().filter_map(|m| m.key()).map(<[u8]>::to_vec).collect();
    keys.sort();
    assert_eq!(
        keys,
        bad(0, 5).into_iter().map(|(k, _)| k).collect::<Vec<_>>(),
        "each once"
    );
    assert_eq!(harness.rows().await, expected_rows(&readings));
}

/// Maintenance commits with the catalog's own compare-and-set: on the table's row of
/// `iceberg_tables`, told apart from a view's by `iceberg_type`, NULL in catalogs made before
/// Iceberg had views. Its commit and the catalog's own commits follow each other either way.
#[tokio::test(flavor = "multi_thread")]
async fn maintenance_commits_on_the_tables_catalog_row_as_the_catalog_does() {
    let harness = Harness::start().await;
    let (_, readings) = readings(900);
    let chunks: Vec<&[WeatherReading]> = readings.chunks(100).collect();
    let mut table = harness.table().await;
    let mut committed = Checkpoints::new();
    let policy = Policy {
        max_unmerged_manifests: 0,
        ..iceberg_sink::maintainer::default_policy().expect("the sink's defaults")
    };
    let db = weather_testkit::connect(&harness.catalog_url)
        .await
        .expect("catalog database");
    for (i, record_type) in [Some("TABLE"), None].into_iter().enumerate() {
        for chunk in &chunks[i * 4..i * 4 + 4] {
            append(&mut table, &mut committed, chunk).await;
        }
        db.execute("UPDATE iceberg_tables SET iceberg_type = $1", &[&record_type])
            .await
            .expect("iceberg_type");
        let before = table.table.metadata_location().expect("location").to_owned();
        let report = table.maintain("weather", &policy).await.expect("maintenance");
        assert!(report.merged.is_some(), "{record_type:?}: {report:?}");
        let row = db
            .query_one(
                "SELECT metadata_location FROM iceberg_tables WHERE table_name = 'weather'",
                &[],
            )
            .await
            .expect("catalog row");
        assert_eq!(
            row.get::<_, String>(0),
            table.table.metadata_location().expect("location"),
            "{record_type:?}: the catalog points at the maintenance's metadata"
        );
        // A file of its own: one written over the current one would make the compare-and-set
        // pass for a writer that loaded the table before.
        assert_ne!(row.get::<_, String>(0), before, "{record_type:?}: a new metadata file");
    }
    // The catalog's own commit follows the maintenance's.
    append(&mut table, &mut committed, chunks[8]).await;
    assert_eq!(harness.rows().await, expected_rows(&readings));
}

/// The first start of several sinks and query-servers on a new catalog: each creates the SQL
/// catalog's tables if they are missing, at the same moment, and PostgreSQL can answer all but
/// one of those `CREATE TABLE IF NOT EXISTS` with a unique violation. Every one must open the
/// table at its first attempt, not by a restart.
#[tokio::test(flavor = "multi_thread")]
async fn many_first_starts_at_once_on_a_new_catalog_all_open_the_table() {
    for round in 0..5 {
        let harness = Harness::start().await;
        let opened = futures::future::join_all((0..8).map(|_| harness.table())).await;
        let ids: std::collections::BTreeSet<_> = opened.iter().map(|t| t.table.metadata().uuid()).collect();
        assert_eq!(ids.len(), 1, "round {round}: one table, opened by all: {ids:?}");
    }
}
