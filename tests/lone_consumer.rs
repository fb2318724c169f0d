//! A crash of a consumer under `pipeline`'s defaults (one instance of each, nisshi with its
//! log on disk): `kill -9` of the lone iceberg-sink under load, then of the lone
//! window-aggregator. `pipeline` starts each again; the group must assign it every partition
//! and it must read again within 30 s, and at the end every reading answered 200 is in Iceberg
//! exactly once and counted once in the windows.

use std::time::{Duration, Instant};

use weather_testkit::{
    build_workspace_binaries,
    load::Load,
    owned_partitions,
    pipeline::{self, Ports, State, daemon_pid},
};

/// The topic's partitions under `pipeline`'s defaults.
const PARTITIONS: usize = 6;

/// How long a consumer killed with SIGKILL may take to read again: `pipeline` restarts it, and
/// the group hands it the partitions its dead member held (the session timeout, 10 s) with a
/// rebalance.
const READS_AGAIN_WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn a_lone_consumer_killed_under_load_reads_again_and_nothing_is_lost_or_doubled() {
    build_workspace_binaries();
    let state = tempfile::tempdir().expect("state dir");
    let ports = Ports::free();
    let mut pipeline = pipeline::start(state.path(), &ports, &["--no-client"]);
    let run = State::read(state.path());
    let load = Load::start(&ports.logging(), 4);

    for daemon in ["iceberg-sink", "window-aggregator"] {
        let admin = run.admin(daemon);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let old = daemon_pid(&pipeline, daemon).unwrap_or_else(|| panic!("{daemon} runs under pipeline"));
        let before = read_offsets(&admin, daemon).await;
        // SAFETY: kill(2) on a process of this test's own pipeline; no memory is touched.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(old as i32, libc::SIGKILL);
        }
        let killed = Instant::now();
        // Started again, every partition its own, and reading past where the dead one was.
        loop {
            let restarted = daemon_pid(&pipeline, daemon).is_some_and(|pid| pid != old);
            let owned = owned_partitions(&admin).await.len();
            let now = read_offsets(&admin, daemon).await;
            if restarted && owned == PARTITIONS && now > before {
                eprintln!(
                    "{daemon}: reads again {:?} after kill -9 ({before} -> {now})",
                    killed.elapsed()
                );
                break;
            }
            assert!(
                killed.elapsed() < READS_AGAIN_WITHIN,
                "{daemon} killed with -9: restarted {restarted}, owns {owned} of {PARTITIONS} partitions, read \
                 offsets {before} -> {now} after {READS_AGAIN_WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    tokio::time::sleep(Duration::from_secs(3)).await;
    let ledger = load.stop().await;
    assert!(
        ledger.unexpected.is_empty(),
        "unexpected answers {:?}",
        ledger.unexpected
    );
    assert!(!ledger.acknowledged.is_empty(), "the load got answers");
    let settled = pipeline::settle(
        &run,
        &ledger.acknowledged,
        &ledger.unacknowledged,
        Duration::from_secs(120),
    )
    .await;
    eprintln!(
        "{} acknowledged; table {} rows; {:?}",
        ledger.acknowledged.len(),
        settled.rows(),
        settled.tally
    );
    settled.assert_exact();
    pipeline::ctrl_c(&mut pipeline);
}

/// The sum of a consumer's read offsets over its partitions (0 when it does not answer).
async fn read_offsets(admin: &str, daemon: &str) -> i64 {
    let Ok(response) = weather_testkit::http_get(admin, "/metrics").await else {
        return 0;
    };
    let prefix = format!("{}_read_offset{{", daemon.replace('-', "_"));
    response
        .body
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .sum()
}
