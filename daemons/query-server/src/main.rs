use anyhow::Context;
use clap::Parser;
use weather_common::runtime;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::init_tracing();
    let args = query_server::Args::parse();
    let shutdown = runtime::shutdown_token()?;
    runtime::spawn_watchdog();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    query_server::run(args, listener, shutdown).await
}
