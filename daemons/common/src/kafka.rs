//! Kafka settings shared by every daemon that talks to the broker.

use std::time::Duration;

use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::{Client, ClientContext, DefaultClientContext},
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
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.kafka_brokers);
        // librdkafka backs off up to 10 s between reconnects; a broker that is back should be
        // used within a second (the logging-server answers 503 until then).
        config.set("reconnect.backoff.max.ms", "1000");
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

/// Sends records a consumer cannot use to [`DEAD_LETTER_TOPIC`], unchanged, with headers saying
/// why and where they came from: `error`, `source` (the daemon), `original.topic`,
/// `original.partition`, `original.offset`.
pub struct DeadLetters {
    producer: rdkafka::producer::FutureProducer,
    topic: String,
    source: &'static str,
}

impl DeadLetters {
    pub fn new(kafka: &KafkaArgs, topic: &str, source: &'static str) -> anyhow::Result<Self> {
        let producer = kafka
            .client_config()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
            source,
        })
    }

    /// Produces the dead letter and waits for the broker's acknowledgement, so the caller may
    /// commit past the original record afterwards.
    pub async fn send<M: rdkafka::Message>(&self, message: &M, error: &str) -> anyhow::Result<()> {
        use rdkafka::message::{Header, OwnedHeaders};
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "error",
                value: Some(error),
            })
            .insert(Header {
                key: "source",
                value: Some(self.source),
            })
            .insert(Header {
                key: "original.topic",
                value: Some(message.topic()),
            })
            .insert(Header {
                key: "original.partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "original.offset",
                value: Some(&offset),
            });
        let mut record = rdkafka::producer::FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        self.producer
            .send(record, rdkafka::util::Timeout::Never)
            .await
            .map_err(|(e, _)| anyhow::anyhow!("dead-lettering {}/{partition}@{offset}: {e}", message.topic()))?;
        Ok(())
    }
}

/// Partition count of `topic`, once the broker answers and the topic exists (the topics in
/// `create` are created when missing). Retries with backoff; `None` on shutdown.
pub async fn wait_for_partitions<C>(
    kafka: &KafkaArgs,
    consumer: &std::sync::Arc<C>,
    topic: &str,
    create: &[&str],
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<i32>
where
    C: rdkafka::consumer::Consumer + Send + Sync + 'static,
{
    let mut backoff = crate::runtime::Backoff::default();
    loop {
        if let Err(e) = kafka.ensure_topics(create).await {
            tracing::debug!(error = %e, "could not create the topics");
        }
        let (consumer, name) = (consumer.clone(), topic.to_owned());
        let found = tokio::task::spawn_blocking(move || partition_count(consumer.as_ref(), &name)).await;
        match found {
            Ok(Ok(n)) if n > 0 => return Some(n),
            Ok(Ok(_)) => tracing::warn!(topic, "waiting for the topic to exist"),
            Ok(Err(e)) => tracing::warn!(error = %e, "waiting for the Kafka broker"),
            Err(e) => tracing::warn!(error = %e, "metadata task failed"),
        }
        if !backoff.wait(shutdown).await {
            return None;
        }
    }
}

/// Partitions of `topic` (0 when it does not exist). Blocks for up to 5 s.
pub fn partition_count<C: rdkafka::consumer::Consumer>(consumer: &C, topic: &str) -> anyhow::Result<i32> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map_or(0, |t| t.partitions().len() as i32))
}

