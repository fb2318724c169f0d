//! `bench`: throughput, latency, memory and start-up numbers of the daemons against real
//! components (nisshi as the broker, a private PostgreSQL, moto as S3), each daemon alone and
//! then all together end to end. Prints a table and writes bench/RESULTS.md.
//!
//! Run: `cargo run --release -p bench` (the daemons must be built: `cargo build --release`).

use std::{
    fmt::Write as _,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

mod end_to_end;
mod query;
mod rebuild;
mod scale;
mod soak;

use anyhow::Context;
use chrono::{TimeDelta, Utc};
use rdkafka::producer::FutureRecord;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use weather_common::{
    WeatherReading,
    kafka::{DEAD_LETTER_TOPIC, KafkaArgs, WEATHER_TOPIC},
};
use weather_testkit::{
    ChildGuard, Nisshi, Postgres, S3Server, free_port, http_get, produce_readings, workspace_binary,
};

#[derive(clap::Parser)]
struct Args {
    /// Readings fed to each consumer daemon.
    #[arg(long, default_value_t = 1_000_000)]
    readings: usize,
    /// Length of each HTTP load run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Readings per second sent through the whole pipeline for the end-to-end numbers.
    #[arg(long, default_value_t = 200)]
    e2e_rate: u32,
    /// How long the end-to-end load runs.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    e2e_duration: Duration,
    /// Commits the soak benchmark makes.
    #[arg(long, default_value_t = 10_000)]
    soak_commits: usize,
    /// The soak benchmark runs the sink's maintenance every this many commits.
    #[arg(long, default_value_t = 30)]
    soak_maintenance_every: usize,
    /// Snapshot retention in the soak benchmark, whose commits come faster than real ones.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    soak_retention: Duration,
    /// Readings in the tables the SQL benchmark queries, one table per size.
    #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
    query_rows: Vec<usize>,
    /// Readings the scale-out benchmark feeds to 1, 2 and 4 instances of each consumer.
    #[arg(long, default_value_t = 500_000)]
    scale_readings: usize,
    /// Run only these parts (http, consumers, scale, end-to-end, soak, query: SQL and a rebuild of
    /// the windows on the same tables); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where to write the results table.
    #[arg(long, default_value = "bench/RESULTS.md")]
    output: std::path::PathBuf,
}

struct Row {
    what: String,
    value: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let mut rows = Vec::new();
    let runs = |part: &str| args.only.is_empty() || args.only.iter().any(|p| p == part);
    if runs("http") {
        http_benchmarks(&args, &mut rows).await?;
    }
    if runs("consumers") {
        consumer_benchmarks(&args, &mut rows).await?;
    }
    if runs("scale") {
        scale::benchmark(&args, &mut rows).await?;
    }
    if runs("end-to-end") {
        end_to_end::benchmark(&args, &mut rows).await?;
    }
    if runs("soak") {
        soak::benchmark(&args, &mut rows).await?;
    }
    if runs("query") {
        query::benchmark(&args, &mut rows).await?;
    }

    let mut table = String::from("| measurement | result |\n| --- | --- |\n");
    for row in &rows {
        writeln!(table, "| {} | {} |", row.what, row.value)?;
    }
    println!("\n{table}");
    if !args.only.is_empty() {
        println!("a partial run: {} left as it is", args.output.display());
        return Ok(());
    }
    let machine = format!(
        "{} cores, {} MiB memory, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_mib(),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                .split(':')
                .nth(1)
                .unwrap_or("")
                .trim()
                .to_owned()))
            .unwrap_or_default()
    );
    let report = format!(
        "# Benchmark results\n\nMachine: {machine}. Date: {}.\n\nCommand: `cargo build --release --workspace && cargo run --release -p bench -- --readings {} --duration {} --e2e-rate {} --e2e-duration {}`\n\n\
         HTTP numbers are `GET /log` with broker acknowledgement (`acks=all`, idempotent producer) against a nisshi broker \
         process on the same machine, first with its log in SQLite on disk as `pipeline` runs it, then in memory; load generator and server share the two cores. Consumer numbers feed a \
         pre-filled topic on nisshi (log in SQLite on disk, as `pipeline` runs it) to the daemon binary and time until its commits cover every reading. End-to-end numbers run \
         the four daemons together against nisshi (log on disk), PostgreSQL and moto with default settings while a load generator sends \
         `GET /log` at a fixed rate; each acknowledgement names its Kafka partition and offset and its timestamp, so its \
         Iceberg commit (the sink's committed offsets) and its window (dashboard API, polled every 50 ms) are found exactly. \
         Reading the table: one connection waits for each acknowledgement in turn, so its rate is bound by the broker's round trip, which the \"broker alone\" rows measure with the same producer settings and no HTTP (the producer does not linger: a lone reading is sent at once, and readings that arrive while a request is in flight share the next one); the consumers spend most of their wall time waiting for the broker's fetches, so readings per CPU-second is their per-core rate; end-to-end times are dominated by the 5 s window plus 2 s allowed lateness (dashboard) and the 10 s commit interval (Iceberg), both defaults. The soak rows append {} commits of 20 readings, 10 s of event time apart, back to back through the iceberg-sink's table code (directory warehouse, PostgreSQL catalog), with the sink's maintenance every {} commits and a snapshot retention of {} (the commits come about 1,000 times faster than real ones, so this keeps 200 to 250 snapshots, what 40 min of real 10 s commits make); each row is the 1,000 commits before it, and PyIceberg's count is checked against every reading committed.\n\n{table}",
        Utc::now().format("%Y-%m-%d"),
        args.readings,
        humantime::format_duration(args.duration),
        args.e2e_rate,
        humantime::format_duration(args.e2e_duration),
        args.soak_commits,
        args.soak_maintenance_every,
        humantime::format_duration(args.soak_retention),
    ) + &format!(
        "\nThe SQL rows: for each size ({}), a day of that many readings written by the iceberg-sink's table code in commits of 100,000, each touching all 24 hours, then maintained as the sink does (manifests merged, the 23 closed hours compacted to one file each; the newest hour keeps one file per commit), in a directory warehouse with a PostgreSQL catalog. Each query runs 5 times through Trino's Python client (DBAPI) against the query-server and 5 times in PyIceberg + PyArrow reading the same table; the median is shown, and the script checks that both give the same averages and the same rows. PyIceberg loads the table from the catalog for each query; the query-server reads the catalog's row for each statement and reuses what it loaded while the table's metadata file is unchanged. Through the Trino protocol rows arrive as JSON and become Python objects in the client, which is most of the range query's time (`count(*)` of the same range shows the server's own planning and scan); PyIceberg hands over an Arrow table, and its `to_pylist()` is shown for rows as Python objects. The DuckDB row runs `count(*)`, the per-city average, `SELECT *` of `hour(ts) = 14` and a `TIMESTAMP` range outside the data 5 times each through the trino client against the query-server and in DuckDB in process (`iceberg_scan` of the table's current metadata file, found once from the catalog; time zone UTC); the script checks that both count the same rows, and both hand them to Python as Python objects. The delivery row splits the `hour(ts) = 14` statement: the same pages fetched with plain HTTP and decoded from JSON (what the server and the protocol deliver), the trino client's own conversion of those rows to Python objects (its row mapper, timed alone), and DuckDB's rows as Python objects and as Arrow; the first row is `fetchone()` after `execute()` of `SELECT *` of the whole table, which is then canceled.\n\n\
         The rows with several instances: for 1, 2 and 4 instances of each consumer, on a topic of 6 partitions in nisshi (log on disk), a database and a table of their own, the instances start, the group spreads the partitions over them, then {} readings of 60 cities are produced at once (faster than the consumers read) and timed until the instances together have aggregated them (window-aggregator) or committed them to Iceberg (iceberg-sink, commit interval 2 s, so its times move in steps of up to 2 s). CPU is the instances' together: readings per CPU-second is the per-core rate; the machine's 2 cores are shared by the instances, the broker and the benchmark, so more instances cannot add cores. Then 4 sinks run a minute at 200 readings/s with the default 10 s commit interval, counting how often one sink's commit met another's (a conflict: checked and merged again on the newer snapshot, never a rewrite).\n",
        args.query_rows
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        args.scale_readings,
    );
    std::fs::write(&args.output, report).with_context(|| format!("writing {}", args.output.display()))?;
    println!("written to {}", args.output.display());
    Ok(())
}

