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

pub mod load;
pub mod pipeline;
pub mod stack;
pub mod terminal;
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

/// A response read by [`http_request`].
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), read to the end. Kept
/// byte-level on purpose: tests send malformed input a client library would refuse to build.
pub async fn http_request(addr: &str, method: &str, target: &str, body: &[u8]) -> anyhow::Result<HttpResponse> {
    http_request_with(addr, method, target, &[], body).await
}

/// [`http_request`] with extra request headers.
pub async fn http_request_with(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    // Read the head, then exactly Content-Length bytes (some servers keep the connection open
    // despite `Connection: close`), or to the end when no length is given.
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed before the end of the response head");
        raw.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw.split_off(head_end + 4);
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    match length {
        Some(length) => {
            while body.len() < length {
                let n = stream.read(&mut chunk).await?;
                anyhow::ensure!(n > 0, "connection closed before the end of the body");
                body.extend_from_slice(&chunk[..n]);
            }
        }
        None => {
            stream.read_to_end(&mut body).await?;
        }
    }
    let body = String::from_utf8_lossy(&body).into_owned();
    Ok(HttpResponse { status, headers, body })
}

/// `POST /v1/statement` of Trino's protocol as user `test`: the first response.
pub async fn trino_submit(addr: &str, sql: &str) -> anyhow::Result<serde_json::Value> {
    let response = http_request_with(
        addr,
        "POST",
        "/v1/statement",
        &[("X-Trino-User", "test")],
        sql.as_bytes(),
    )
    .await?;
    anyhow::ensure!(
        response.status == 200,
        "POST /v1/statement: {} {}",
        response.status,
        response.body
    );
    Ok(response.json())
}

/// Runs `sql` over Trino's protocol on `addr` (the query-server), following each `nextUri`
/// to the end: every response, the last one finished or failed.
pub async fn trino_statement(addr: &str, sql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut responses = vec![trino_submit(addr, sql).await?];
    while let Some(next) = responses.last().and_then(|r| r["nextUri"].as_str()).map(str::to_owned) {
        let page = http_get(addr, trino_path(addr, &next)?).await?;
        anyhow::ensure!(page.status == 200, "GET {next}: {} {}", page.status, page.body);
        responses.push(page.json());
    }
    Ok(responses)
}

/// The path of a `nextUri` that names `addr`.
pub fn trino_path<'a>(addr: &str, uri: &'a str) -> anyhow::Result<&'a str> {
    Ok(uri
        .split_once(addr)
        .with_context(|| format!("{uri} is not on {addr}"))?
        .1)
}

/// The rows of all the responses of a statement.
pub fn trino_rows(responses: &[serde_json::Value]) -> Vec<serde_json::Value> {
    responses
        .iter()
        .filter_map(|r| r["data"].as_array())
        .flatten()
        .cloned()
        .collect()
}

/// GET shorthand for [`http_request`].
pub async fn http_get(addr: &str, target: &str) -> anyhow::Result<HttpResponse> {
    http_request(addr, "GET", target, b"").await
}

/// A private PostgreSQL cluster in a temporary directory, on its own port, trust auth.
pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    dir: tempfile::TempDir,
    run_as_postgres: bool,
}

impl Postgres {
    /// initdb and start. Uses `PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`, else `PATH`.
    /// As root, the server runs as the `postgres` user (PostgreSQL refuses to run as root).
    pub fn start() -> anyhow::Result<Self> {
        let bin = postgres_bin_dir().context("PostgreSQL not found: apt-get install postgresql")?;
        let dir = tempfile::Builder::new().prefix("weather-pg-").tempdir()?;
        let run_as_postgres = is_root();
        if run_as_postgres {
            let uid = command_output(Command::new("id").args(["-u", "postgres"]))?;
            let gid = command_output(Command::new("id").args(["-g", "postgres"]))?;
            std::os::unix::fs::chown(dir.path(), Some(uid.trim().parse()?), Some(gid.trim().parse()?))?;
        }
        let data = dir.path().join("data");
        let postgres = Self {
            port: free_port(),
            bin,
            data,
            dir,
            run_as_postgres,
        };
        let initdb = postgres.bin.join("initdb");
        let status = postgres
            .command(&initdb)
            .args(["-D"])
            .arg(&postgres.data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "initdb failed: {status}");
        postgres.start_server()?;
        Ok(postgres)
    }

