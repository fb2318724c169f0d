use clap::Parser;
use weather_common::runtime;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::init_tracing();
    let args = iceberg_sink::Args::parse();
    let shutdown = runtime::shutdown_token()?;
    runtime::spawn_watchdog();
    iceberg_sink::run(args, shutdown).await
}
