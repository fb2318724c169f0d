//! `pipeline`: the whole weather pipeline in one command. Starts the backbone (PostgreSQL, a
//! Kafka-protocol broker, object storage) and the five daemons in dependency order, each
//! waited for through the sd-notify protocol, and stops them in reverse order on Ctrl-C.

mod apache_kafka;
mod backbone;
mod broker;
mod built_later;
mod drain;
mod host;
mod http_client;
mod plan;
mod postgres;
mod s3_server;
mod supervisor;
mod trino;

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use weather_common::{
    consumer::metrics::{LAG_RECORDS, OWNER_EPOCH, PARTITION_OWNED, prefix},
    runtime,
};

use crate::{
    backbone::{Backbone, Given},
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
    /// Rebuild the PostgreSQL windows from the Iceberg table, while the pipeline runs or not:
    /// `window-aggregator rebuild` on this state directory's databases and warehouse. Its flags
    /// (`--snapshot`, `--all`, ...) follow.
    RebuildWindows {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
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

    /// Start this daemon once its binary appears next to `pipeline`, after the run is ready,
    /// instead of before (repeatable): a first `scripts/run` builds the iceberg-sink and the
    /// query-server after the others, so that the dashboard does not wait for them. Readings
    /// wait in Kafka meanwhile.
    #[arg(long, value_name = "DAEMON", value_parser = ["iceberg-sink", "query-server"])]
    when_built: Vec<String>,

    /// How long a stop waits for the consumers to read what the logging-server acknowledged.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
}

impl RunArgs {
    /// What of the backbone the operator gave.
    fn given(&self) -> Given {
        Given {
            database_url: self.database_url.clone(),
            catalog_url: self.catalog_url.clone(),
            kafka_brokers: self.kafka_brokers.clone(),
            in_memory_broker: self.in_memory_broker,
            partitions: self.partitions,
            s3_endpoint: self.s3_endpoint.clone(),
            warehouse: self.warehouse.clone(),
        }
    }
}

/// What `pipeline status` and `pipeline rebuild-windows` read back.
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
    /// Where the table is (absent in state written before rebuilds).
    #[serde(default)]
    catalog_url: Option<String>,
    #[serde(default)]
    warehouse: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::init_tracing();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Status) => status(&cli.state_dir).await,
        Some(Command::RebuildWindows { args }) => rebuild_windows(&cli.state_dir, &args).await,
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
    let state_dir = prepare_state_dir(state_dir, args.database_url.is_none())?;
    let _lock = lock_state_dir(&state_dir)?;
    let notify_dir = state_dir.join("notify");
    std::fs::create_dir_all(&notify_dir)?;
    let shutdown = runtime::shutdown_token()?;

    let backbone = Backbone::start(args.given(), &state_dir, &notify_dir).await?;
    // Trino when its launcher is on PATH and can read the warehouse, the embedded query-server
    // otherwise.
    let trino_launcher = trino::find().filter(|_| {
        let readable = backbone.s3_endpoint.is_some();
        if !readable {
            tracing::warn!("Trino not started: it reads the table from S3 only; query-server serves SQL instead");
        }
        readable
    });
    let addresses = Addresses::new(&args, trino_launcher.is_none())?;
    let later = |name: &str| args.when_built.iter().any(|daemon| daemon == daemon_of(name));
    let specs = plan::specs(&addresses.daemons(&args, &backbone), |name| {
        if later(name) {
            Ok(std::env::current_exe()?.with_file_name(daemon_of(name)))
        } else {
            daemon(daemon_of(name))
        }
    })?;
    let (specs_later, specs): (Vec<_>, Vec<_>) = specs.into_iter().partition(|spec| later(spec.name));
    let mut state = State::new(&addresses, &backbone);
    state.write(&state_dir)?;

    let (mut running, failure) = start_in_order(specs, &notify_dir, &shutdown).await;
    let mut trino = None;
    if let Some(launcher) = &trino_launcher
        && failure.is_none()
        && !shutdown.is_cancelled()
    {
        trino = start_trino(launcher, &state_dir, &backbone, &notify_dir, &shutdown).await;
        state.trino = trino.as_ref().map(|trino| trino.url.clone());
        state.write(&state_dir)?;
    }
    if failure.is_none() && !shutdown.is_cancelled() {
        runtime::notify_ready();
        let sql = match (&trino, &addresses.query) {
            (Some(trino), _) => Some(trino.url.clone()),
            (None, Some(query)) => Some(format!("http://{query}")),
            (None, None) => None,
        };
        eprintln!("{}", addresses.banner(&backbone, sql));
        for spec in specs_later {
            running.extend(built_later::start(spec, &notify_dir, READY_TIMEOUT, &shutdown).await);
        }
        shutdown.cancelled().await;
    }

    let consumers = [
        ("window-aggregator", addresses.aggregators.clone()),
        ("iceberg-sink", addresses.sinks.clone()),
    ];
    let mut clean = drain::stop_daemons(running, &consumers, &backbone.brokers, args.drain_timeout).await;
    clean &= supervisor::stop_in_order(trino.map(|trino| trino.server)).await;
    clean &= backbone.stop().await;
    if let Some(e) = failure {
        return Err(e);
    }
    anyhow::ensure!(clean, "some components did not stop cleanly");
    Ok(())
}

