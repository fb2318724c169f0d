//! A private PostgreSQL cluster per test.

use super::*;

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
        let status = self.pg_ctl_stop("fast").status()?;
        anyhow::ensure!(status.success(), "pg_ctl stop failed: {status}");
        Ok(())
    }

    /// `pg_ctl stop` in shutdown `mode`, waiting for it.
    fn pg_ctl_stop(&self, mode: &str) -> Command {
        let mut command = self.command(&self.bin.join("pg_ctl"));
        command
            .args(["-D"])
            .arg(&self.data)
            .args(["-m", mode, "-w", "stop"])
            .stdout(Stdio::null());
        command
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
        let _ = self.pg_ctl_stop("immediate").stderr(Stdio::null()).status();
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
    weather_common::postgres_install::debian_bin()
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
