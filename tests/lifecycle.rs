//! The life of the whole stack the way a person runs it, on one state directory: Ctrl-C at the
//! terminal (SIGINT to the whole process group) under load, `kill -9` of `pipeline` itself
//! under load, `kill -INT` of its pid alone, each followed by a run on the state the last one
//! left; the middle two runs with two instances of each consumer, which take over the single
//! instances' partitions and hand them back. At the end every reading ever answered 200 is in
//! Iceberg exactly once (read by PyIceberg), the PostgreSQL windows count exactly what Iceberg
//! holds, and no stop left a process running.

use std::{
    collections::HashSet,
    path::Path,
    time::{Duration, Instant},
};

use weather_testkit::{
    ChildGuard, build_workspace_binaries, descendants,
    load::{Key, Load},
    owned_partitions,
    pipeline::{self, Ports, State},
    still_running,
};

/// `pipeline` with its defaults, without the built-in client (the test's load sends readings
/// it can tell apart), `instances` of each consumer.
fn start(state: &Path, ports: &Ports, instances: u16) -> ChildGuard {
    let instances = instances.to_string();
    pipeline::start(
        state,
        ports,
        &["--no-client", "--commit-interval", "1s", "--instances", &instances],
    )
}

/// Waits until the instances of each consumer own the topic's 6 partitions between them: within
/// the group's session timeout (10 s, which the members a killed run left take to expire) and a
/// rebalance after the run is ready.
async fn assigned_promptly(run: &State, scenario: &str) {
    let ready = Instant::now();
    for daemon in ["window-aggregator", "iceberg-sink"] {
        loop {
            let mut owned = Vec::new();
            for (name, url) in &run.components {
                if name.split('@').next() == Some(daemon) {
                    owned.extend(owned_partitions(url.trim_start_matches("http://")).await);
                }
            }
            owned.sort_unstable();
            if owned == (0..6).collect::<Vec<i32>>() {
                break;
            }
            assert!(
                ready.elapsed() < Duration::from_secs(30),
                "{scenario}: the instances of {daemon} own {owned:?} 30 s after the run was ready"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!(
            "{scenario}: {daemon} owns every partition {:?} after the run was ready",
            ready.elapsed()
        );
    }
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
    let ports = Ports::free();
    let logging = ports.logging();
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

    // 3. A third run recovers the killed one's state, in the consumer groups the killed run's
    //    members are still in until their sessions expire; `kill -INT` of its pid alone.
    let mut pipeline = start(state.path(), &ports, 2);
    assigned_promptly(&State::read(state.path()), "a run after kill -9").await;
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
    let run = State::read(state.path());
    assigned_promptly(&run, "a run after kill -INT").await;
    let settled = pipeline::settle(&run, &told.acknowledged, &told.unacknowledged, Duration::from_secs(120)).await;
    eprintln!(
        "after three stops: {} acknowledged; table {} rows ({} never acknowledged); {:?}",
        told.acknowledged.len(),
        settled.rows(),
        settled.tally.stored_unacknowledged,
        settled.tally
    );
    settled.assert_exact();
    pipeline::ctrl_c(&mut pipeline);
}
