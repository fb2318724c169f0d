//! Test harness: starts the real components the tests run against (a Kafka-protocol broker,
//! PostgreSQL, an S3 server) as private processes, and reads what daemons tell systemd.

use std::{
    net::TcpListener,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

mod browser;
mod http;
pub mod load;
pub mod pipeline;
mod postgres;
mod python;
pub mod stack;
pub mod terminal;

pub use browser::*;
pub use http::*;
pub use postgres::*;
pub use python::*;
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    message::OwnedMessage,
    mocking::MockCluster,
    producer::DefaultProducerContext,
};

/// `default_secs`, or the seconds the environment variable `var` says: how long a long test
/// watches, shortened while working on it.
pub fn watched_for(var: &str, default_secs: u64) -> Duration {
    let secs = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_secs);
    Duration::from_secs(secs)
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// Path of a binary built from this workspace (the tests' own target directory).
pub fn workspace_binary(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("current_exe");
    dir.pop(); // the test binary
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// A child process that is killed (SIGKILL) when dropped, unless it already exited.
pub struct ChildGuard {
    pub child: Child,
    pub name: String,
    notify: Option<NotifySocket>,
}

impl ChildGuard {
    pub fn spawn(name: &str, command: &mut Command) -> anyhow::Result<Self> {
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        Ok(Self {
            child,
            name: name.to_owned(),
            notify: None,
        })
    }

    /// Spawns a daemon with its own `NOTIFY_SOCKET`, as systemd would, and waits for
    /// `READY=1`. The socket lives as long as the guard, so later `STOPPING=1` arrives too.
    pub fn spawn_ready(name: &str, command: &mut Command, timeout: Duration) -> anyhow::Result<Self> {
        let notify = NotifySocket::bind()?;
        let mut guard = Self::spawn(name, command.env("NOTIFY_SOCKET", notify.path()))?;
        notify
            .wait_for("READY=1", timeout)
            .with_context(|| format!("{name} never became ready"))?;
        guard.notify = Some(notify);
        Ok(guard)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on a pid we own; no memory is touched.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// `signal` to the child's whole process group, as a terminal sends Ctrl-C (SIGINT) to
    /// its foreground job. The child must lead its group (`Command::process_group(0)`).
    pub fn signal_group(&self, signal: i32) {
        // SAFETY: kill(2) on a process group we started; no memory is touched.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(-self.pid(), signal);
        }
    }

    /// SIGTERM: what systemd sends to stop a unit.
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// SIGTERM, then waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        self.sigterm();
        self.wait(timeout)
    }

    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the crash the daemons must survive.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Every process below `pid`, from /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut all = Vec::new();
    let mut queue = vec![pid];
    while let Some(parent) = queue.pop() {
        let tasks = std::fs::read_dir(format!("/proc/{parent}/task"))
            .into_iter()
            .flatten()
            .flatten();
        for task in tasks {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                all.push(child);
                queue.push(child);
            }
        }
    }
    all
}

/// Those of `pids` still running after up to `timeout` (zombies count as gone).
pub fn still_running(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                    stat.rsplit_once(')')
                        .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
                })
            })
            .collect();
        if alive.is_empty() || Instant::now() > deadline {
            return alive;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listening on {addr} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A Unix datagram socket standing in for systemd's `NOTIFY_SOCKET`.
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    pub fn bind() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path)?;
        Ok(Self {
            socket,
            path,
            _dir: dir,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads datagrams until one holds the line `wanted` (e.g. `READY=1`); returns all read.
    pub fn wait_for(&self, wanted: &str, timeout: Duration) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no {wanted} within {timeout:?}; got {seen:?}");
            }
            self.socket.set_read_timeout(Some(left))?;
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let found = message.lines().any(|l| l == wanted);
                    seen.push(message);
                    if found {
                        return Ok(seen);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// librdkafka's in-process mock cluster: speaks the real Kafka protocol on a local port.
pub struct MockKafka {
    pub cluster: MockCluster<'static, DefaultProducerContext>,
}

impl MockKafka {
    /// One broker, with `topics` created (3 partitions each).
    pub fn start(topics: &[&str]) -> Self {
        Self::start_with(topics, 3)
    }

    /// One broker, with `topics` created in `partitions` each.
    pub fn start_with(topics: &[&str], partitions: i32) -> Self {
        let cluster = MockCluster::new(1).expect("starting the mock Kafka cluster");
        for topic in topics {
            cluster
                .create_topic(topic, partitions, 1)
                .expect("creating a mock topic");
        }
        Self { cluster }
    }

    pub fn brokers(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}

/// Kafka client settings that make group joins fast in tests.
pub fn fast_consumer_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("session.timeout.ms", "2000")
        .set("heartbeat.interval.ms", "300")
        .set("enable.auto.commit", "false")
        .set("group.id", format!("test-{}", std::process::id()));
    config
}

/// Reads `topic` from the beginning of every partition until `count` messages arrived or
/// `timeout` passed (no consumer group offsets involved); returns what it read.
pub fn consume(brokers: &str, topic: &str, count: usize, timeout: Duration) -> anyhow::Result<Vec<OwnedMessage>> {
    let consumer: BaseConsumer = fast_consumer_config(brokers).create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len())
        .context("topic missing from metadata")?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions as i32 {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + timeout;
    let mut messages = Vec::new();
    while messages.len() < count && Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            messages.push(message?.detach());
        }
    }
    // Anything beyond `count` shows up as a duplicate in the caller's assertions.
    while let Some(message) = consumer.poll(Duration::from_millis(300)) {
        messages.push(message?.detach());
    }
    Ok(messages)
}

