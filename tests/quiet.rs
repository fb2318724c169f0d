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
};

/// How long the run is watched; `WEATHER_QUIET_SECS` shortens it while working on the test.
fn watched() -> Duration {
    let secs = std::env::var("WEATHER_QUIET_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    Duration::from_secs(secs)
}

/// The lines of `log` that a level of ERROR or WARN leads (`tracing`'s format: a timestamp,
/// then the level), colour codes taken out.
fn loud_lines(log: &str) -> Vec<String> {
    log.lines()
        .map(strip_colours)
        .filter(|line| {
            line.split_whitespace()
                .take(3)
                .any(|word| word == "ERROR" || word == "WARN")
        })
        .collect()
}

fn strip_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... m
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn loud_lines_are_told_by_their_level() {
    let log = "2026-12-02T17:00:00.000000Z  INFO pipeline: ready\n\
               2026-12-02T17:00:01.000000Z  WARN librdkafka: REQTMOUT\n\
               \u{1b}[2m2026-12-02T17:00:02Z\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m nisshi_broker: boom\n\
               2026-12-02T17:00:03.000000Z  INFO dashboard: a city called WARN\n";
    let loud = loud_lines(log);
    assert_eq!(loud.len(), 2, "{loud:?}");
    assert!(loud[1].contains("ERROR nisshi_broker"), "{loud:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_minutes_at_the_plans_rate_print_no_error_and_no_warning() {
    build_workspace_binaries();
    let state = tempfile::tempdir().expect("state dir");
    let terminal = state.path().join("terminal.log");
    let ports = Ports::free();
    let output = std::fs::File::create(&terminal).expect("terminal log");
    let mut command = pipeline::command(state.path(), &ports, &[]);
    command
        .env_remove("RUST_LOG")
        .stdout(output.try_clone().expect("log"))
        .stderr(output);
    let mut pipeline =
        ChildGuard::spawn_ready("pipeline", &mut command, Duration::from_secs(300)).expect("pipeline ready");
    let run = State::read(state.path());
    let broker_log = state.path().join("kafka/nisshi.log");
    let (terminal_at, broker_at) = (file_len(&terminal), file_len(&broker_log));

    let watched = watched();
    let started = Instant::now();
    tokio::time::sleep(watched).await;
    let took = started.elapsed();

    let terminal_text = read_from(&terminal, terminal_at);
    let broker_text = read_from(&broker_log, broker_at);
    let loud: Vec<String> = loud_lines(&terminal_text)
        .into_iter()
        .chain(loud_lines(&broker_text).into_iter().map(|l| format!("nisshi.log: {l}")))
        .collect();
    assert!(
        loud.is_empty(),
        "{} ERROR or WARN lines in {took:?} after `pipeline` was running:\n{}",
        loud.len(),
        loud.join("\n")
    );

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

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// What was written to `path` after its first `from` bytes.
fn read_from(path: &std::path::Path, from: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default()).into_owned()
}