/// Starts daemon `name` of this workspace with `args` (S3 credentials of the test server, logs
/// at warn) and waits for its READY=1.
fn spawn_daemon<I, A>(name: &str, args: I) -> anyhow::Result<ChildGuard>
where
    I: IntoIterator<Item = A>,
    A: AsRef<std::ffi::OsStr>,
{
    ChildGuard::spawn_ready(
        name,
        Command::new(workspace_binary(name))
            .args(args)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("RUST_LOG", "warn"),
        Duration::from_secs(60),
    )
}

fn memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// The most memory `pid` has held.
fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// A memory field of `/proc/PID/status`, in MiB (0 when unreadable).
fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// User plus system CPU time a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    // /proc counts in USER_HZ, which the kernel ABI fixes at 100.
    const TICKS_PER_SECOND: f64 = 100.0;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some(fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?)
        })
        .map_or(0.0, |t| t / TICKS_PER_SECOND)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// "N unit, p50 …, p99 …" of `latencies` (sorted) gathered over `duration`.
fn rate_and_latency(latencies: &[Duration], duration: Duration, unit: &str) -> String {
    format!(
        "{:.0} {unit}, p50 {:.2} ms, p99 {:.2} ms",
        latencies.len() as f64 / duration.as_secs_f64(),
        percentile(latencies, 0.5).as_secs_f64() * 1e3,
        percentile(latencies, 0.99).as_secs_f64() * 1e3
    )
}

