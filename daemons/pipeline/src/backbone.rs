//! The services the daemons stand on: PostgreSQL, a Kafka-protocol broker and object storage.
//! Each is used when given, started from a binary found on this machine otherwise, and (for
//! Kafka) embedded in-process as a last resort.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use rustix::process::{Pid, Signal};
use tokio::process::{Child, Command};

use weather_common::kafka::{DEAD_LETTER_TOPIC, WEATHER_TOPIC};

use crate::{
    host::{free_port, on_path, wait_for_port},
    supervisor::{Spec, Supervised},
};

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
    crate::supervisor::tie_to_pipeline(command, rustix::process::Signal::TERM);
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

/// A private PostgreSQL server in the state directory, supervised like the daemons. Clients
/// authenticate with SCRAM over 127.0.0.1 with a password generated once and kept in
/// `DIR/password` (0600); the socket directory is the pipeline's alone (0700), and only the
/// pipeline's own OS user (peer, mapped to `postgres`) may use it.
pub struct LocalPostgres {
    pub port: u16,
    pub server: Supervised,
    password: String,
    pub password_file: PathBuf,
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
pub fn postgres_user() -> anyhow::Result<Option<(u32, u32)>> {
    if rustix::process::geteuid().is_root() {
        return Ok(Some(postgres_ids()?));
    }
    Ok(None)
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
    /// initdb (first time) and start `postgres` in `dir`, listening on 127.0.0.1 only, with
    /// its log in `dir/postgres.log`.
    pub async fn start(dir: &Path, notify_dir: &Path) -> anyhow::Result<Self> {
        let bin = postgres_bin()
            .context("PostgreSQL not found. Install it (Debian: apt-get install postgresql) or pass --database-url")?;
        let data = dir.join("data");
        std::fs::create_dir_all(dir)?;
        let user = postgres_user()?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
        }
        if !data.join("PG_VERSION").is_file() {
            let mut initdb = Command::new(bin.join("initdb"));
            if let Some((uid, gid)) = user {
                initdb.uid(uid).gid(gid);
            }
            let status = initdb
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth-local=peer", "--auth-host=scram-sha-256"])
                .args(["-E", "UTF8", "--locale=C"])
                .stdout(Stdio::null())
                .status()
                .await?;
            anyhow::ensure!(status.success(), "initdb failed: {status}");
        }
        stop_stale_postmaster(&data).await?;
        let password_file = dir.join("password");
        let password = secret_file(&password_file)?;
        // Written on every start, so a cluster made by an older pipeline (trust) is closed too.
        let os_user = current_user_name()?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "# Written by pipeline on every start.\n\
             local all postgres peer map=pipeline\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
        )?;
        std::fs::write(
            data.join("pg_ident.conf"),
            format!(
                "# Written by pipeline on every start: its OS user is the superuser.\npipeline {os_user} postgres\n"
            ),
        )?;
        let socket_dir = dir.join("socket");
        std::fs::create_dir_all(&socket_dir)?;
        std::fs::set_permissions(&socket_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&socket_dir, Some(uid), Some(gid))?;
            for file in ["pg_hba.conf", "pg_ident.conf"] {
                std::os::unix::fs::chown(data.join(file), Some(uid), Some(gid))?;
            }
        }
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let mut spec = Spec::server(
            "postgresql",
            bin.join("postgres"),
            vec![
                "-D".into(),
                data.display().to_string(),
                "-p".into(),
                port.to_string(),
                "-c".into(),
                "listen_addresses=127.0.0.1".into(),
                "-k".into(),
                socket_dir.display().to_string(),
                "-c".into(),
                "password_encryption=scram-sha-256".into(),
            ],
            addr,
            dir.join("postgres.log"),
        );
        spec.user = user;
        // Fast shutdown: PostgreSQL does not wait for clients to disconnect.
        spec.stop_signal = Signal::INT;
        let server = Supervised::start(spec, notify_dir, Duration::from_secs(60))
            .await
            .context("PostgreSQL did not start")?;
        let postgres = Self {
            port,
            server,
            password,
            password_file,
        };
        // Through the socket as the mapped OS user: sets the password (a cluster made by an
        // older pipeline has none) and creates the databases.
        let superuser = tokio_postgres::Config::new()
            .host_path(&socket_dir)
            .port(port)
            .user("postgres")
            .dbname("postgres")
            .to_owned();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match superuser.connect(tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    client
                        .batch_execute(&format!("ALTER ROLE postgres PASSWORD '{}'", postgres.password))
                        .await?;
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
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("PostgreSQL did not come up; see {}", dir.join("postgres.log").display())
                    });
                }
            }
        }
    }

    /// The URL of database `db`, password included: pass it by environment or file only.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres:{}@127.0.0.1:{}/{db}", self.password, self.port)
    }

    /// `url` as shown to a person: the password replaced by a shell command that reads it.
    pub fn shown(&self, url: &str) -> String {
        url.replace(
            &format!(":{}@", self.password),
            &format!(":$(cat {})@", self.password_file.display()),
        )
    }
}

