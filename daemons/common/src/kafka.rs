//! Kafka settings shared by every daemon that talks to the broker.

use std::{collections::BTreeMap, time::Duration};

use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::{Client, ClientContext, DefaultClientContext},
    consumer::{Consumer, ConsumerContext},
    error::RDKafkaErrorCode,
};

/// Topic the readings flow through.
pub const WEATHER_TOPIC: &str = "weather";
/// Topic the consumers send records they cannot parse to.
pub const DEAD_LETTER_TOPIC: &str = "weather.dlq";

#[derive(clap::Args, Debug, Clone)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "localhost:9092")]
    pub kafka_brokers: String,

    /// Extra librdkafka property, KEY=VALUE; repeatable (env: comma-separated).
    #[arg(long = "kafka-option", env = "KAFKA_OPTIONS", value_delimiter = ',', value_parser = parse_key_value)]
    pub kafka_options: Vec<(String, String)>,

    /// Partitions for topics this daemon creates when they are missing.
    #[arg(long, env = "KAFKA_TOPIC_PARTITIONS", default_value_t = 3)]
    pub topic_partitions: i32,

    /// Replication factor for topics this daemon creates.
    #[arg(long, env = "KAFKA_TOPIC_REPLICATION", default_value_t = 1)]
    pub topic_replication: i32,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

impl KafkaArgs {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            kafka_brokers: brokers.into(),
            kafka_options: Vec::new(),
            topic_partitions: 3,
            topic_replication: 1,
        }
    }

    /// Base client configuration: brokers, then the operator's overrides.
    pub fn client_config(&self) -> ClientConfig {
        self.client_config_with(&[])
    }

    /// Base client configuration with a daemon's own `defaults`, which the operator's
    /// `--kafka-option`s override.
    pub fn client_config_with(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.kafka_brokers);
        // librdkafka backs off up to 10 s between reconnects; a broker that is back should be
        // used within a second (the logging-server answers 503 until then).
        config.set("reconnect.backoff.max.ms", "1000");
        // librdkafka waits 60 s by default for a request's answer before it drops the connection.
        // A fetch left unanswered across a broker's restart held every partition of a consumer
        // that long (one fetch in flight per broker); a fetch is a long poll of
        // `fetch.wait.max.ms` (500 ms) on top of this.
        config.set("socket.timeout.ms", "10000");
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        for (key, value) in &self.kafka_options {
            config.set(key, value);
        }
        config
    }

    /// Creates the topics that do not exist yet (brokers need not auto-create them).
    pub async fn ensure_topics(&self, topics: &[&str]) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create()?;
        let admin = std::sync::Arc::new(admin);
        let names: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        // Ask first: some brokers (librdkafka's mock among them) do not implement CreateTopics.
        let missing = tokio::task::spawn_blocking({
            let admin = admin.clone();
            move || -> anyhow::Result<Vec<String>> {
                let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(5))?;
                Ok(names
                    .into_iter()
                    .filter(|name| {
                        !metadata
                            .topics()
                            .iter()
                            .any(|t| t.name() == name && t.error().is_none())
                    })
                    .collect())
            }
        })
        .await??;
        if missing.is_empty() {
            return Ok(());
        }
        let new_topics: Vec<_> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    self.topic_partitions,
                    TopicReplication::Fixed(self.topic_replication),
                )
            })
            .collect();
        let timeout = Duration::from_secs(10);
        let options = AdminOptions::new()
            .operation_timeout(Some(timeout))
            .request_timeout(Some(timeout));
        let results = tokio::time::timeout(timeout * 2, admin.create_topics(&new_topics, &options))
            .await
            .map_err(|_| anyhow::anyhow!("creating topics {missing:?}: no answer from the broker"))??;
        for result in results {
            match result {
                Ok(topic) => tracing::info!(topic, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => anyhow::bail!("creating topic {topic}: {code}"),
            }
        }
        Ok(())
    }
}

/// The offsets consumer group `group_id` committed for every partition of `topic`: the next
/// offset to read of each. Fails when a partition has none. Blocks for at most about 15 s.
pub fn group_offsets(kafka: &KafkaArgs, group_id: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    use rdkafka::{Offset, TopicPartitionList, consumer::BaseConsumer};
    // Not subscribed: it only asks the group coordinator, and does not join the group.
    let consumer: BaseConsumer = kafka.client_config().set("group.id", group_id).create()?;
    let partitions = partition_count(&consumer, topic)?;
    anyhow::ensure!(partitions > 0, "topic {topic} does not exist");
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, partition);
    }
    let committed = consumer.committed_offsets(list, Duration::from_secs(10))?;
    (0..partitions)
        .map(
            |partition| match committed.find_partition(topic, partition).map(|e| e.offset()) {
                Some(Offset::Offset(offset)) => Ok((partition, offset)),
                _ => anyhow::bail!("consumer group {group_id} has no committed offset for {topic}/{partition}"),
            },
        )
        .collect()
}

/// Partitions of `topic` (0 when it does not exist). Blocks for up to 5 s.
pub fn partition_count<C: Consumer<X>, X: ConsumerContext>(consumer: &C, topic: &str) -> anyhow::Result<i32> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map_or(0, |t| t.partitions().len() as i32))
}

/// Whether the broker answers and knows `topic`. Blocks for at most `timeout`.
pub fn topic_available<C: ClientContext>(client: &Client<C>, topic: &str, timeout: Duration) -> Result<(), String> {
    let metadata = client
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| format!("broker unreachable: {e}"))?;
    match metadata.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
        Some(t) => Err(format!("topic {topic}: {:?}", t.error())),
        None => Err(format!("topic {topic} does not exist")),
    }
}