/// Keeps `connections` keep-alive connections busy with `request` for `duration`; returns the
/// latency of every 200 answer and the count of other answers.
async fn load(
    addr: &str,
    request: Arc<Vec<u8>>,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<(Vec<Duration>, usize)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (addr, request, stop) = (addr.to_owned(), request.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(&addr).await?;
            stream.set_nodelay(true)?;
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            let mut buf = vec![0u8; 16 * 1024];
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                stream.write_all(&request).await?;
                let status = read_response(&mut stream, &mut buf).await?;
                if status == 200 {
                    latencies.push(started.elapsed());
                } else {
                    errors += 1;
                }
            }
            anyhow::Ok((latencies, errors))
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await??;
        latencies.extend(l);
        errors += e;
    }
    latencies.sort();
    Ok((latencies, errors))
}

/// Reads one HTTP/1.1 response with a Content-Length body; returns its status.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<u16> {
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[filled..]).await?;
        anyhow::ensure!(n > 0, "connection closed");
        filled += n;
        let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&buf[..end])?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("status")?;
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            })
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        while filled < end + 4 + length {
            if filled == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
            let n = stream.read(&mut buf[filled..]).await?;
            anyhow::ensure!(n > 0, "connection closed");
            filled += n;
        }
        return Ok(status);
    }
}

async fn http_benchmarks(args: &Args, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    // The broker `pipeline` runs by default, then the same broker without a disk under it.
    for (nisshi, broker, with_batches) in [
        (
            Nisshi::start_on_disk()?,
            "nisshi, log in SQLite on disk (`pipeline`'s default)",
            true,
        ),
        (Nisshi::start()?, "nisshi, log in memory", false),
    ] {
        http_benchmark(args, &nisshi.brokers, broker, with_batches, rows).await?;
    }
    Ok(())
}

