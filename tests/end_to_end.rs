//! The whole pipeline in one command, checked end to end: every reading the logging-server
//! acknowledged is in the Iceberg table exactly once (read by PyIceberg), the PostgreSQL
//! windows count the same readings per city, the dashboard serves them, and Ctrl-C stops
//! everything cleanly.

use std::{
    collections::BTreeMap,
    os::unix::process::CommandExt,
    process::Command,
    time::{Duration, Instant},
};

use weather_testkit::{
    ChildGuard, build_workspace_binaries, connect, descendants, free_port, http_get, is_root, metric,
    pyiceberg_check_with, still_running, trino_rows, trino_statement, workspace_binary,
};

#[tokio::test(flavor = "multi_thread")]
async fn pipeline_runs_end_to_end_and_stops_cleanly() {
    build_workspace_binaries();
    let state = tempfile::tempdir().expect("state dir");
    let (logging, dashboard, query) = (free_port(), free_port(), free_port());
    let mut pipeline = ChildGuard::spawn_ready(
        "pipeline",
        Command::new(workspace_binary("pipeline"))
            .args(["--state-dir"])
            .arg(state.path())
            .args([
                "--logging-port",
                &logging.to_string(),
                "--dashboard-port",
                &dashboard.to_string(),
                "--query-port",
                &query.to_string(),
            ])
            .args(["--rate", "100", "--client-batches", "250", "--commit-interval", "2s"])
            .env_remove("KAFKA_BROKERS")
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .process_group(0),
        Duration::from_secs(300),
    )
    .expect("pipeline ready");
    let logging = format!("127.0.0.1:{logging}");
    let dashboard = format!("127.0.0.1:{dashboard}");

    // The client sends 2,500 readings over about 25 s; wait until it is done.
    let started = Instant::now();
    let mut acknowledged = 0.0;
    let mut steady_since = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        let metrics = http_get(&logging, "/metrics").await.expect("metrics").body;
        let now = metric(&metrics, "logging_server_records_produced_total").unwrap_or(0.0);
        if now != acknowledged {
            acknowledged = now;
            steady_since = Instant::now();
        } else if acknowledged > 0.0 && steady_since.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let acknowledged = acknowledged as u64;
    eprintln!("{acknowledged} readings acknowledged in {:?}", started.elapsed());
    assert!(
        acknowledged >= 2_000,
        "the client ran at the raised rate: {acknowledged}"
    );

    // Iceberg, through an independent reader: exactly the acknowledged readings.
    let state_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.path().join("state.json")).expect("state.json")).expect("json");
    let database_url = state_json["database_url"].as_str().expect("database_url").to_owned();
    let catalog_url = database_url.replace("/weather", "/iceberg");
    // The warehouse is a directory, or on the S3 server the pipeline found on PATH.
    let s3_endpoint = state_json["s3_endpoint"].as_str().unwrap_or_default();
    let mut check = vec![catalog_url.as_str(), "weather", s3_endpoint, "default.weather"];
    if let Some(file) = state_json["s3_credentials_file"].as_str() {
        check.extend(["--credentials", file]);
    }
    eprintln!(
        "warehouse: {}",
        if s3_endpoint.is_empty() {
            "directory"
        } else {
            s3_endpoint
        }
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let found = loop {
        let found = pyiceberg_check_with(&check).ok();
        if found.as_ref().is_some_and(|f| f["rows"] == acknowledged) || Instant::now() > deadline {
            break found.expect("PyIceberg read the table");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(
        found["rows"], acknowledged,
        "every acknowledged reading exactly once in Iceberg: {found}"
    );
    let per_city: BTreeMap<String, i64> = serde_json::from_value(found["per_city"].clone()).expect("per_city");

    // SQL over Trino's protocol, from the query-server `pipeline` started: the same counts.
    let query = format!("127.0.0.1:{query}");
    let responses = trino_statement(
        &query,
        "SELECT city, count(*) FROM iceberg.default.weather GROUP BY city",
    )
    .await
    .expect("SQL");
    let last = responses.last().expect("responses");
    assert!(last.get("error").is_none(), "{last}");
    let counted: BTreeMap<String, i64> = trino_rows(&responses)
        .iter()
        .map(|row| {
            (
                row[0].as_str().expect("city").to_owned(),
                row[1].as_i64().expect("count"),
            )
        })
        .collect();
    assert_eq!(counted, per_city, "the query-server counts what PyIceberg reads");

    // PostgreSQL windows count the same readings per city.
    let client = connect(&database_url).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(60);
    let windows = loop {
        let rows = client
            .query(
                "SELECT city, sum(record_count)::int8, count(*) FROM weather GROUP BY city",
                &[],
            )
            .await
            .expect("query");
        let counts: BTreeMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let windows: BTreeMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(2))).collect();
        if counts == per_city || Instant::now() > deadline {
            assert_eq!(counts, per_city, "window counts per city match the table");
            break windows;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // The trust boundary: PostgreSQL takes no one without the password, the password is on no
    // command line, and what holds secrets is the pipeline's own.
    let password = std::fs::read_to_string(state.path().join("postgres/password")).expect("password file");
    let password = password.trim();
    assert!(database_url.contains(password), "the daemons' URL carries the password");
    for pid in descendants(pipeline.child.id()) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(password),
            "pid {pid} has the password on its command line"
        );
    }
    // As root the postgres user may pass through the state directory (its group, no listing).
    let state_mode = if is_root() { 0o710 } else { 0o700 };
    for (path, mode) in [("", state_mode), ("postgres/password", 0o600), ("state.json", 0o600)] {
        let meta = std::fs::metadata(state.path().join(path)).expect("exists");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            mode,
            "{path}"
        );
    }
    let port = database_url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .expect("port");
    let psql_as_nobody = |host: &str| {
        Command::new("runuser")
            .args([
                "-u", "nobody", "--", "psql", "-w", "-h", host, "-p", port, "-U", "postgres",
            ])
            .args(["-d", "weather", "-c", "SELECT 1"])
            .env_remove("PGPASSWORD")
            .output()
            .expect("runuser psql")
    };
    if is_root() {
        let socket = state.path().join("postgres/socket");
        for host in ["127.0.0.1", socket.to_str().expect("path")] {
            let output = psql_as_nobody(host);
            assert!(
                !output.status.success(),
                "another OS user connected through {host} without the password"
            );
        }
    }

    // The dashboard serves those windows.
    let api = http_get(&dashboard, "/api/weather").await.expect("api").json();
    for (city, count) in &windows {
        assert_eq!(
            api["data"][city].as_array().map(Vec::len),
            Some(*count as usize),
            "{city} on the dashboard"
        );
    }

    // A crashed daemon is restarted by the supervisor, and `pipeline status` sees it.
    let aggregator = || {
        descendants(pipeline.child.id()).into_iter().find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(17).any(|w| w == b"window-aggregator"))
        })
    };
    let crashed = aggregator().expect("window-aggregator runs");
    kill_9(crashed);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let output = Command::new(workspace_binary("pipeline"))
            .args(["--state-dir"])
            .arg(state.path())
            .arg("status")
            .output()
            .expect("pipeline status");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let restarted = aggregator().is_some_and(|pid| pid != crashed);
        if restarted
            && text
                .lines()
                .any(|l| l.starts_with("window-aggregator") && l.ends_with(" up"))
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "window-aggregator not restarted; status:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(status.contains("last window ends"), "{status}");
    assert!(status.contains("iceberg_sink_last_snapshot_id"), "{status}");

    // PostgreSQL is supervised like the daemons: killed, it is started again on its data.
    let postmaster = || {
        descendants(pipeline.child.id()).into_iter().find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with(b"/") && c.windows(3).any(|w| w == b"-D\0"))
                && std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres")
        })
    };
    let killed = postmaster().expect("PostgreSQL runs under the pipeline");
    kill_9(killed);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let back = postmaster().is_some_and(|pid| pid != killed);
        if back && connect(&database_url).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "PostgreSQL not restarted");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Ctrl-C at a terminal reaches the whole process group: everything stops cleanly, nothing
    // is left running.
    drop(client);
    let children = descendants(pipeline.child.id());
    assert!(
        children.len() >= 5,
        "backbone and daemons ran as children: {children:?}"
    );
    pipeline.signal_group(libc::SIGINT);
    let status = pipeline.wait(Duration::from_secs(120)).expect("pipeline exits");
    assert!(status.success(), "clean shutdown: {status:?}");
    let alive = still_running(&children, Duration::from_secs(5));
    assert!(alive.is_empty(), "orphans left: {alive:?}");
}

/// SIGKILL to `pid`, as `kill -9` from a shell.
fn kill_9(pid: u32) {
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -9 {pid}");
}

/// Standalone, no daemon listens beyond this machine unless told to: every `--listen` default
/// is a loopback address (admin and metrics ports included).
#[test]
fn every_listener_defaults_to_loopback() {
    build_workspace_binaries();
    for daemon in [
        "logging-server",
        "window-aggregator",
        "iceberg-sink",
        "dashboard",
        "query-server",
    ] {
        let help = Command::new(workspace_binary(daemon))
            .arg("--help")
            .output()
            .expect("--help");
        let text = String::from_utf8_lossy(&help.stdout);
        let listen = text
            .split("--listen")
            .nth(1)
            .and_then(|rest| rest.split("[default: ").nth(1))
            .and_then(|rest| rest.split(']').next())
            .unwrap_or_else(|| panic!("{daemon} --help shows no --listen default:\n{text}"));
        let addr: std::net::SocketAddr = listen.parse().expect("a socket address");
        assert!(addr.ip().is_loopback(), "{daemon} listens on {addr} by default");
    }
}
