//! The life of the whole stack the way a person runs it, on one state directory: Ctrl-C at the
//! terminal (SIGINT to the whole process group) under load, `kill -9` of `pipeline` itself
//! under load, `kill -INT` of its pid alone, each followed by a run on the state the last one
//! left; the middle two runs with two instances of each consumer, which take over the single
//! instances' partitions and hand them back. At the end every reading ever answered 200 is in
//! Iceberg exactly once (read by PyIceberg), the PostgreSQL windows count exactly what Iceberg
//! holds, and no stop left a process running.

use std::{
    collections::HashSet,
    os::unix::process::CommandExt,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use weather_testkit::{
    ChildGuard, build_workspace_binaries, connect, descendants, free_port,
    load::{Key, Load, Tally, per_city},
    pyiceberg_readings, still_running, workspace_binary,
};

struct Ports {
    logging: u16,
    dashboard: u16,
    query: u16,
}

/// `pipeline` with its defaults (private PostgreSQL, the durable broker found on PATH), in a
/// process group of its own as a shell runs a job, without the built-in client: the test's
/// load sends readings it can tell apart. `instances` of each consumer.
fn start(state: &Path, ports: &Ports, instances: u16) -> ChildGuard {
    ChildGuard::spawn_ready(
        "pipeline",
        Command::new(workspace_binary("pipeline"))
            .arg("--state-dir")
            .arg(state)
            .args(["--logging-port", &ports.logging.to_string()])
            .args(["--dashboard-port", &ports.dashboard.to_string()])
            .args(["--query-port", &ports.query.to_string()])
            .args(["--no-client", "--commit-interval", "1s"])
            .args(["--instances", &instances.to_string()])
            .env_remove("KAFKA_BROKERS")
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .process_group(0),
        Duration::from_secs(300),
    )
    .expect("pipeline ready")
}

/// What the loads of all runs were told.
#[derive(Default)]
struct Told {
    acknowledged: HashSet<Key>,
    unacknowledged: HashSet<Key>,
}

impl Told {
    /// Stops `load` and adds its final ledger, requests that were in flight included; answers
    /// other than 200, 503 and a cut connection fail the test.
    async fn add(&mut self, load: Load, run: &str) {
        let ledger = load.stop().await;
        let (acknowledged, unacknowledged) = (ledger.acknowledged, ledger.unacknowledged);
        let unexpected = ledger.unexpected;
        assert!(unexpected.is_empty(), "{run}: unexpected answers {unexpected:?}");
        assert!(!acknowledged.is_empty(), "{run}: the load got answers");
        eprintln!(
            "{run}: {} acknowledged, {} not",
            acknowledged.len(),
            unacknowledged.len()
        );
        self.acknowledged.extend(acknowledged);
        self.unacknowledged.extend(unacknowledged);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_readings_survive_ctrl_c_kill_9_of_pipeline_and_reruns() {
    build_workspace_binaries();
    let state = tempfile::tempdir().expect("state dir");
    let ports = Ports {
        logging: free_port(),
        dashboard: free_port(),
        query: free_port(),
    };
    let logging = format!("127.0.0.1:{}", ports.logging);
    let mut told = Told::default();

    // 1. Ctrl-C at the terminal while clients send: one clean drain, exit 0, nothing left.
    let mut pipeline = start(state.path(), &ports, 1);
    let load = Load::start_at(&logging, 4, 0);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let children = descendants(pipeline.child.id());
    pipeline.signal_group(libc::SIGINT);
    let status = pipeline.wait(Duration::from_secs(120)).expect("pipeline exits");
    told.add(load, "Ctrl-C").await;
    assert!(status.success(), "Ctrl-C: clean shutdown, got {status:?}");
    let alive = still_running(&children, Duration::from_secs(5));
    assert!(alive.is_empty(), "Ctrl-C: left running {alive:?}");

    // 2. A second run on that state, two instances of each consumer; `kill -9` of the pipeline
    //    while clients send: every child follows it, and what was acknowledged is in the
    //    broker's log on disk.
    let mut pipeline = start(state.path(), &ports, 2);
    let load = Load::start_at(&logging, 4, 100_000);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let children = descendants(pipeline.child.id());
    pipeline.kill9();
    told.add(load, "kill -9 pipeline").await;
    let alive = still_running(&children, Duration::from_secs(60));
    assert!(alive.is_empty(), "kill -9 pipeline: left running {alive:?}");

    // 3. A third run recovers the killed one's state; `kill -INT` of its pid alone.
    let mut pipeline = start(state.path(), &ports, 2);
    let load = Load::start_at(&logging, 4, 200_000);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let children = descendants(pipeline.child.id());
    pipeline.signal(libc::SIGINT);
    let status = pipeline.wait(Duration::from_secs(120)).expect("pipeline exits");
    told.add(load, "kill -INT pipeline").await;
    assert!(status.success(), "kill -INT: clean shutdown, got {status:?}");
    let alive = still_running(&children, Duration::from_secs(5));
    assert!(alive.is_empty(), "kill -INT: left running {alive:?}");

    // 4. A fourth run: every acknowledged reading once in Iceberg, the windows agree.
    let mut pipeline = start(state.path(), &ports, 1);
    let state_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.path().join("state.json")).expect("state.json")).expect("json");
    let database_url = state_json["database_url"].as_str().expect("database_url").to_owned();
    let catalog_url = database_url.replace("/weather", "/iceberg");
    let client = connect(&database_url).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(120);
    let (stored, windows) = loop {
        let stored: Vec<Key> = pyiceberg_readings(&catalog_url, "weather", "", "default.weather")
            .expect("PyIceberg reads the table")
            .into_iter()
            .map(|(city, temperature)| (city, (temperature * 100.0).round() as i64))
            .collect();
        let windows: std::collections::BTreeMap<String, i64> = client
            .query("SELECT city, sum(record_count)::int8 FROM weather GROUP BY city", &[])
            .await
            .expect("windows")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let tally = Tally::of(&stored, &told.acknowledged, &told.unacknowledged);
        if (tally.lost == 0 && windows == per_city(&stored)) || Instant::now() > deadline {
            break (stored, windows);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let tally = Tally::of(&stored, &told.acknowledged, &told.unacknowledged);
    eprintln!(
        "after three stops: {} acknowledged; table {} rows ({} never acknowledged); {tally:?}",
        told.acknowledged.len(),
        stored.len(),
        tally.stored_unacknowledged
    );
    assert_eq!(tally.lost, 0, "acknowledged readings missing from Iceberg");
    assert_eq!(tally.duplicates, 0, "readings twice in Iceberg");
    assert!(tally.unknown.is_empty(), "rows nobody sent: {:?}", tally.unknown);
    assert_eq!(
        windows,
        per_city(&stored),
        "PostgreSQL windows count what Iceberg holds"
    );

    drop(client);
    pipeline.signal_group(libc::SIGINT);
    let status = pipeline.wait(Duration::from_secs(120)).expect("pipeline exits");
    assert!(status.success(), "clean shutdown: {status:?}");
}
