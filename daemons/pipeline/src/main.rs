//! `pipeline`: the whole weather pipeline in one command. Starts the backbone (PostgreSQL, a
//! Kafka-protocol broker, object storage) and the five daemons in dependency order, each
//! waited for through the sd-notify protocol, and stops them in reverse order on Ctrl-C.

mod apache_kafka;
mod backbone;
mod host;
mod http_client;
mod plan;
mod s3_server;
mod supervisor;
mod trino;

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use weather_common::{
    consumer::metrics::{LAG_RECORDS, OWNER_EPOCH, PARTITION_OWNED, READ_OFFSET, prefix},
    runtime,
};

use crate::{
    backbone::{Kafka, LocalPostgres},
    host::{free_port, on_path},
    http_client::get,
    supervisor::Supervised,
};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Where the local backbone keeps its data and the pipeline its state.
    #[arg(long, env = "PIPELINE_STATE_DIR", default_value = "./.pipeline", global = true)]
    state_dir: PathBuf,

    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start everything (the default).
    Run,
    /// Show each component's state, Kafka lag, last Iceberg snapshot and last window.
    Status,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Use this Kafka cluster instead of starting one.
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,

    /// Use this PostgreSQL (database for the window table; the Iceberg catalog goes to the
    /// `iceberg` database of the same server) instead of starting one.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,

    /// Iceberg catalog URL (default: the `iceberg` database next to the window table).
    #[arg(long, env = "CATALOG_URL")]
    catalog_url: Option<String>,

    /// S3 endpoint; without it, a local S3 server found on `PATH` (minio, s3s-fs), else a directory in the state directory.
    #[arg(long, env = "S3_ENDPOINT")]
    s3_endpoint: Option<String>,

    /// Warehouse location (default: `s3://warehouse/` with --s3-endpoint, else file://STATE/warehouse).
    #[arg(long, env = "WAREHOUSE")]
    warehouse: Option<String>,

    /// Port of the logging-server.
    #[arg(long, default_value_t = 9998)]
    logging_port: u16,

    /// Port of the dashboard.
    #[arg(long, default_value_t = 3000)]
    dashboard_port: u16,

    /// Port of the SQL endpoint (query-server, speaking Trino's protocol; Trino's own when its
    /// launcher is on PATH).
    #[arg(long, default_value_t = 8080)]
    query_port: u16,

    /// Readings per second sent by the weather-client (default: 10 every 5 s).
    #[arg(long)]
    rate: Option<f64>,

    /// Stop the weather-client after this many batches.
    #[arg(long)]
    client_batches: Option<u64>,

    /// Do not start the weather-client.
    #[arg(long)]
    no_client: bool,

    /// Instances of each consumer (window-aggregator, iceberg-sink): they share the topic's
    /// partitions through their consumer groups.
    #[arg(long, env = "PIPELINE_INSTANCES", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    instances: u16,

    /// Partitions of the `weather` topic, when the pipeline's daemons create it: the most
    /// instances of a consumer that can share the work.
    #[arg(long, env = "KAFKA_TOPIC_PARTITIONS", default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=1024))]
    partitions: i32,

    /// Seconds between Iceberg commits.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    commit_interval: Duration,

    /// Run a Kafka broker inside this process when none is given or found on PATH. Its log is
    /// in memory: readings acknowledged but not yet in Iceberg and PostgreSQL when the
    /// pipeline stops or dies are lost. For tests and demos only.
    #[arg(long)]
    in_memory_broker: bool,

    /// How long a stop waits for the consumers to read what the logging-server acknowledged.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
}

/// What `pipeline status` reads back.
#[derive(Serialize, Deserialize, Debug)]
struct State {
    components: Vec<(String, String)>,
    database_url: String,
    /// The warehouse's S3 endpoint, when it is on S3.
    s3_endpoint: Option<String>,
    /// Keys of the local S3 server, when the pipeline started one.
    s3_credentials_file: Option<PathBuf>,
    /// Trino's URL, when the pipeline started it.
    #[serde(default)]
    trino: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::init_tracing();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Status) => status(&cli.state_dir).await,
        Some(Command::Run) | None => run(cli.state_dir, cli.run).await,
    }
}