    fn command(&self, program: &Path) -> Command {
        if self.run_as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    /// Starts the server (again, after [`Postgres::stop`]).
    pub fn start_server(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let status = self
            .command(&self.bin.join("pg_ctl"))
            .args(["-D"])
            .arg(&self.data)
            .args(["-o", &options, "-l"])
            .arg(self.dir.path().join("postgres.log"))
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "pg_ctl start failed: {status}: {}", self.log());
        Ok(())
    }

    /// Stops the server, dropping every connection (`-m fast`).
    pub fn stop(&self) -> anyhow::Result<()> {
        let status = self
            .command(&self.bin.join("pg_ctl"))
            .args(["-D"])
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "pg_ctl stop failed: {status}");
        Ok(())
    }

    /// Freezes the postmaster and every backend (SIGSTOP), the way a stalled machine looks to
    /// clients: connections stay open, nothing is answered.
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal_all(libc::SIGSTOP)
    }

    /// Undoes [`Postgres::freeze`].
    pub fn thaw(&self) -> anyhow::Result<()> {
        self.signal_all(libc::SIGCONT)
    }

    fn signal_all(&self, signal: i32) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid"))?;
        let postmaster: u32 = text.lines().next().context("empty postmaster.pid")?.trim().parse()?;
        for pid in std::iter::once(postmaster).chain(descendants(postmaster)) {
            // SAFETY: kill(2) on processes of the cluster this harness started.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
        Ok(())
    }

    /// The server log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Connection URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name` and returns its URL.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        let client = connect(&self.url("postgres")).await?;
        client.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await?;
        Ok(self.url(name))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command(&self.bin.join("pg_ctl"))
            .args(["-D"])
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A tokio-postgres client whose connection runs on a background task.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

fn postgres_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("postgres").is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .or_else(|| find_tool("INITDB", "initdb").and_then(|p| p.parent().map(Path::to_path_buf)))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid() == 0
    }
}

fn command_output(command: &mut Command) -> anyhow::Result<String> {
    let output = command.output()?;
    anyhow::ensure!(output.status.success(), "{command:?} failed");
    Ok(String::from_utf8(output.stdout)?)
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

/// Headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`).
pub struct Browser {
    driver_addr: String,
    session: String,
    _driver: ChildGuard,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start() -> anyhow::Result<Self> {
        let driver = find_tool("CHROMEDRIVER", "chromedriver")
            .context("chromedriver not found: apt-get install chromium-driver")?;
        let chromium = find_tool("CHROMIUM", "chromium").context("chromium not found: apt-get install chromium")?;
        let port = free_port();
        let child = ChildGuard::spawn(
            "chromedriver",
            Command::new(driver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        let driver_addr = format!("127.0.0.1:{port}");
        wait_for_port(&driver_addr, Duration::from_secs(30))?;
        let profile = tempfile::tempdir()?;
        let capabilities = serde_json::json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-quic", "--no-first-run", "--window-size=1280,1400",
                format!("--user-data-dir={}", profile.path().display()),
            ]
        }}}});
        let response = http_request(&driver_addr, "POST", "/session", capabilities.to_string().as_bytes()).await?;
        let session = response.json()["value"]["sessionId"]
            .as_str()
            .with_context(|| format!("no WebDriver session: {}", response.body))?
            .to_owned();
        Ok(Self {
            driver_addr,
            session,
            _driver: child,
            _profile: profile,
        })
    }

    async fn command(&self, method: &str, path: &str, body: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let target = format!("/session/{}{path}", self.session);
        let body = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let response = http_request(&self.driver_addr, method, &target, &body).await?;
        anyhow::ensure!(response.status == 200, "WebDriver {method} {path}: {}", response.body);
        Ok(response.json()["value"].take())
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.command("POST", "/url", serde_json::json!({ "url": url }))
            .await
            .map(drop)
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub async fn eval(&self, script: &str) -> anyhow::Result<serde_json::Value> {
        self.command(
            "POST",
            "/execute/sync",
            serde_json::json!({ "script": script, "args": [] }),
        )
        .await
    }

    /// Saves a PNG of the viewport.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        use base64::Engine;
        let value = self.command("GET", "/screenshot", serde_json::Value::Null).await?;
        let png =
            base64::engine::general_purpose::STANDARD.decode(value.as_str().context("screenshot not a string")?)?;
        std::fs::write(path, png)?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends Chromium with the session; chromedriver itself is killed by its guard.
        use std::io::{Read, Write};
        if let Ok(mut stream) = std::net::TcpStream::connect(&self.driver_addr) {
            let request = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                self.session, self.driver_addr
            );
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            if stream.write_all(request.as_bytes()).is_ok() {
                let _ = stream.read_to_end(&mut Vec::new());
            }
        }
    }
}