/// `GET /log` at 1, 16 and 64 connections against a logging-server on `brokers`, and
/// `POST /logs` when `with_batches`.
async fn http_benchmark(
    args: &Args,
    brokers: &str,
    broker: &str,
    with_batches: bool,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(logging_server::run(
        logging_server::Args::with_brokers(brokers),
        listener,
        shutdown.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http_get(&addr, "/ready").await.is_ok_and(|r| r.status == 200) {
        anyhow::ensure!(Instant::now() < deadline, "logging-server never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let latencies = broker_round_trips(brokers, args.duration).await?;
    let line = rate_and_latency(&latencies, args.duration, "acknowledgements/s");
    println!("broker round trip, {broker}: {line}");
    rows.push(Row {
        what: format!("broker alone: one reading produced and acknowledged at a time, {broker}"),
        value: line,
    });
    let get = Arc::new(format!("GET /log?city=Boston&temperature=72.5 HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes());
    for connections in [1, 16, 64] {
        let (latencies, errors) = load(&addr, get.clone(), connections, args.duration).await?;
        let line = format!(
            "{}, {errors} non-200",
            rate_and_latency(&latencies, args.duration, "req/s")
        );
        println!("GET /log, {connections} connections, {broker}: {line}");
        rows.push(Row {
            what: format!("logging-server `GET /log`, {connections} connections, {broker}"),
            value: line,
        });
    }
    if with_batches {
        let lines = 1000;
        let body: String = (0..lines)
            .map(|i| format!("{{\"city\":\"City {}\",\"temperature\":{}.25}}\n", i % 10, i % 100))
            .collect();
        let post = Arc::new(
            format!(
                "POST /logs HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        );
        let (latencies, errors) = load(&addr, post, 4, args.duration).await?;
        let rate = (latencies.len() * lines) as f64 / args.duration.as_secs_f64();
        let line = format!(
            "{rate:.0} readings/s ({lines} per request), p50 {:.1} ms, p99 {:.1} ms per request, {errors} non-200",
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3
        );
        println!("POST /logs, {broker}: {line}");
        rows.push(Row {
            what: format!("logging-server `POST /logs` NDJSON, 4 connections, {broker}"),
            value: line,
        });
    }
    shutdown.cancel();
    server.await??;
    Ok(())
}

/// Produces one reading at a time with the logging-server's producer for a lone request, each
/// waiting for its acknowledgement: the broker's own round trip, which bounds one HTTP
/// connection.
async fn broker_round_trips(brokers: &str, duration: Duration) -> anyhow::Result<Vec<Duration>> {
    let producer = logging_server::producer(&logging_server::Args::with_brokers(brokers), Duration::ZERO)?;
    let payload = WeatherReading::new("Boston", 72.5, Utc::now())?.to_json();
    let mut latencies = Vec::new();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let started = Instant::now();
        let record = FutureRecord::to(WEATHER_TOPIC).key("Boston").payload(&payload);
        producer
            .send(record, Duration::from_secs(5))
            .await
            .map_err(|(e, _)| e)
            .context("producing")?;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    Ok(latencies)
}

/// Creates the pipeline's topics on a broker that does not auto-create them.
async fn create_topics(brokers: &str) -> anyhow::Result<()> {
    KafkaArgs::new(brokers)
        .ensure_topics(&[WEATHER_TOPIC, DEAD_LETTER_TOPIC])
        .await
}

/// The services the daemons stand on, private to one benchmark.
struct Backbone {
    kafka: Nisshi,
    postgres: Postgres,
    database_url: String,
    catalog_url: String,
    s3: S3Server,
}

impl Backbone {
    async fn start() -> anyhow::Result<Self> {
        // nisshi rather than librdkafka's mock cluster (which keeps only a few MB per partition),
        // with its log on disk as `pipeline` runs it.
        let kafka = Nisshi::start_on_disk()?;
        create_topics(&kafka.brokers).await?;
        let postgres = Postgres::start()?;
        Ok(Self {
            kafka,
            database_url: postgres.create_database("weather").await?,
            catalog_url: postgres.create_database("iceberg").await?,
            postgres,
            s3: S3Server::start().await?,
        })
    }
}

async fn consumer_benchmarks(args: &Args, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let Backbone {
        kafka,
        database_url,
        catalog_url,
        s3,
        postgres: _postgres,
    } = Backbone::start().await?;

    // One hour of readings from ten cities, in event-time order.
    let base = Utc::now() - TimeDelta::hours(2);
    let step = 3_600_000_000 / args.readings as i64;
    let readings: Vec<_> = (0..args.readings)
        .map(|i| WeatherReading {
            city: weather_common::reading::DEMO_CITIES[i % 10].to_owned(),
            temperature: (i % 12_000) as f64 / 100.0,
            ts: base + TimeDelta::microseconds(step * i as i64),
        })
        .collect();
    let started = Instant::now();
    produce_readings(&kafka.brokers, WEATHER_TOPIC, &readings)?;
    println!("{} readings produced in {:?}", args.readings, started.elapsed());

    let total = args.readings as f64;
    let aggregator_admin = format!("127.0.0.1:{}", free_port());
    let sink_admin = format!("127.0.0.1:{}", free_port());
    for (name, admin, metric, extra) in [
        (
            "window-aggregator",
            aggregator_admin,
            "window_aggregator_records_total{outcome=\"windowed\"}",
            vec!["--database-url".to_owned(), database_url.clone()],
        ),
        (
            "iceberg-sink",
            sink_admin,
            "iceberg_sink_records_written_total",
            vec![
                "--catalog-url".to_owned(),
                catalog_url.clone(),
                "--s3-endpoint".to_owned(),
                s3.endpoint.clone(),
                "--commit-interval".to_owned(),
                "2s".to_owned(),
            ],
        ),
    ] {
        let spawned = Instant::now();
        let flags = ["--kafka-brokers", kafka.brokers.as_str(), "--listen", &admin];
        let mut child = spawn_daemon(name, flags.iter().copied().chain(extra.iter().map(String::as_str)))?;
        let ready = spawned.elapsed();
        let started = Instant::now();
        let cpu_before = cpu_seconds(child.child.id());
        let mut peak_rss: f64 = 0.0;
        loop {
            peak_rss = peak_rss.max(rss_mib(child.child.id()));
            let metrics = http_get(&admin, "/metrics").await.map(|r| r.body).unwrap_or_default();
            let done = metrics
                .lines()
                .find_map(|l| l.strip_prefix(metric)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            if done >= total {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "{name} did not finish: {done} of {total}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let elapsed = started.elapsed();
        let cpu = cpu_seconds(child.child.id()) - cpu_before;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle_rss = rss_mib(child.child.id());
        let mut value = format!(
            "{:.0} readings/s ({} in {:.1} s; {:.0} readings per CPU-second), READY after {:.0} ms, RSS peak {peak_rss:.0} MiB, idle {idle_rss:.0} MiB",
            total / elapsed.as_secs_f64(),
            args.readings,
            elapsed.as_secs_f64(),
            total / cpu.max(1e-9),
            ready.as_secs_f64() * 1e3,
        );
        if name == "iceberg-sink" {
            let metrics = http_get(&admin, "/metrics").await?.body;
            let bytes = metrics
                .lines()
                .find_map(|l| {
                    l.strip_prefix("iceberg_sink_parquet_bytes_written_total")?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .unwrap_or(0.0);
            write!(value, ", {:.2} bytes per reading in Parquet (ZSTD)", bytes / total)?;
        }
        println!("{name}: {value}");
        let what = if name == "iceberg-sink" {
            "Kafka to committed Parquet on S3"
        } else {
            "consumed and aggregated"
        };
        rows.push(Row {
            what: format!("{name}, {} readings, {what}", args.readings),
            value,
        });
        child.terminate(Duration::from_secs(60))?;
    }
    Ok(())
}