/// The daemons' binaries: next to this one (cargo and Nix builds), else on PATH.
fn daemon(name: &str) -> anyhow::Result<PathBuf> {
    let beside = std::env::current_exe()?.with_file_name(name);
    if beside.is_file() {
        return Ok(beside);
    }
    on_path(name).with_context(|| format!("{name} not found next to pipeline or on PATH (cargo build --workspace)"))
}

async fn run(state_dir: PathBuf, args: RunArgs) -> anyhow::Result<()> {
    // Everything the pipeline and its children write (the database password and the S3 keys,
    // the warehouse, state.json with the database URL) is for its own OS user only.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    std::fs::create_dir_all(&state_dir)?;
    // As root, PostgreSQL runs as the postgres user, which must pass through (not list) the
    // state directory to reach its own.
    let postgres_user = match args.database_url {
        Some(_) => None,
        None => backbone::postgres_user()?,
    };
    let mode = match postgres_user {
        Some((_, gid)) => {
            std::os::unix::fs::chown(&state_dir, None, Some(gid))?;
            0o710
        }
        None => 0o700,
    };
    std::fs::set_permissions(&state_dir, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    let state_dir = state_dir.canonicalize()?;
    let _lock = lock_state_dir(&state_dir)?;
    let notify_dir = state_dir.join("notify");
    std::fs::create_dir_all(&notify_dir)?;
    let shutdown = runtime::shutdown_token()?;

    let postgres = match &args.database_url {
        Some(_) => None,
        None => Some(LocalPostgres::start(&state_dir.join("postgres"), &notify_dir).await?),
    };
    let database_url = args
        .database_url
        .clone()
        .or_else(|| postgres.as_ref().map(|p| p.url("weather")))
        .context("no database")?;
    let catalog_url = args
        .catalog_url
        .clone()
        .or_else(|| postgres.as_ref().map(|p| p.url("iceberg")))
        .context("--catalog-url is needed with --database-url")?;
    let kafka = Kafka::start(
        args.kafka_brokers.clone(),
        &state_dir.join("kafka"),
        &notify_dir,
        args.in_memory_broker,
        args.partitions,
    )
    .await?;
    let brokers = kafka.brokers();
    let local_s3 = match &args.s3_endpoint {
        Some(_) => None,
        None => s3_server::start(&state_dir.join("s3")).await?,
    };
    let s3_endpoint = args
        .s3_endpoint
        .clone()
        .or_else(|| local_s3.as_ref().map(|s3| s3.endpoint.clone()));
    let warehouse = match (&args.warehouse, &s3_endpoint) {
        (Some(w), _) => w.clone(),
        (None, Some(_)) => "s3://warehouse/".to_owned(),
        (None, None) => {
            let dir = state_dir.join("warehouse");
            std::fs::create_dir_all(&dir)?;
            format!("file://{}", dir.display())
        }
    };

    // Trino when its launcher is on PATH and can read the warehouse, the embedded query-server
    // otherwise.
    let trino_launcher = trino::find().filter(|_| {
        let readable = s3_endpoint.is_some();
        if !readable {
            tracing::warn!("Trino not started: it reads the table from S3 only; query-server serves SQL instead");
        }
        readable
    });
    let logging = format!("127.0.0.1:{}", args.logging_port);
    let query = format!("127.0.0.1:{}", args.query_port);
    let dashboard = format!("127.0.0.1:{}", args.dashboard_port);
    // Admin (health, metrics) address of each consumer instance.
    let consumer_admins = |name: &'static str| -> anyhow::Result<Vec<(&'static str, String)>> {
        (0..args.instances)
            .map(|i| {
                Ok((
                    instance_name(name, i, args.instances),
                    format!("127.0.0.1:{}", free_port()?),
                ))
            })
            .collect()
    };
    let aggregators = consumer_admins("window-aggregator")?;
    let sinks = consumer_admins("iceberg-sink")?;
    // What a person sees of a URL: the local server's password stays in its file.
    let shown = |url: &str| postgres.as_ref().map_or_else(|| url.to_owned(), |p| p.shown(url));
    let daemons = plan::Daemons {
        logging: &logging,
        dashboard: &dashboard,
        query: trino_launcher.is_none().then_some(query.as_str()),
        aggregators: &aggregators,
        sinks: &sinks,
        brokers: &brokers,
        partitions: args.partitions,
        catalog_url: &catalog_url,
        warehouse: &warehouse,
        s3_endpoint: s3_endpoint.as_deref(),
        s3_credentials: local_s3.as_ref().map(|s3| s3.credentials_file.display().to_string()),
        database_url: &database_url,
        commit_interval: args.commit_interval,
        client: (!args.no_client).then_some(plan::Client {
            rate: args.rate,
            batches: args.client_batches,
        }),
    };
    let specs = plan::specs(&daemons, |name| daemon(daemon_of(name)))?;
    let components = [("logging-server".to_owned(), format!("http://{logging}"))]
        .into_iter()
        .chain(
            aggregators
                .iter()
                .chain(&sinks)
                .map(|(name, admin)| ((*name).to_owned(), format!("http://{admin}"))),
        )
        .chain([("dashboard".to_owned(), format!("http://{dashboard}"))])
        .chain(
            trino_launcher
                .is_none()
                .then(|| ("query-server".to_owned(), format!("http://{query}"))),
        )
        .collect();
    let mut state = State {
        components,
        database_url: database_url.clone(),
        s3_endpoint: s3_endpoint.clone(),
        s3_credentials_file: local_s3.as_ref().map(|s3| s3.credentials_file.clone()),
        trino: None,
    };
    std::fs::write(state_dir.join("state.json"), serde_json::to_vec_pretty(&state)?)?;

    let mut running: Vec<Supervised> = Vec::new();
    let mut failure = None;
    for spec in specs {
        if shutdown.is_cancelled() {
            break;
        }
        let name = spec.name;
        match Supervised::start(spec, &notify_dir, Duration::from_secs(120)).await {
            Ok(child) => {
                tracing::info!("{name} ready");
                running.push(child);
            }
            Err(e) => {
                failure = Some(e.context(format!("starting {name}")));
                break;
            }
        }
    }
    let mut trino = None;
    if let Some(launcher) = &trino_launcher
        && failure.is_none()
        && !shutdown.is_cancelled()
    {
        trino = start_trino(
            launcher,
            &state_dir,
            &catalog_url,
            &warehouse,
            s3_endpoint.as_deref(),
            local_s3.as_ref(),
            &shutdown,
        )
        .await;
        if let Some(trino) = &trino {
            state.trino = Some(trino.url.clone());
            std::fs::write(state_dir.join("state.json"), serde_json::to_vec_pretty(&state)?)?;
        }
    }
    if failure.is_none() && !shutdown.is_cancelled() {
        runtime::notify_ready();
        eprintln!(
            "\nweather-pipeline is running (Ctrl-C stops it)\n  dashboard       http://{dashboard}/\n  logging-server  http://{logging}/log?city=Boston&temperature=72.5\n  metrics         http://{logging}/metrics  {}\n  PostgreSQL      {}\n  Iceberg         catalog {}, warehouse {warehouse}\n  Kafka           {brokers}\n{}\n",
            aggregators
                .iter()
                .chain(&sinks)
                .map(|(_, admin)| format!("http://{admin}/metrics"))
                .collect::<Vec<_>>()
                .join("  "),
            shown(&database_url),
            shown(&catalog_url),
            query_hint(match (&trino, &trino_launcher) {
                (Some(trino), _) => Some(trino.url.clone()),
                (None, None) => Some(format!("http://{query}")),
                (None, Some(_)) => None,
            })
        );
        shutdown.cancelled().await;
    }

    // Dependency order: no new readings, then the consumers read everything acknowledged (and
    // commit it as they stop), then the backbone.
    let mut clean = true;
    for name in ["weather-client", "logging-server"] {
        if let Some(i) = running.iter().position(|c| c.name == name) {
            clean &= stop(running.remove(i)).await;
        }
    }
    let running_admins = |instances: &[(&'static str, String)]| -> Vec<String> {
        instances
            .iter()
            .filter(|(name, _)| running.iter().any(|c| c.name == *name))
            .map(|(_, admin)| admin.clone())
            .collect()
    };
    let consumers = [
        ("window-aggregator", running_admins(&aggregators)),
        ("iceberg-sink", running_admins(&sinks)),
    ];
    wait_for_consumers(&brokers, &consumers, args.drain_timeout).await;
    while let Some(child) = running.pop() {
        clean &= stop(child).await;
    }
    if let Some(mut trino) = trino {
        supervisor::terminate(&mut trino.child, rustix::process::Signal::TERM, Duration::from_secs(30)).await;
    }
    // Stopped cleanly, Apache Kafka needs no log recovery next time.
    if let Some(broker) = kafka.into_server() {
        clean &= stop(broker).await;
    }
    if let Some(mut s3) = local_s3 {
        supervisor::terminate(&mut s3.child, rustix::process::Signal::TERM, Duration::from_secs(30)).await;
    }
    if let Some(postgres) = postgres {
        clean &= stop(postgres.server).await;
    }
    if let Some(e) = failure {
        return Err(e);
    }
    anyhow::ensure!(clean, "some components did not stop cleanly");
    Ok(())
}

async fn stop(child: Supervised) -> bool {
    let name = child.name;
    let ok = child.stop(Duration::from_secs(60)).await;
    tracing::info!("{name} stopped{}", if ok { "" } else { " (not cleanly)" });
    ok
}

/// Holds `STATE/pipeline.lock` for the life of the run: one pipeline per state directory.
fn lock_state_dir(state_dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let path = state_dir.join("pipeline.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        anyhow::bail!(
            "another pipeline (pid {}) runs on {}; stop it first, or give another --state-dir",
            holder.trim(),
            state_dir.display()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}

/// The end of each partition of the `weather` topic.
async fn log_ends(brokers: &str) -> anyhow::Result<Vec<(i32, i64)>> {
    let brokers = brokers.to_owned();
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "pipeline-drain")
            .create()?;
        let topic = weather_common::kafka::WEATHER_TOPIC;
        let partitions = weather_common::kafka::partition_count(&consumer, topic)?;
        (0..partitions)
            .map(|p| Ok((p, consumer.fetch_watermarks(topic, p, Duration::from_secs(5))?.1)))
            .collect()
    })
    .await?
}

