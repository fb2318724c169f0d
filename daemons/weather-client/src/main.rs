use clap::Parser;
use weather_common::runtime;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::init_tracing();
    let args = weather_client::Args::parse();
    let shutdown = runtime::shutdown_token()?;
    runtime::spawn_watchdog();
    let totals = weather_client::run(args, shutdown).await?;
    anyhow::ensure!(totals.failed == 0 || totals.ok > 0, "no reading was logged");
    Ok(())
}
