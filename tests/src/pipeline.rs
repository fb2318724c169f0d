//! `pipeline` as a person runs it (its own PostgreSQL, the durable broker found on `PATH` with
//! its log on disk), for the tests that drive the whole stack through it; and the check that a
//! run stored every acknowledged reading exactly once.

use std::{
    collections::{BTreeMap, HashSet},
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    ChildGuard, connect, descendants, free_port,
    load::{Key, Tally, per_city},
    pyiceberg_readings, workspace_binary,
};

/// The ports of the servers a person opens.
pub struct Ports {
    pub logging: u16,
    pub dashboard: u16,
    pub query: u16,
}

impl Ports {
    pub fn free() -> Self {
        Self {
            logging: free_port(),
            dashboard: free_port(),
            query: free_port(),
        }
    }

    pub fn logging(&self) -> String {
        format!("127.0.0.1:{}", self.logging)
    }
}

/// `pipeline` on `state` and `ports` with its defaults, in a process group of its own as a
/// shell runs a job, with `args` added; the caller adds what else it wants and spawns it.
pub fn command(state: &Path, ports: &Ports, args: &[&str]) -> Command {
    command_of(&workspace_binary("pipeline"), state, ports, args)
}

/// [`command`] with the `pipeline` binary at `program` (it runs the daemons it finds beside it).
pub fn command_of(program: &Path, state: &Path, ports: &Ports, args: &[&str]) -> Command {
    let mut command = Command::new(program);
    command
        .arg("--state-dir")
        .arg(state)
        .args(["--logging-port", &ports.logging.to_string()])
        .args(["--dashboard-port", &ports.dashboard.to_string()])
        .args(["--query-port", &ports.query.to_string()])
        .args(args)
        .env_remove("KAFKA_BROKERS")
        .env_remove("DATABASE_URL")
        .process_group(0);
    command
}

/// [`command`], started and waited for until it says it is ready (it starts every component
/// first).
pub fn start(state: &Path, ports: &Ports, args: &[&str]) -> ChildGuard {
    ChildGuard::spawn_ready(
        "pipeline",
        command(state, ports, args).env("RUST_LOG", "warn"),
        Duration::from_secs(300),
    )
    .expect("pipeline ready")
}

/// What a run wrote to `STATE/state.json`.
pub struct State {
    pub database_url: String,
    pub catalog_url: String,
    /// Each component's name and admin URL.
    pub components: Vec<(String, String)>,
}

impl State {
    pub fn read(state: &Path) -> Self {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(state.join("state.json")).expect("state.json")).expect("json");
        let database_url = json["database_url"].as_str().expect("database_url").to_owned();
        let components = json["components"]
            .as_array()
            .expect("components")
            .iter()
            .map(|c| {
                let name = c[0].as_str().expect("name").to_owned();
                (name, c[1].as_str().expect("url").to_owned())
            })
            .collect();
        Self {
            catalog_url: database_url.replace("/weather", "/iceberg"),
            database_url,
            components,
        }
    }

    /// The admin address (`host:port`) of component `name`.
    pub fn admin(&self, name: &str) -> String {
        self.components
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, url)| url.trim_start_matches("http://").to_owned())
            .unwrap_or_else(|| panic!("no component {name} in state.json"))
    }
}

/// The pid of the process below `pipeline` that runs the binary `daemon`.
pub fn daemon_pid(pipeline: &ChildGuard, daemon: &str) -> Option<u32> {
    descendants(pipeline.child.id()).into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
            let program = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            Path::new(std::ffi::OsStr::from_bytes(program))
                .file_name()
                .is_some_and(|name| name == daemon)
        })
    })
}

/// What a run stored, against what its loads were told.
pub struct Settled {
    pub tally: Tally,
    /// Readings per city in the PostgreSQL windows.
    pub windows: BTreeMap<String, i64>,
    /// Readings per city in Iceberg.
    pub iceberg: BTreeMap<String, i64>,
}

impl Settled {
    /// Every acknowledged reading once in Iceberg, nothing nobody sent, and the windows count
    /// what Iceberg holds.
    pub fn assert_exact(&self) {
        let tally = &self.tally;
        assert_eq!(tally.lost, 0, "acknowledged readings missing from Iceberg");
        assert_eq!(tally.duplicates, 0, "readings twice in Iceberg");
        assert!(tally.unknown.is_empty(), "rows nobody sent: {:?}", tally.unknown);
        assert_eq!(
            self.windows, self.iceberg,
            "PostgreSQL windows count what Iceberg holds"
        );
    }

    /// Rows in Iceberg.
    pub fn rows(&self) -> i64 {
        self.iceberg.values().sum()
    }
}

/// Ctrl-C at the terminal (SIGINT to `pipeline`'s process group): it must exit cleanly.
pub fn ctrl_c(pipeline: &mut ChildGuard) {
    pipeline.signal_group(libc::SIGINT);
    let status = pipeline.wait(Duration::from_secs(120)).expect("pipeline exits");
    assert!(status.success(), "clean shutdown: {status:?}");
}

/// Waits up to `timeout` for Iceberg (read by PyIceberg) to hold every acknowledged reading and
/// the PostgreSQL windows to count what Iceberg holds; returns what it saw last.
pub async fn settle(
    state: &State,
    acknowledged: &HashSet<Key>,
    unacknowledged: &HashSet<Key>,
    timeout: Duration,
) -> Settled {
    let client = connect(&state.database_url).await.expect("connect");
    let deadline = Instant::now() + timeout;
    loop {
        let stored: Vec<Key> = pyiceberg_readings(&state.catalog_url, "weather", "", "default.weather")
            .expect("PyIceberg reads the table")
            .into_iter()
            .map(|(city, temperature)| (city, (temperature * 100.0).round() as i64))
            .collect();
        let windows: BTreeMap<String, i64> = client
            .query("SELECT city, sum(record_count)::int8 FROM weather GROUP BY city", &[])
            .await
            .expect("windows")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let tally = Tally::of(&stored, acknowledged, unacknowledged);
        let iceberg = per_city(&stored);
        if (tally.lost == 0 && windows == iceberg) || Instant::now() > deadline {
            return Settled {
                tally,
                windows,
                iceberg,
            };
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