/// `NAME_read_offset{partition="P"}` from a consumer's metrics (0 when absent).
fn read_offset(metrics: &str, name: &str, partition: i32) -> i64 {
    let prefix = format!("{}_{READ_OFFSET}{{partition=\"{partition}\"}} ", prefix(name));
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until every consumer (all its instances together) has read the topic to the end it
/// has now, so that what the logging-server acknowledged is committed when they stop; at most
/// `timeout`. `consumers`: each daemon with the admin addresses of its running instances.
async fn wait_for_consumers(brokers: &str, consumers: &[(&str, Vec<String>)], timeout: Duration) {
    if consumers.iter().all(|(_, admins)| admins.is_empty()) {
        return;
    }
    let ends = match log_ends(brokers).await {
        Ok(ends) => ends,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "could not read the end of the log; stopping the consumers");
            return;
        }
    };
    let started = tokio::time::Instant::now();
    let mut reported = started;
    loop {
        let mut behind = Vec::new();
        for (name, admins) in consumers.iter().filter(|(_, admins)| !admins.is_empty()) {
            let mut metrics = Vec::new();
            for admin in admins {
                metrics.push(get(admin, "/metrics").await.unwrap_or_default());
            }
            // A partition's reader is whichever instance owns it now; offsets only grow, so the
            // furthest any instance reports is where the group stands.
            let left: i64 = ends
                .iter()
                .map(|&(p, end)| {
                    let read = metrics.iter().map(|m| read_offset(m, name, p)).max().unwrap_or(0);
                    (end - read).max(0)
                })
                .sum();
            if left > 0 {
                behind.push(format!("{name} {left}"));
            }
        }
        if behind.is_empty() {
            return;
        }
        if started.elapsed() > timeout {
            tracing::warn!(
                "stopping the consumers before they read the whole log (records left: {}); a durable broker \
                 keeps the rest for the next start",
                behind.join(", ")
            );
            return;
        }
        if reported.elapsed() > Duration::from_secs(5) {
            reported = tokio::time::Instant::now();
            tracing::info!(
                "waiting for the consumers to read the log to its end (records left: {})",
                behind.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The name instance `i` of `count` of daemon `name` runs under: the daemon's own name when it
/// runs alone, `name@i` otherwise (as a systemd template unit names its instances). Leaked:
/// a handful per run, and the supervisor keeps names for the life of the process.
fn instance_name(name: &'static str, i: u16, count: u16) -> &'static str {
    if count == 1 {
        name
    } else {
        Box::leak(format!("{name}@{i}").into_boxed_str())
    }
}

/// The daemon an instance name runs.
fn daemon_of(name: &str) -> &str {
    name.split_once('@').map_or(name, |(daemon, _)| daemon)
}

/// Trino from `launcher`, reading the warehouse on S3 (Trino's local file system does not
/// read `file://` table locations); `None`, with the reason logged, when it does not start.
async fn start_trino(
    launcher: &std::path::Path,
    state_dir: &std::path::Path,
    catalog_url: &str,
    warehouse: &str,
    s3_endpoint: Option<&str>,
    local_s3: Option<&s3_server::LocalS3>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<trino::Trino> {
    let s3_endpoint = s3_endpoint?;
    let catalog = trino::Catalog {
        catalog_url,
        warehouse,
        s3_endpoint,
        s3_keys: local_s3.map(|s3| (s3.access_key.as_str(), s3.secret_key.as_str())),
    };
    tracing::info!("starting Trino (takes a minute)");
    let dir = state_dir.join("trino");
    let started = tokio::select! {
        started = trino::start(launcher, &dir, &catalog) => started,
        () = shutdown.cancelled() => return None,
    };
    match started {
        Ok(trino) => Some(trino),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "Trino not started");
            None
        }
    }
}

/// How to query the table over Trino's protocol at `url` (Trino's, or the query-server's).
fn query_hint(url: Option<String>) -> String {
    let Some(url) = url else {
        return "  SQL             not available: Trino did not start (see above)".to_owned();
    };
    format!(
        "  SQL (Trino)     {url}\n    trino --server {url} --catalog iceberg --schema default\n    \
         python3 -c \"import trino; c = trino.dbapi.connect(host='{url}', user='me', catalog='iceberg', schema='default').cursor(); \
         c.execute('SELECT city, count(*) FROM weather GROUP BY city'); print(c.fetchall())\""
    )
}

async fn status(state_dir: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read(state_dir.join("state.json"))
        .with_context(|| format!("no pipeline state in {}: is it running?", state_dir.display()))?;
    let state: State = serde_json::from_slice(&text)?;
    for (name, url) in &state.components {
        let addr = url.trim_start_matches("http://");
        let health = get(addr, "/health")
            .await
            .map_or_else(|e| format!("down ({e})"), |_| "up".to_owned());
        let metrics = get(addr, "/metrics").await.unwrap_or_default();
        let pick = |prefix: &str| -> Vec<String> {
            metrics
                .lines()
                .filter(|l| l.starts_with(prefix))
                .map(|l| l.to_owned())
                .collect()
        };
        println!("{name:<18} {health}");
        let prefix = prefix(daemon_of(name));
        let owned: Vec<String> = pick(&format!("{prefix}_{PARTITION_OWNED}{{"))
            .iter()
            .filter_map(|l| l.split('"').nth(1).map(str::to_owned))
            .collect();
        if !owned.is_empty() {
            println!("    owns partitions {}", owned.join(", "));
        }
        for line in pick(&format!("{prefix}_{LAG_RECORDS}"))
            .into_iter()
            .chain(pick(&format!("{prefix}_{OWNER_EPOCH}")))
        {
            println!("    {line}");
        }
        for line in pick("iceberg_sink_last_snapshot_id")
            .into_iter()
            .chain(pick("logging_server_records_produced"))
        {
            println!("    {line}");
        }
    }
    if let Some(url) = &state.trino {
        let health = get(url.trim_start_matches("http://"), "/v1/info")
            .await
            .map_or_else(|e| format!("down ({e})"), |_| format!("up ({url})"));
        println!("{:<18} {health}", "trino");
    }
    match tokio_postgres::connect(&state.database_url, tokio_postgres::NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            let row = client
                .query_one("SELECT max(window_end)::text, count(*) FROM weather", &[])
                .await?;
            let last: Option<String> = row.get(0);
            let windows: i64 = row.get(1);
            println!(
                "last window ends  {} ({windows} window rows)",
                last.as_deref().unwrap_or("-")
            );
        }
        Err(e) => println!("PostgreSQL        down ({e})"),
    }
    Ok(())
}
