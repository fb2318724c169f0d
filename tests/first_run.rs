//! A first `scripts/run`: the iceberg-sink and the query-server, the slowest daemons to build,
//! are still being built when `pipeline` starts (`--when-built`). The run must become ready and
//! the dashboard serve without them; once their binaries appear beside `pipeline` they start,
//! the sink writes what was acknowledged before it existed, and Ctrl-C stops everything.

use std::time::{Duration, Instant};

use weather_testkit::{
    ChildGuard, build_workspace_binaries, descendants, http_get, metric,
    pipeline::{self, Ports},
    still_running, trino_rows, trino_statement, workspace_binary,
};

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_does_not_wait_for_the_sink_and_query_servers_build() {
    build_workspace_binaries();
    // `pipeline` runs the daemons beside its own binary (the kernel's path of it, so a copy,
    // not a link): here all but the two built later, for now.
    let bin = tempfile::tempdir().expect("bin dir");
    std::fs::copy(workspace_binary("pipeline"), bin.path().join("pipeline")).expect("copy pipeline");
    let link = |daemon: &str| {
        std::os::unix::fs::symlink(workspace_binary(daemon), bin.path().join(daemon)).expect("link daemon");
    };
    for daemon in ["logging-server", "weather-client", "window-aggregator", "dashboard"] {
        link(daemon);
    }
    let state = tempfile::tempdir().expect("state dir");
    let ports = Ports::free();
    let mut command = pipeline::command_of(
        &bin.path().join("pipeline"),
        state.path(),
        &ports,
        &["--when-built=iceberg-sink", "--when-built=query-server"],
    );
    let mut pipeline = ChildGuard::spawn_ready("pipeline", command.env("RUST_LOG", "warn"), Duration::from_secs(300))
        .expect("pipeline ready without the sink and the query-server");

    let (dashboard, query, logging) = (
        format!("127.0.0.1:{}", ports.dashboard),
        format!("127.0.0.1:{}", ports.query),
        ports.logging(),
    );
    let page = http_get(&dashboard, "/").await.expect("the dashboard answers");
    assert_eq!(page.status, 200, "the dashboard serves");
    let acknowledged_before = || async {
        let metrics = http_get(&logging, "/metrics").await.expect("metrics").body;
        metric(&metrics, "logging_server_records_produced_total").unwrap_or(0.0) as i64
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while acknowledged_before().await == 0 {
        assert!(Instant::now() < deadline, "no reading acknowledged in 30 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        http_get(&query, "/v1/info").await.is_err(),
        "nothing serves SQL before the query-server is built"
    );

    let acknowledged = acknowledged_before().await;
    link("iceberg-sink");
    link("query-server");
    let built = Instant::now();
    let mut counted = 0;
    while counted < acknowledged {
        assert!(
            built.elapsed() < Duration::from_secs(60),
            "60 s after the binaries appeared, SQL counts {counted} of the {acknowledged} readings \
             acknowledged before the sink existed"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(responses) = trino_statement(&query, "SELECT count(*) FROM iceberg.default.weather").await {
            counted = trino_rows(&responses)
                .first()
                .and_then(|row| row[0].as_i64())
                .unwrap_or(0);
        }
    }
    eprintln!(
        "{counted} readings in Iceberg {:?} after the binaries appeared ({acknowledged} acknowledged before)",
        built.elapsed()
    );

    let children = descendants(pipeline.child.id());
    pipeline::ctrl_c(&mut pipeline);
    let alive = still_running(&children, Duration::from_secs(5));
    assert!(alive.is_empty(), "left running after Ctrl-C: {alive:?}");
}
