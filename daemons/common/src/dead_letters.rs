//! The dead-letter topic, written exactly once per consumer.
//!
//! A record a consumer cannot use is produced to the dead-letter topic, and the broker's
//! acknowledgement comes before the checkpoint past it is committed. A crash between the two
//! reads the record again after the restart; without more, it would be dead-lettered twice.
//! So each partition's dead letters go to one dead-letter partition (`partition % n`), every
//! commit stores with each checkpoint the dead-letter offset from which this partition's later
//! letters can be ([`Checkpoint::dead_letters_from`](crate::consumer::Checkpoint::dead_letters_from)), and a claim reads that short tail back
//! ([`DeadLetters::sent_since`]) to learn which records past the checkpoint already have
//! their letter.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    message::{Header, Headers, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};

use crate::kafka::{KafkaArgs, partition_count};

/// Sends records a consumer cannot use to the dead-letter topic, unchanged, with headers saying
/// why and where they came from: `error`, `source` (the daemon), `original.topic`,
/// `original.partition`, `original.offset`.
pub struct DeadLetters {
    producer: FutureProducer,
    /// A reader is made for each read-back: one kept idle between claims came back from a
    /// broker's restart unable to answer for as long as its timeout (10 s), stalling the claim.
    reader: ClientConfig,
    topic: String,
    source: &'static str,
    /// Partitions of the dead-letter topic.
    partitions: i32,
}

/// What [`DeadLetters::sent_since`] found of one source partition.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sent {
    /// Original offsets at or past the checkpoint that this source already dead-lettered.
    pub offsets: BTreeSet<i64>,
    /// The dead-letter partition's end when read: where this partition's next letters go.
    pub end: i64,
}

impl DeadLetters {
    /// Blocks until the broker says how many partitions the dead-letter topic has.
    pub fn new(kafka: &KafkaArgs, topic: &str, source: &'static str) -> anyhow::Result<Self> {
        let producer = kafka
            .client_config()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "30000")
            .create()?;
        // Assigned, never subscribed: the group id only satisfies librdkafka.
        let mut reader = kafka.client_config();
        reader
            .set("group.id", "weather-dead-letters")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        let partitions = partition_count(&reader.create::<BaseConsumer>()?, topic)?;
        anyhow::ensure!(partitions > 0, "the dead-letter topic {topic} does not exist");
        Ok(Self {
            producer,
            reader,
            topic: topic.to_owned(),
            source,
            partitions,
        })
    }

    /// The dead-letter partition that `partition`'s letters go to.
    fn partition_of(&self, partition: i32) -> i32 {
        partition.rem_euclid(self.partitions)
    }

    /// Produces the dead letter and waits for the broker's acknowledgement, so the caller may
    /// commit past the original record afterwards. Returns the offset after the letter.
    pub async fn send<M: Message>(&self, message: &M, error: &str) -> anyhow::Result<i64> {
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
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic)
            .partition(self.partition_of(message.partition()))
            .headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        let delivery = self
            .producer
            .send(record, rdkafka::util::Timeout::Never)
            .await
            .map_err(|(e, _)| anyhow::anyhow!("dead-lettering {}/{partition}@{offset}: {e}", message.topic()))?;
        Ok(delivery.offset + 1)
    }

    /// The offsets of `topic`'s `partition` at or past `next_offset` that this source
    /// dead-lettered, read from the dead-letter partition's offset `from` to its end. `from`
    /// unknown (state written before dead-letter offsets were stored, or a partition never
    /// committed), or past the end (the topic was created again): read from its beginning.
    /// Blocks (broker round trips); reads only letters sent since the last commit.
    pub fn sent_since(&self, topic: &str, partition: i32, next_offset: i64, from: Option<i64>) -> anyhow::Result<Sent> {
        let timeout = Duration::from_secs(10);
        let letters = self.partition_of(partition);
        let reader: BaseConsumer = self.reader.create()?;
        let (low, end) = reader.fetch_watermarks(&self.topic, letters, timeout)?;
        let start = from.filter(|f| *f <= end).unwrap_or(low).max(low);
        let mut sent = Sent {
            offsets: BTreeSet::new(),
            end,
        };
        if start >= end {
            return Ok(sent);
        }
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&self.topic, letters, Offset::Offset(start))?;
        reader.assign(&assignment)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut next = start;
        while next < end {
            anyhow::ensure!(
                Instant::now() < deadline,
                "reading back {}/{letters} from {start} to {end}: stopped at {next}",
                self.topic
            );
            let message = match reader.poll(Duration::from_millis(100)) {
                None => continue,
                Some(message) => message?,
            };
            next = message.offset() + 1;
            if let Some(original) = original_of(&message, self.source, topic, partition) {
                if original >= next_offset {
                    sent.offsets.insert(original);
                }
            }
        }
        Ok(sent)
    }
}

/// The original offset a dead letter names, when `source` sent it for `topic`/`partition`.
fn original_of<M: Message>(letter: &M, source: &str, topic: &str, partition: i32) -> Option<i64> {
    let headers = letter.headers()?;
    let header = |key: &str| {
        headers
            .iter()
            .find(|h| h.key == key)
            .and_then(|h| std::str::from_utf8(h.value?).ok())
    };
    (header("source")? == source
        && header("original.topic")? == topic
        && header("original.partition")?.parse::<i32>().ok()? == partition)
        .then(|| header("original.offset")?.parse().ok())?
}

#[cfg(test)]
mod tests {
    use rdkafka::{
        Timestamp,
        message::{Header, OwnedHeaders, OwnedMessage},
    };

    use super::*;

    fn letter(source: &str, topic: &str, partition: &str, offset: &str) -> OwnedMessage {
        let headers = [
            ("source", source),
            ("original.topic", topic),
            ("original.partition", partition),
            ("original.offset", offset),
        ]
        .into_iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        });
        OwnedMessage::new(
            None,
            None,
            "weather.dlq".into(),
            Timestamp::NotAvailable,
            0,
            7,
            Some(headers),
        )
    }

    #[test]
    fn a_letter_counts_only_for_its_source_topic_and_partition() {
        for (source, topic, partition, offset, found) in [
            ("sink", "weather", "2", "41", Some(41)),
            ("aggregator", "weather", "2", "41", None),
            ("sink", "other", "2", "41", None),
            ("sink", "weather", "1", "41", None),
            ("sink", "weather", "2", "x", None),
        ] {
            let letter = letter(source, topic, partition, offset);
            assert_eq!(
                original_of(&letter, "sink", "weather", 2),
                found,
                "{source} {topic} {partition} {offset}"
            );
        }
        let bare = OwnedMessage::new(None, None, "weather.dlq".into(), Timestamp::NotAvailable, 0, 7, None);
        assert_eq!(original_of(&bare, "sink", "weather", 2), None);
    }
}
