use clap::Parser;
use weather_common::runtime;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::init_tracing();
    let args = window_aggregator::Args::parse();
    let shutdown = runtime::shutdown_token()?;
    runtime::spawn_watchdog();
    window_aggregator::run(args, shutdown).await
}