/// The secret in `path`, made (random, hex, mode 0600) the first time.
pub fn secret_file(path: &Path) -> anyhow::Result<String> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    if let Ok(secret) = std::fs::read_to_string(path) {
        let secret = secret.trim().to_owned();
        anyhow::ensure!(
            !secret.is_empty(),
            "{} is empty: delete it to make a new one",
            path.display()
        );
        return Ok(secret);
    }
    let mut bytes = [0u8; 24];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(file, "{secret}")?;
    Ok(secret)
}

/// The name of the OS user this process runs as.
fn current_user_name() -> anyhow::Result<String> {
    let output = std::process::Command::new("id").arg("-un").output()?;
    anyhow::ensure!(output.status.success(), "id -un failed");
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

/// A postmaster that a killed pipeline left behind still holds the data directory (it stops
/// by itself when its pipeline dies, but may still be finishing). The state directory's lock,
/// which this pipeline holds, shows no other pipeline uses it: ask it to stop and wait.
async fn stop_stale_postmaster(data: &Path) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(data.join("postmaster.pid")) else {
        return Ok(());
    };
    let Some(pid) = text.lines().next().and_then(|l| l.trim().parse().ok()) else {
        return Ok(());
    };
    let running =
        |pid: i32| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.windows(8).any(|w| w == b"postgres"));
    if !running(pid) {
        return Ok(()); // A stale file: PostgreSQL starts over it.
    }
    tracing::warn!(
        pid,
        "a PostgreSQL server from an earlier run still holds {}; stopping it",
        data.display()
    );
    if let Some(process) = Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(process, Signal::INT);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while running(pid) {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "PostgreSQL (pid {pid}) from an earlier run still holds {} after 30 s: stop it with `kill -QUIT {pid}` and start again",
                data.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The nisshi release the pipeline runs, with the SQLite storage that keeps its log on disk.
/// nisshi is tansu's continuation; 0.8 is the first whose ListOffsets reports the true log end,
/// which the consumers' positioning relies on. It needs Rust 1.96 or later.
pub const NISSHI_INSTALL: &str =
    "cargo install nisshi@0.8.1 --locked --no-default-features --features dynostore,libsql (Rust 1.96 or later)";

/// The oldest nisshi whose group coordinator and log end the consumers rely on.
const NISSHI_MIN: (u64, u64) = (0, 8);

/// The file of a log that tansu 0.6 wrote in the broker's directory.
const TANSU_LOG: &str = "tansu.db";

/// Where the Kafka protocol is spoken.
pub enum Kafka {
    External(String),
    /// A broker process with its log in the state directory: Apache Kafka (KRaft) or nisshi
    /// (SQLite), supervised like the daemons.
    Process {
        brokers: String,
        server: Supervised,
    },
    /// librdkafka's mock cluster inside this process: in memory, gone when the pipeline stops.
    Embedded(rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
}

impl Kafka {
    /// The given brokers; else Apache Kafka or nisshi found on `PATH`, started with its log in
    /// `dir`; else, only when `in_memory` allows it, an in-process broker whose `weather`
    /// topics have `partitions` partitions.
    pub async fn start(
        given: Option<String>,
        dir: &Path,
        notify_dir: &Path,
        in_memory: bool,
        partitions: i32,
    ) -> anyhow::Result<Self> {
        if let Some(brokers) = given {
            return Ok(Self::External(brokers));
        }
        if in_memory {
            let cluster = rdkafka::mocking::MockCluster::new(1).context("starting the embedded Kafka broker")?;
            for topic in [WEATHER_TOPIC, DEAD_LETTER_TOPIC] {
                cluster.create_topic(topic, partitions, 1)?;
            }
            tracing::warn!(
                "--in-memory-broker: the Kafka log lives in this process; readings acknowledged but not yet in \
                 Iceberg and PostgreSQL when the pipeline stops are lost"
            );
            return Ok(Self::Embedded(cluster));
        }
        std::fs::create_dir_all(dir)?;
        if let Some((bin, suffix)) = crate::apache_kafka::find() {
            let (brokers, spec) = crate::apache_kafka::prepare(&bin, suffix, dir).await?;
            let server = Supervised::start(spec, notify_dir, Duration::from_secs(120)).await?;
            tracing::info!(%brokers, "Apache Kafka (KRaft) started, its log in {}", dir.display());
            return Ok(Self::Process { brokers, server });
        }
        refuse_tansu_log(dir)?;
        let Some(nisshi) = on_path("nisshi") else {
            bail!(
                "no durable Kafka broker: install nisshi ({NISSHI_INSTALL}), put Apache Kafka's \
                 kafka-server-start.sh on PATH, give --kafka-brokers, or accept losing readings with \
                 --in-memory-broker"
            );
        };
        check_nisshi_version(&nisshi).await?;
        // nisshi loads `.env` from its working directory, or from the nearest parent that has
        // one (the user's project, say): this one, empty, stops that search. Everything it is
        // to use is given as a flag.
        std::fs::write(
            dir.join(".env"),
            "# nisshi reads this file at start; pipeline gives it every setting as a flag.\n",
        )?;
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let brokers = format!("127.0.0.1:{port}");
        let mut spec = Spec::server(
            "nisshi",
            nisshi,
            ["broker", "--listener-url", &url, "--advertised-listener-url", &url]
                // Relative to its working directory, `dir`.
                .into_iter()
                .chain(["--storage-engine", "sqlite://nisshi.db"])
                .map(String::from)
                .collect(),
            brokers.clone(),
            dir.join("nisshi.log"),
        );
        spec.env = vec![("RUST_LOG".to_owned(), "warn".to_owned())];
        spec.dir = Some(dir.to_path_buf());
        let server = Supervised::start(spec, notify_dir, Duration::from_secs(30))
            .await
            .with_context(|| format!("nisshi needs its SQLite storage: {NISSHI_INSTALL}"))?;
        tracing::info!(%brokers, "nisshi started, its log in {}", dir.join("nisshi.db").display());
        Ok(Self::Process { brokers, server })
    }

    pub fn brokers(&self) -> String {
        match self {
            Self::External(brokers) | Self::Process { brokers, .. } => brokers.clone(),
            Self::Embedded(cluster) => cluster.bootstrap_servers(),
        }
    }

    /// The broker process this pipeline supervises, if any.
    pub fn into_server(self) -> Option<Supervised> {
        match self {
            Self::Process { server, .. } => Some(server),
            _ => None,
        }
    }
}

/// Refuses a broker directory that holds a log written by tansu 0.6, the broker earlier
/// versions of the pipeline ran: nisshi would open it and silently drop its records' headers,
/// and the readings in it that the consumers had not stored yet would be lost. Delete this
/// check once no state directory from those versions can be left (none is upgraded in place).
fn refuse_tansu_log(dir: &Path) -> anyhow::Result<()> {
    let old = dir.join(TANSU_LOG);
    if !old.exists() {
        return Ok(());
    }
    let kept = dir.with_file_name(format!(
        "{}.tansu-0.6",
        dir.file_name().map_or("kafka".into(), |n| n.to_string_lossy())
    ));
    bail!(
        "{} holds a Kafka log written by tansu 0.6, which this pipeline's broker (nisshi) must not open: \
         it would drop the records' headers. Readings the logging-server acknowledged may still wait in it \
         for the consumers. To keep them, let the pipeline that wrote it finish them first: with tansu 0.6 \
         on PATH, run that version of the pipeline on this state directory, wait until `pipeline status` \
         shows no lag, and stop it with Ctrl-C (it waits for the consumers). Then set the old log aside and \
         start again: mv {} {}",
        old.display(),
        dir.display(),
        kept.display(),
    )
}

/// Refuses a nisshi older than [`NISSHI_MIN`], whose log end and group coordinator the
/// consumers cannot rely on.
async fn check_nisshi_version(nisshi: &Path) -> anyhow::Result<()> {
    let output = Command::new(nisshi)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} --version", nisshi.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = parse_version(&text)
        .with_context(|| format!("{} --version printed no version ({text:?})", nisshi.display()))?;
    anyhow::ensure!(
        version >= NISSHI_MIN,
        "{} is nisshi {}.{}; the pipeline needs {}.{} or later: {NISSHI_INSTALL}",
        nisshi.display(),
        version.0,
        version.1,
        NISSHI_MIN.0,
        NISSHI_MIN.1,
    );
    Ok(())
}

/// `(major, minor)` of the first `N.N` in `text` (`nisshi 0.8.1` gives `(0, 8)`).
fn parse_version(text: &str) -> Option<(u64, u64)> {
    text.split_whitespace().find_map(|word| {
        let mut parts = word.split('.');
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_what_nisshi_prints() {
        assert_eq!(parse_version("nisshi 0.8.1\n"), Some((0, 8)));
        assert_eq!(parse_version("nisshi 0.10.0-rc.1"), Some((0, 10)));
        assert_eq!(parse_version("nisshi"), None);
        assert!(parse_version("nisshi 0.7.0").is_some_and(|v| v < NISSHI_MIN));
        assert!(parse_version("nisshi 0.10.0").is_some_and(|v| v >= NISSHI_MIN));
    }

    #[test]
    fn a_log_written_by_tansu_is_refused_with_what_to_do() {
        let state = tempfile::tempdir().expect("dir");
        let dir = state.path().join("kafka");
        std::fs::create_dir_all(&dir).expect("kafka dir");
        refuse_tansu_log(&dir).expect("no tansu log: nothing to refuse");
        std::fs::write(dir.join("nisshi.db"), "").expect("nisshi log");
        refuse_tansu_log(&dir).expect("nisshi's own log");
        std::fs::write(dir.join(TANSU_LOG), "").expect("tansu log");
        let refused = format!("{:#}", refuse_tansu_log(&dir).expect_err("refused"));
        assert!(refused.contains("tansu 0.6"), "{refused}");
        assert!(
            refused.contains(&format!("mv {} {}.tansu-0.6", dir.display(), dir.display())),
            "{refused}"
        );
    }
}