/// Assigns partitions `0..partitions` of `topic`, each at `next_offset(partition)`, or at the
/// beginning when it has none: the consumer reads exactly from what the sink committed.
///
/// A stored offset past the end of the log means the topic is not the one the offsets were
/// stored for (recreated, or an in-memory broker restarted): that partition is read from its
/// beginning instead, and is returned with its start offset so the caller moves its own
/// position there too (otherwise it would skip the new records as already seen).
pub fn assign_at<C: rdkafka::consumer::Consumer>(
    consumer: &C,
    topic: &str,
    partitions: i32,
    next_offset: impl Fn(i32) -> Option<i64>,
) -> anyhow::Result<Vec<(i32, i64)>> {
    use rdkafka::{Offset, TopicPartitionList};
    let mut assignment = TopicPartitionList::new();
    let mut restarted = Vec::new();
    for partition in 0..partitions {
        let offset = match next_offset(partition) {
            Some(next) => {
                let (low, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
                if next > high {
                    tracing::warn!(
                        topic,
                        partition,
                        stored = next,
                        log_end = high,
                        "stored offset is past the end of the log: the topic was recreated or the broker lost \
                         its data; reading this partition from its beginning"
                    );
                    restarted.push((partition, low));
                    Offset::Offset(low)
                } else {
                    if next < low {
                        tracing::error!(
                            topic,
                            partition,
                            stored = next,
                            log_start = low,
                            lost = low - next,
                            "records were deleted by retention before they were consumed"
                        );
                    }
                    Offset::Offset(next)
                }
            }
            None => Offset::Beginning,
        };
        assignment.add_partition_offset(topic, partition, offset)?;
    }
    let current = consumer.assignment()?;
    let unchanged =
        current.count() == partitions as usize && (0..partitions).all(|p| current.find_partition(topic, p).is_some());
    if unchanged {
        // Resuming after a failure: a new assignment would not start fetching before every
        // group commit in flight (for monitoring only) is answered, which a stuck coordinator
        // stretches to the request timeout. A seek does not wait for them, and librdkafka drops
        // messages fetched before it.
        for element in consumer
            .seek_partitions(assignment, Duration::from_secs(10))?
            .elements()
        {
            element.error()?;
        }
    } else {
        consumer.assign(&assignment)?;
    }
    Ok(restarted)
}

/// Commits `offsets` (partition → next offset) to the consumer group, for lag monitoring
/// only: the sink's own store holds the position that counts.
pub fn commit_for_monitoring<C: rdkafka::consumer::Consumer>(
    consumer: &C,
    topic: &str,
    offsets: impl IntoIterator<Item = (i32, i64)>,
) {
    use rdkafka::{Offset, TopicPartitionList, consumer::CommitMode};
    let mut list = TopicPartitionList::new();
    for (partition, next_offset) in offsets {
        if list
            .add_partition_offset(topic, partition, Offset::Offset(next_offset))
            .is_err()
        {
            return;
        }
    }
    if list.count() > 0 {
        if let Err(e) = consumer.commit(&list, CommitMode::Async) {
            tracing::debug!(error = %e, "group offset commit failed");
        }
    }
}

/// Measures lag (high watermark − next offset) per partition off the consume path, as it asks
/// the broker, and hands each to `report`.
pub fn spawn_lag_update<C>(
    consumer: std::sync::Arc<C>,
    topic: String,
    positions: Vec<(i32, i64)>,
    report: impl Fn(i32, i64) + Send + 'static,
) where
    C: rdkafka::consumer::Consumer + Send + Sync + 'static,
{
    tokio::task::spawn_blocking(move || {
        for (partition, next_offset) in positions {
            if let Ok((_, high)) = consumer.fetch_watermarks(&topic, partition, Duration::from_secs(1)) {
                report(partition, (high - next_offset).max(0));
            }
        }
    });
}

impl KafkaArgs {
    /// A consumer for sinks that keep their own offsets: no auto-commit, no offset store, and
    /// the beginning of a partition when they have no offset for it yet.
    pub fn sink_consumer(&self, group_id: &str) -> anyhow::Result<std::sync::Arc<rdkafka::consumer::StreamConsumer>> {
        let consumer = self
            .client_config()
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        Ok(std::sync::Arc::new(consumer))
    }
}

/// The reading a record carries, or why it carries none.
pub fn reading_of<M: rdkafka::Message>(message: &M) -> Result<crate::WeatherReading, crate::ReadingError> {
    match message.payload() {
        Some(payload) => crate::WeatherReading::from_json(payload),
        None => Err(crate::ReadingError::Json("empty record value".into())),
    }
}