/// An S3-compatible server (moto, from PyPI) with the bucket `warehouse`; any key pair works.
pub struct S3Server {
    pub endpoint: String,
    _child: ChildGuard,
}

impl S3Server {
    pub async fn start() -> anyhow::Result<Self> {
        let binary =
            find_tool("MOTO_SERVER", "moto_server").context("moto_server not found: pip install 'moto[server]'")?;
        let port = free_port();
        let child = ChildGuard::spawn(
            "moto_server",
            Command::new(binary)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        let addr = format!("127.0.0.1:{port}");
        wait_for_port(&addr, Duration::from_secs(60))?;
        let created = http_request(&addr, "PUT", "/warehouse", b"").await?;
        anyhow::ensure!(
            created.status == 200,
            "creating the bucket: {} {}",
            created.status,
            created.body
        );
        Ok(Self {
            endpoint: format!("http://{addr}"),
            _child: child,
        })
    }
}

/// Runs `tests/pyiceberg_check.py`, an independent reader of the table, and returns what it
/// found (JSON).
pub fn pyiceberg_check(
    catalog_url: &str,
    catalog_name: &str,
    s3_endpoint: &str,
    table: &str,
) -> anyhow::Result<serde_json::Value> {
    pyiceberg_check_with(&[catalog_url, catalog_name, s3_endpoint, table])
}

/// Every row of the table as `(city, temperature)`, read by PyIceberg.
pub fn pyiceberg_readings(
    catalog_url: &str,
    catalog_name: &str,
    s3_endpoint: &str,
    table: &str,
) -> anyhow::Result<Vec<(String, f64)>> {
    let found = pyiceberg_check_with(&[catalog_url, catalog_name, s3_endpoint, table, "--readings"])?;
    Ok(serde_json::from_value(found["readings"].clone())?)
}

/// [`pyiceberg_check`] with the script's arguments as they are, options included.
pub fn pyiceberg_check_with(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    python_json("pyiceberg_check.py", args)
}

/// Another engine writing to the table: PyIceberg runs `operations` on it in order (see
/// `pyiceberg_writer.py`: `append:N:CITY`, `expire-all`).
pub fn pyiceberg_write(
    catalog_url: &str,
    catalog_name: &str,
    s3_endpoint: &str,
    table: &str,
    operations: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let mut args = vec![catalog_url, catalog_name, s3_endpoint, table];
    args.extend(operations);
    python_json("pyiceberg_writer.py", &args)
}

/// Runs one of this crate's Python scripts and parses what it prints as JSON.
fn python_json(script: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let python = find_tool("PYTHON", "python3").context("python3 not found")?;
    let output = Command::new(python).arg(&script).args(args).output()?;
    anyhow::ensure!(
        output.status.success(),
        "{} failed: {}\n{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
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
