use clap::Parser;
use weather_common::runtime;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::init_tracing();
    // `window-aggregator rebuild …`: a command that runs once, not the daemon.
    if std::env::args_os().nth(1).is_some_and(|a| a == "rebuild") {
        let args = window_aggregator::rebuild::RebuildArgs::parse_from(std::env::args_os().skip(1));
        window_aggregator::rebuild::rebuild(&args).await?;
        return Ok(());
    }
    let args = window_aggregator::Args::parse();
    let shutdown = runtime::shutdown_token()?;
    runtime::spawn_watchdog();
    window_aggregator::run(args, shutdown).await
}
