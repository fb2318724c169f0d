use clap::Parser;
use weather_common::runtime;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::init_tracing();
    // `window-aggregator rebuild …`: a command that runs once, not the daemon.
    if std::env::args_os().nth(1).is_some_and(|a| a == "rebuild") {
        return rebuild().await;
    }
    let args = window_aggregator::Args::parse();
    let shutdown = runtime::shutdown_token()?;
    runtime::spawn_watchdog();
    window_aggregator::run(args, shutdown).await
}

#[cfg(feature = "rebuild")]
async fn rebuild() -> anyhow::Result<()> {
    let args = window_aggregator::rebuild::RebuildArgs::parse_from(std::env::args_os().skip(1));
    window_aggregator::rebuild::rebuild(&args).await
}

#[cfg(not(feature = "rebuild"))]
async fn rebuild() -> anyhow::Result<()> {
    anyhow::bail!(
        "this window-aggregator was built without its `rebuild` feature (scripts/run's first \
         build leaves it out and builds it in the background next); \
         `cargo build --release --package=window-aggregator` builds it"
    )
}
