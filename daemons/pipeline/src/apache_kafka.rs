//! Apache Kafka in KRaft mode (no ZooKeeper), one node acting as broker and controller, with
//! its log in the state directory so messages outlive the pipeline.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::Context;
use tokio::process::Command;

use crate::{
    host::{free_port, on_path},
    supervisor::Spec,
};

/// The Kafka scripts' directory and their suffix: `.sh` in the Apache tarball and nixpkgs,
/// none in some packages.
pub fn find() -> Option<(PathBuf, &'static str)> {
    ["kafka-server-start.sh", "kafka-server-start"]
        .into_iter()
        .zip([".sh", ""])
        .find_map(|(name, suffix)| Some((on_path(name)?.parent()?.to_path_buf(), suffix)))
}

/// `server.properties` for a single KRaft node listening on 127.0.0.1.
pub fn server_properties(dir: &Path, port: u16, controller_port: u16) -> String {
    format!(
        "# Written by weather-pipeline's `pipeline`; ports are kept across runs.\n\
         process.roles=broker,controller\n\
         node.id=1\n\
         controller.quorum.voters=1@127.0.0.1:{controller_port}\n\
         listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}\n\
         advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
         controller.listener.names=CONTROLLER\n\
         inter.broker.listener.name=PLAINTEXT\n\
         listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
         log.dirs={}\n\
         num.partitions=3\n\
         auto.create.topics.enable=false\n\
         offsets.topic.replication.factor=1\n\
         transaction.state.log.replication.factor=1\n\
         transaction.state.log.min.isr=1\n\
         group.initial.rebalance.delay.ms=0\n",
        dir.join("data").display()
    )
}

/// The broker and controller ports of an existing `server.properties`.
pub fn ports_of(properties: &str) -> Option<(u16, u16)> {
    let listeners = properties.lines().find_map(|l| l.strip_prefix("listeners="))?;
    let port_of = |name: &str| -> Option<u16> {
        listeners
            .split(',')
            .find_map(|l| l.strip_prefix(name))?
            .rsplit_once(':')?
            .1
            .parse()
            .ok()
    };
    Some((port_of("PLAINTEXT://")?, port_of("CONTROLLER://")?))
}

/// Writes the configuration and formats the log directory the first time; returns the broker
/// address and how to run the node.
pub async fn prepare(bin: &Path, suffix: &str, dir: &Path) -> anyhow::Result<(String, Spec)> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("server.properties");
    let existing = std::fs::read_to_string(&config).ok();
    let (port, controller_port) = match existing.as_deref().and_then(ports_of) {
        Some(ports) => ports,
        None => (free_port()?, free_port()?),
    };
    std::fs::write(&config, server_properties(dir, port, controller_port))?;
    let tool = |name: &str| bin.join(format!("{name}{suffix}"));
    if !dir.join("data").join("meta.properties").is_file() {
        let uuid = Command::new(tool("kafka-storage"))
            .arg("random-uuid")
            .stderr(Stdio::inherit())
            .output()
            .await
            .context("kafka-storage random-uuid")?;
        anyhow::ensure!(uuid.status.success(), "kafka-storage random-uuid failed");
        let cluster_id = String::from_utf8(uuid.stdout)?.trim().to_owned();
        let format = Command::new(tool("kafka-storage"))
            .args(["format", "--ignore-formatted", "-t", &cluster_id, "-c"])
            .arg(&config)
            .stdout(Stdio::null())
            .status()
            .await
            .context("kafka-storage format")?;
        anyhow::ensure!(format.success(), "kafka-storage format failed: {format}");
    }
    let brokers = format!("127.0.0.1:{port}");
    let mut spec = Spec::server(
        "kafka",
        tool("kafka-server-start"),
        vec![config.display().to_string()],
        brokers.clone(),
        dir.join("kafka.log"),
    );
    spec.env = vec![
        ("LOG_DIR".to_owned(), dir.join("logs").display().to_string()),
        ("KAFKA_HEAP_OPTS".to_owned(), "-Xmx512m -Xms256m".to_owned()),
    ];
    Ok((brokers, spec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_survive_a_round_trip_through_the_config() {
        let text = server_properties(Path::new("/state/kafka"), 39092, 39093);
        assert_eq!(ports_of(&text), Some((39092, 39093)));
        assert!(text.contains("controller.quorum.voters=1@127.0.0.1:39093\n"));
        assert!(text.contains("log.dirs=/state/kafka/data\n"));
        assert_eq!(ports_of("listeners=PLAINTEXT://:9092\n"), None);
    }
}