/// A nisshi broker (Kafka protocol), the one `pipeline` runs, as a private process.
pub struct Nisshi {
    pub brokers: String,
    child: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Nisshi {
    /// Starts nisshi from `NISSHI_BIN`, `PATH` or `~/.cargo/bin` with its log in memory;
    /// `scripts/test` installs it.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with("memory://nisshi/")
    }

    /// Starts nisshi with its log in SQLite in a private directory, as `pipeline` runs it.
    pub fn start_on_disk() -> anyhow::Result<Self> {
        // Relative to nisshi's working directory, the private one.
        Self::start_with("sqlite://nisshi.db")
    }

    fn start_with(storage: &str) -> anyhow::Result<Self> {
        let binary = find_tool("NISSHI_BIN", "nisshi").context(
            "nisshi not found: cargo install nisshi@0.8.1 --locked --no-default-features --features dynostore,libsql",
        )?;
        let dir = tempfile::Builder::new().prefix("weather-nisshi-").tempdir()?;
        // nisshi loads `.env` from its working directory or the nearest parent with one.
        std::fs::write(dir.path().join(".env"), "")?;
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let mut command = Command::new(binary);
        command
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", storage])
            .env("RUST_LOG", "warn")
            .current_dir(dir.path())
            .stdout(Stdio::null());
        let child = ChildGuard::spawn("nisshi", &mut command)?;
        let brokers = format!("127.0.0.1:{port}");
        wait_for_port(&brokers, Duration::from_secs(30))?;
        Ok(Self {
            brokers,
            child,
            _dir: dir,
        })
    }

    /// Freezes the broker (SIGSTOP): its connections stay open and nothing answers.
    pub fn freeze(&self) {
        self.child.signal(libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        self.child.signal(libc::SIGCONT);
    }
}

/// Finds an external tool: the path in `env_var`, then `PATH`, then `~/.cargo/bin`.
pub fn find_tool(env_var: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_bin = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    std::env::split_paths(&path)
        .chain(cargo_bin)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The value of header `name` of `message`, as text.
pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    (0..headers.count())
        .map(|i| headers.get(i))
        .find(|h| h.key == name)
        .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
}

/// Payloads of `messages` as text, for assertions.
pub fn payloads(messages: &[OwnedMessage]) -> Vec<String> {
    messages
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned())
        .collect()
}

/// Produces `(key, value)` records to `topic` and waits until the broker acknowledged all.
pub fn produce(brokers: &str, topic: &str, records: &[(Vec<u8>, Vec<u8>)]) -> anyhow::Result<()> {
    produce_with(brokers, topic, records, &[])
}

/// [`produce`] with extra librdkafka producer properties.
pub fn produce_with(
    brokers: &str,
    topic: &str,
    records: &[(Vec<u8>, Vec<u8>)],
    options: &[(&str, &str)],
) -> anyhow::Result<()> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000");
    for (key, value) in options {
        config.set(*key, *value);
    }
    let producer: BaseProducer = config.create()?;
    for (key, value) in records {
        let mut record = BaseRecord::to(topic).key(key).payload(value);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    back,
                )) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    producer.flush(Duration::from_secs(60))?;
    anyhow::ensure!(producer.in_flight_count() == 0, "records left unacknowledged");
    Ok(())
}

/// [`produce`] for readings, keyed by city as the logging-server does.
pub fn produce_readings(brokers: &str, topic: &str, readings: &[weather_common::WeatherReading]) -> anyhow::Result<()> {
    produce(brokers, topic, &reading_records(readings))
}

/// The `(key, value)` records the logging-server produces for `readings`: key = city.
pub fn reading_records(readings: &[weather_common::WeatherReading]) -> Vec<(Vec<u8>, Vec<u8>)> {
    readings
        .iter()
        .map(|r| (r.city.as_bytes().to_vec(), r.to_json()))
        .collect()
}

/// Builds the daemons' binaries for tests of another package (`CARGO_BIN_EXE_*` only covers
/// the test's own package). `--all-targets` resolves features as `cargo test` does, so after
/// `cargo test --workspace` built everything this is a no-op.
pub fn build_workspace_binaries() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--workspace", "--all-targets"])
        .status()
        .expect("cargo build");
    assert!(status.success(), "building the daemons failed");
}

/// The partitions a consumer listening on `addr` owns (its `*_partition_owned` series); none
/// when it does not answer.
pub async fn owned_partitions(addr: &str) -> Vec<i32> {
    let Ok(response) = http_get(addr, "/metrics").await else {
        return Vec::new();
    };
    response
        .body
        .lines()
        .filter(|l| l.contains("_partition_owned{"))
        .filter_map(|l| l.split("partition=\"").nth(1)?.split('"').next()?.parse().ok())
        .collect()
}

/// The value of the first sample in Prometheus text whose name and labels are `name`.
pub fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}
