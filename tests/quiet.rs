//! What a person sees in the terminal: `pipeline` with every default (its own PostgreSQL,
//! nisshi with its log on disk, the weather-client at the plan's rate of 10 readings every
//! 5 s, the log level it ships with) for ten minutes after it says it is running. No component
//! and not the broker's own log may print an ERROR or WARN line meanwhile, and the readings
//! must flow the whole way: a quiet terminal because nothing happens does not count.

use std::time::{Duration, Instant};

use weather_testkit::{
    ChildGuard, build_workspace_binaries,
    pipeline::{self, Ports, State},
    pyiceberg_readings,
    terminal::Terminal,
};

/// How long the run is watched; `WEATHER_QUIET_SECS` shortens it while working on the test.
fn watched() -> Duration {
    weather_testkit::watched_for("WEATHER_QUIET_SECS", 600)
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_minutes_at_the_plans_rate_print_no_error_and_no_warning() {
    build_workspace_binaries();
    let state = tempfile::tempdir().expect("state dir");
    let ports = Ports::free();
    let mut command = pipeline::command(state.path(), &ports, &[]);
    let mut terminal = Terminal::capture(state.path(), &mut command);
    let mut pipeline =
        ChildGuard::spawn_ready("pipeline", &mut command, Duration::from_secs(300)).expect("pipeline ready");
    let run = State::read(state.path());
    terminal.mark();

    let watched = watched();
    let started = Instant::now();
    tokio::time::sleep(watched).await;
    let took = started.elapsed();

    terminal.assert_quiet(&format!("in {took:?} after `pipeline` was running"));

    // 10 readings every 5 s; the last commit interval (10 s) and window may not be in yet.
    let expected = (watched.as_secs() / 5 * 10) as usize;
    let stored = pyiceberg_readings(&run.catalog_url, "weather", "", "default.weather").expect("PyIceberg");
    let client = weather_testkit::connect(&run.database_url).await.expect("connect");
    let windowed: i64 = client
        .query_one("SELECT coalesce(sum(record_count), 0)::int8 FROM weather", &[])
        .await
        .expect("windows")
        .get(0);
    eprintln!(
        "{took:?} watched: {} readings in Iceberg, {windowed} in the windows; no ERROR or WARN line",
        stored.len()
    );
    assert!(
        stored.len() + 40 >= expected,
        "Iceberg holds {} of about {expected} readings",
        stored.len()
    );
    assert!(
        windowed as usize + 40 >= expected,
        "the windows count {windowed} of about {expected} readings"
    );

    pipeline::ctrl_c(&mut pipeline);
}
