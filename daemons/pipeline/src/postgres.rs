//! A private PostgreSQL server in the state directory, for the window table and the Iceberg
//! catalog, when the pipeline is given no database.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use rustix::process::{Pid, Signal};
use tokio::process::Command;

use crate::{
    host::{free_port, on_path},
    supervisor::{Spec, Supervised},
};

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
    weather_common::postgres_install::debian_bin()
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
