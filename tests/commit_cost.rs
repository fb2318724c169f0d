//! Commits every 200 ms for five minutes through `pipeline` with every other default (nisshi
//! with its log on disk, its own PostgreSQL): once `--max-snapshots` is reached, the cost of a
//! commit and the size of the metadata file it rewrites must not grow with the table's age. At that rate an hour of snapshots is
//! 18,000; `--max-snapshots` bounds them, and maintenance runs as soon as they pass it instead
//! of waiting for `--maintenance-interval`.

use std::time::{Duration, Instant};

use weather_testkit::{
    build_workspace_binaries, http_get, metric,
    pipeline::{self, Ports, State},
};

/// How long the run is watched; `WEATHER_COMMIT_COST_SECS` shortens it while working on the test.
fn watched() -> Duration {
    weather_testkit::watched_for("WEATHER_COMMIT_COST_SECS", 300)
}

/// One look at the sink's metrics.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    commits: f64,
    commit_seconds: f64,
    metadata_bytes: f64,
    snapshots: f64,
}

impl Sample {
    async fn take(admin: &str, at: Duration) -> Self {
        let metrics = http_get(admin, "/metrics").await.expect("metrics").body;
        let value = |name: &str| metric(&metrics, name).unwrap_or(0.0);
        Self {
            at,
            commits: value("iceberg_sink_commit_duration_seconds_count"),
            commit_seconds: value("iceberg_sink_commit_duration_seconds_sum"),
            metadata_bytes: value("iceberg_sink_table_metadata_bytes"),
            snapshots: value("iceberg_sink_table_snapshots"),
        }
    }

    /// Commits between `self` and `later`, and their mean time.
    fn commits_until(&self, later: &Self) -> (f64, Duration) {
        let commits = later.commits - self.commits;
        let mean = (later.commit_seconds - self.commit_seconds) / commits.max(1.0);
        (commits, Duration::from_secs_f64(mean))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn five_minutes_of_200_ms_commits_cost_the_same_at_the_end_as_after_the_first_minute() {
    build_workspace_binaries();
    let state = tempfile::tempdir().expect("state dir");
    let ports = Ports::free();
    let mut pipeline = pipeline::start(state.path(), &ports, &["--no-client", "--commit-interval", "200ms"]);
    let admin = State::read(state.path()).admin("iceberg-sink");

    // 20 readings a second: every 200 ms commit has some.
    let logging = ports.logging();
    let load = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        for n in 0u64.. {
            tick.tick().await;
            let target = format!("/log?city=Oslo&temperature={}", n % 100);
            let response = http_get(&logging, &target).await.expect("GET /log");
            assert_eq!(response.status, 200, "{}", response.body);
        }
    });

    let watched = watched();
    let minute = watched / 5;
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < watched {
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!load.is_finished(), "the load stopped: a reading was refused");
        samples.push(Sample::take(&admin, started.elapsed()).await);
    }
    load.abort();
    let at = |t: Duration| *samples.iter().find(|s| s.at >= t).expect("a sample");
    let metadata_between = |from: Duration, to: Duration| -> Vec<f64> {
        samples
            .iter()
            .filter(|s| s.at >= from && s.at <= to)
            .map(|s| s.metadata_bytes)
            .collect()
    };
    // The first minute is a ramp: 200 snapshots take about 80 s of these commits to make. From
    // the second minute on the cap holds them, and nothing may grow any more.
    let (first, second, third) = (at(Duration::ZERO), at(minute), at(minute * 2));
    let (fourth, last) = (at(watched - minute), *samples.last().expect("a sample"));
    let (ramp_commits, ramp) = first.commits_until(&second);
    let (early_commits, early) = second.commits_until(&third);
    let (late_commits, late) = fourth.commits_until(&last);
    let early_metadata = metadata_between(second.at, third.at);
    let early_metadata = early_metadata.iter().sum::<f64>() / early_metadata.len() as f64;
    let late_metadata = metadata_between(fourth.at, last.at).into_iter().fold(0.0, f64::max);
    let most_snapshots = samples.iter().map(|s| s.snapshots).fold(0.0, f64::max);
    eprintln!(
        "minute 1: {ramp_commits} commits, mean {ramp:?}, metadata {} bytes at its end; minute 2: {early_commits} \
         commits, mean {early:?}, metadata {early_metadata:.0} bytes on average; minute 5: {late_commits} commits, \
         mean {late:?}, metadata up to {late_metadata} bytes; snapshots up to {most_snapshots}",
        second.metadata_bytes
    );
    // A commit when readings came and the interval is up: about one every 400 ms here.
    assert!(
        late_commits >= 100.0 * minute.as_secs_f64() / 60.0,
        "{late_commits} commits in the last minute"
    );
    assert!(late <= early.mul_f64(1.5), "commit time {early:?} → {late:?}");
    assert!(
        late_metadata <= 1.5 * early_metadata,
        "metadata {early_metadata} → {late_metadata} bytes"
    );
    assert!(most_snapshots <= 200.0 + 60.0, "snapshots up to {most_snapshots}");
    pipeline::ctrl_c(&mut pipeline);
}
