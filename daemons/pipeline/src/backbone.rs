//! The services the daemons stand on: PostgreSQL, a Kafka-protocol broker and object storage.
//! Each is used when given, started from a binary found on this machine otherwise, and (for
//! Kafka) embedded in-process as a last resort.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// A TCP port nobody listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts connections on `addr`.
pub async fn wait_for_port(addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if tokio::time::Instant::now() > deadline {
            bail!("nothing listening on {addr} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Spawns a backbone server with its output in `log` (stopped if the pipeline drops it) and
/// waits until it accepts connections on `addr`.
pub async fn start_logged(
    name: &str,
    command: &mut Command,
    log: &Path,
    addr: &str,
    timeout: Duration,
) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log)?;
    let child = command
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", command.as_std().get_program().to_string_lossy()))?;
    wait_for_port(addr, timeout)
        .await
        .with_context(|| format!("{name} did not start; see {}", log.display()))?;
    Ok(child)
}

/// Finds `name` on `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A private PostgreSQL server in the state directory.
pub struct LocalPostgres {
    pub port: u16,
    pub child: Child,
}

/// The directory holding `initdb` and `postgres`: `PATH`, then Debian's location.
fn postgres_bin() -> Option<PathBuf> {
    if let Some(initdb) = on_path("initdb") {
        let dir = initdb.parent()?.to_path_buf();
        if dir.join("postgres").is_file() {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("postgres").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// PostgreSQL refuses to run as root; as root it runs as the `postgres` user (set directly on
/// the process, so signals reach the postmaster itself).
fn as_postgres_user(program: &Path) -> anyhow::Result<Command> {
    let mut command = Command::new(program);
    if rustix::process::geteuid().is_root() {
        let (uid, gid) = postgres_ids()?;
        command.uid(uid).gid(gid);
    }
    Ok(command)
}

fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    let id = |flag: &str| -> anyhow::Result<u32> {
        let output = std::process::Command::new("id").args([flag, "postgres"]).output()?;
        anyhow::ensure!(
            output.status.success(),
            "running as root needs a postgres user to run PostgreSQL as"
        );
        Ok(String::from_utf8(output.stdout)?.trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

impl LocalPostgres {
    /// initdb (first time) and start `postgres` in `dir`, listening on 127.0.0.1 only.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let bin = postgres_bin()
            .context("PostgreSQL not found. Install it (Debian: apt-get install postgresql) or pass --database-url")?;
        let data = dir.join("data");
        std::fs::create_dir_all(dir)?;
        if rustix::process::geteuid().is_root() {
            let (uid, gid) = postgres_ids()?;
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
        }
        if !data.join("PG_VERSION").is_file() {
            let status = as_postgres_user(&bin.join("initdb"))?
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
                .stdout(Stdio::null())
                .status()
                .await?;
            anyhow::ensure!(status.success(), "initdb failed: {status}");
        }
        let port = free_port()?;
        let child = as_postgres_user(&bin.join("postgres"))?
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-k"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting postgres")?;
        let postgres = Self { port, child };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match tokio_postgres::connect(&postgres.url("postgres"), tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    for db in ["weather", "iceberg"] {
                        let exists = client
                            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
                            .await?;
                        if exists.is_none() {
                            client.batch_execute(&format!("CREATE DATABASE {db}")).await?;
                        }
                    }
                    return Ok(postgres);
                }
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => return Err(e).context("PostgreSQL did not come up"),
            }
        }
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

/// Where the Kafka protocol is spoken.
pub enum Kafka {
    External(String),
    /// A broker process in the state directory: Apache Kafka (KRaft, persistent) or tansu
    /// (in memory).
    Process {
        brokers: String,
        child: Child,
        tansu: bool,
    },
    /// librdkafka's mock cluster inside this process: in memory, gone when the pipeline stops.
    Embedded(rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
}

impl Kafka {
    /// The given brokers; else Apache Kafka or tansu found on `PATH`, started in `dir`; else
    /// an in-process broker.
    pub async fn start(given: Option<String>, dir: &Path) -> anyhow::Result<Self> {
        if let Some(brokers) = given {
            return Ok(Self::External(brokers));
        }
        if let Some((bin, suffix)) = crate::apache_kafka::find() {
            let (brokers, child) = crate::apache_kafka::start(&bin, suffix, dir).await?;
            tracing::info!(%brokers, "Apache Kafka (KRaft) started, its log in {}", dir.display());
            return Ok(Self::Process {
                brokers,
                child,
                tansu: false,
            });
        }
        if let Some(tansu) = on_path("tansu") {
            let port = free_port()?;
            let url = format!("tcp://127.0.0.1:{port}");
            let child = Command::new(tansu)
                .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
                .args(["--storage-engine", "memory://tansu/"])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("starting tansu")?;
            let brokers = format!("127.0.0.1:{port}");
            wait_for_port(&brokers, Duration::from_secs(30)).await?;
            tracing::warn!("tansu broker keeps messages in memory: they are gone when the pipeline stops");
            return Ok(Self::Process {
                brokers,
                child,
                tansu: true,
            });
        }
        let cluster = rdkafka::mocking::MockCluster::new(1).context("starting the embedded Kafka broker")?;
        for topic in ["weather", "weather.dlq"] {
            cluster.create_topic(topic, 3, 1)?;
        }
        tracing::warn!(
            "no Kafka broker given (--kafka-brokers) and none on PATH (kafka-server-start.sh, tansu): using an \
             in-process, in-memory broker; messages are gone when the pipeline stops"
        );
        Ok(Self::Embedded(cluster))
    }

    pub fn brokers(&self) -> String {
        match self {
            Self::External(brokers) | Self::Process { brokers, .. } => brokers.clone(),
            Self::Embedded(cluster) => cluster.bootstrap_servers(),
        }
    }

    /// librdkafka properties the producers need for this broker. tansu 0.6 answers a fetch
    /// with the first record batch that starts at or after the offset asked for, and gives the
    /// start of the last batch plus one as the log end: with batches of several records, a
    /// consumer resuming inside one would skip the rest of it, or take the log for one that
    /// started over. One record per batch makes both exact.
    pub fn producer_options(&self) -> &'static [&'static str] {
        match self {
            Self::Process { tansu: true, .. } => &["batch.num.messages=1"],
            _ => &[],
        }
    }

    /// Stops a broker process cleanly (Apache Kafka then needs no log recovery next time).
    pub async fn stop(self) {
        if let Self::Process { mut child, .. } = self {
            crate::supervisor::terminate(&mut child, rustix::process::Signal::TERM, Duration::from_secs(60)).await;
        }
    }
}

/// The answer to [`http_request`].
pub struct HttpAnswer {
    pub status: u16,
    pub status_line: String,
    pub body: String,
}

/// A small request over plain HTTP, for `status`, readiness checks and bucket creation.
/// HTTP/1.0 so that no server answers in chunks.
pub async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<HttpAnswer> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await??;
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await??;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").context("malformed response")?;
    let status_line = head.lines().next().unwrap_or_default().to_owned();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("malformed status line {status_line:?}"))?;
    Ok(HttpAnswer {
        status,
        status_line,
        body: body.to_owned(),
    })
}

/// The body of `GET path`, when the answer is 200.
pub async fn get(addr: &str, path: &str) -> anyhow::Result<String> {
    let answer = http_request(addr, "GET", path, &[]).await?;
    anyhow::ensure!(answer.status == 200, "{}", answer.status_line);
    Ok(answer.body)
}
