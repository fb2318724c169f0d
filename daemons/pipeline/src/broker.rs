//! The Kafka-protocol broker: given, nisshi (or Apache Kafka) found on this machine with its
//! log in the state directory, or embedded in-process as a last resort.

use std::{path::Path, process::Stdio, time::Duration};

use anyhow::{Context, bail};
use tokio::process::Command;

use weather_common::kafka::{DEAD_LETTER_TOPIC, WEATHER_TOPIC};

use crate::{
    host::{free_port, on_path},
    supervisor::{Spec, Supervised},
};

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