/// Creates the state directory, private to this OS user: everything the pipeline and its
/// children write there (the database password and the S3 keys, the warehouse, state.json with
/// the database URL) is for it alone. Returns its canonical path.
fn prepare_state_dir(state_dir: PathBuf, local_postgres: bool) -> anyhow::Result<PathBuf> {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    std::fs::create_dir_all(&state_dir)?;
    // As root, PostgreSQL runs as the postgres user, which must pass through (not list) the
    // state directory to reach its own.
    let postgres_user = if local_postgres {
        postgres::postgres_user()?
    } else {
        None
    };
    let mode = match postgres_user {
        Some((_, gid)) => {
            std::os::unix::fs::chown(&state_dir, None, Some(gid))?;
            0o710
        }
        None => 0o700,
    };
    std::fs::set_permissions(&state_dir, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    Ok(state_dir.canonicalize()?)
}

/// How long a daemon has to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Starts `specs` one after the other, each once the one before is ready, until all run, one
/// fails (returned beside those started) or `shutdown`.
async fn start_in_order(
    specs: Vec<supervisor::Spec>,
    notify_dir: &std::path::Path,
    shutdown: &tokio_util::sync::CancellationToken,
) -> (Vec<Supervised>, Option<anyhow::Error>) {
    let mut running = Vec::new();
    for spec in specs {
        if shutdown.is_cancelled() {
            break;
        }
        let name = spec.name;
        match Supervised::start(spec, notify_dir, READY_TIMEOUT).await {
            Ok(child) => {
                tracing::info!("{name} ready");
                running.push(child);
            }
            Err(e) => return (running, Some(e.context(format!("starting {name}")))),
        }
    }
    (running, None)
}

/// Where each daemon of this run listens.
struct Addresses {
    logging: String,
    dashboard: String,
    /// The query-server's, when it runs (no Trino).
    query: Option<String>,
    /// Instance name and admin (health, metrics) address of each consumer instance.
    aggregators: Vec<(&'static str, String)>,
    sinks: Vec<(&'static str, String)>,
}

impl Addresses {
    fn new(args: &RunArgs, query_server: bool) -> anyhow::Result<Self> {
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
        Ok(Self {
            logging: format!("127.0.0.1:{}", args.logging_port),
            dashboard: format!("127.0.0.1:{}", args.dashboard_port),
            query: query_server.then(|| format!("127.0.0.1:{}", args.query_port)),
            aggregators: consumer_admins("window-aggregator")?,
            sinks: consumer_admins("iceberg-sink")?,
        })
    }

    /// What [`plan::specs`] starts.
    fn daemons<'a>(&'a self, args: &RunArgs, backbone: &'a Backbone) -> plan::Daemons<'a> {
        plan::Daemons {
            logging: &self.logging,
            dashboard: &self.dashboard,
            query: self.query.as_deref(),
            aggregators: &self.aggregators,
            sinks: &self.sinks,
            brokers: &backbone.brokers,
            partitions: args.partitions,
            catalog_url: &backbone.catalog_url,
            warehouse: &backbone.warehouse,
            s3_endpoint: backbone.s3_endpoint.as_deref(),
            s3_credentials: backbone.s3.as_ref().map(|s3| s3.credentials_file.display().to_string()),
            database_url: &backbone.database_url,
            commit_interval: args.commit_interval,
            client: (!args.no_client).then_some(plan::Client {
                rate: args.rate,
                batches: args.client_batches,
            }),
        }
    }

    /// What the terminal shows once everything runs; `sql`: the SQL endpoint, if any.
    fn banner(&self, backbone: &Backbone, sql: Option<String>) -> String {
        let (logging, dashboard) = (&self.logging, &self.dashboard);
        format!(
            "\nweather-pipeline is running (Ctrl-C stops it)\n  dashboard       http://{dashboard}/\n  logging-server  http://{logging}/log?city=Boston&temperature=72.5\n  metrics         http://{logging}/metrics  {}\n  PostgreSQL      {}\n  Iceberg         catalog {}, warehouse {}\n  Kafka           {}\n{}\n",
            self.aggregators
                .iter()
                .chain(&self.sinks)
                .map(|(_, admin)| format!("http://{admin}/metrics"))
                .collect::<Vec<_>>()
                .join("  "),
            backbone.shown(&backbone.database_url),
            backbone.shown(&backbone.catalog_url),
            backbone.warehouse,
            backbone.brokers,
            query_hint(sql),
        )
    }
}

impl State {
    fn new(addresses: &Addresses, backbone: &Backbone) -> Self {
        let components = [("logging-server".to_owned(), format!("http://{}", addresses.logging))]
            .into_iter()
            .chain(
                addresses
                    .aggregators
                    .iter()
                    .chain(&addresses.sinks)
                    .map(|(name, admin)| ((*name).to_owned(), format!("http://{admin}"))),
            )
            .chain([("dashboard".to_owned(), format!("http://{}", addresses.dashboard))])
            .chain(
                addresses
                    .query
                    .iter()
                    .map(|query| ("query-server".to_owned(), format!("http://{query}"))),
            )
            .collect();
        Self {
            components,
            database_url: backbone.database_url.clone(),
            s3_endpoint: backbone.s3_endpoint.clone(),
            s3_credentials_file: backbone.s3.as_ref().map(|s3| s3.credentials_file.clone()),
            trino: None,
            catalog_url: Some(backbone.catalog_url.clone()),
            warehouse: Some(backbone.warehouse.clone()),
        }
    }

    fn read(state_dir: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read(state_dir.join("state.json"))
            .with_context(|| format!("no pipeline state in {}: has it run here?", state_dir.display()))?;
        Ok(serde_json::from_slice(&text)?)
    }

    fn write(&self, state_dir: &std::path::Path) -> anyhow::Result<()> {
        Ok(std::fs::write(
            state_dir.join("state.json"),
            serde_json::to_vec_pretty(self)?,
        )?)
    }
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
    backbone: &Backbone,
    notify_dir: &std::path::Path,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<trino::Trino> {
    let catalog = trino::Catalog {
        catalog_url: &backbone.catalog_url,
        warehouse: &backbone.warehouse,
        s3_endpoint: backbone.s3_endpoint.as_deref()?,
        s3_keys: backbone
            .s3
            .as_ref()
            .map(|s3| (s3.access_key.as_str(), s3.secret_key.as_str())),
    };
    tracing::info!("starting Trino (takes a minute)");
    let dir = state_dir.join("trino");
    let started = tokio::select! {
        started = trino::start(launcher, &dir, notify_dir, &catalog) => started,
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
        "  SQL web UI      {url}/ui/\n  SQL (Trino)     {url}\n    trino --server {url} --catalog iceberg --schema default\n    \
         python3 -c \"import trino; c = trino.dbapi.connect(host='{url}', user='me', catalog='iceberg', schema='default').cursor(); \
         c.execute('SELECT city, count(*) FROM weather GROUP BY city'); print(c.fetchall())\""
    )
}

/// `window-aggregator rebuild` on the databases and warehouse of the pipeline that ran (or
/// runs) in `state_dir`; the passwords and keys go by environment, as to the daemons.
async fn rebuild_windows(state_dir: &std::path::Path, args: &[String]) -> anyhow::Result<()> {
    let state = State::read(state_dir)?;
    let (Some(catalog_url), Some(warehouse)) = (&state.catalog_url, &state.warehouse) else {
        anyhow::bail!(
            "{} was written by an earlier version, which did not record where the table is: run `pipeline` once with this version",
            state_dir.join("state.json").display()
        );
    };
    let mut command = tokio::process::Command::new(daemon("window-aggregator")?);
    command
        .arg("rebuild")
        .args(args)
        .env("DATABASE_URL", &state.database_url)
        .env("CATALOG_URL", catalog_url)
        .env("WAREHOUSE", warehouse);
    if let Some(endpoint) = &state.s3_endpoint {
        command.env("S3_ENDPOINT", endpoint);
    }
    if let Some(file) = &state.s3_credentials_file {
        command.env("S3_CREDENTIALS_FILE", file);
    }
    let status = command.status().await.context("starting window-aggregator rebuild")?;
    anyhow::ensure!(status.success(), "window-aggregator rebuild failed ({status})");
    Ok(())
}

async fn status(state_dir: &std::path::Path) -> anyhow::Result<()> {
    let state = State::read(state_dir)?;
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
