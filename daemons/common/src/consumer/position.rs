//! Where to read each claimed partition from: the checkpoint when it belongs to the log, else
//! the log's beginning; and waiting for the topic's partitions.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer, ConsumerContext},
    error::RDKafkaErrorCode,
};
use tokio_util::sync::CancellationToken;

use crate::{
    kafka::{KafkaArgs, partition_count},
    runtime::Backoff,
};

use super::record::record_id;
use super::store::{Checkpoint, Checkpoints};

/// Where to read each partition from, and which partitions start over on a new log.
#[derive(Debug)]
pub struct Positioned {
    pub start: Checkpoints,
    /// `(partition, first offset)` of partitions whose log is not the checkpoint's.
    pub restarted: Vec<(i32, i64)>,
}

/// Seeks `partitions` of `topic` (assigned to `consumer`), each to its checkpoint when the
/// checkpoint belongs to this log, else to the log's beginning. Blocks (broker round trips).
///
/// The log is the checkpoint's when the record before the checkpoint's offset is the very
/// record the checkpoint names. It is another log when the partition ends before that offset
/// (logs do not shrink) or holds a different record there. When the record is gone (deleted by
/// retention) while the log goes on past it, the offset is trusted.
pub fn position<C: Consumer<X>, X: ConsumerContext>(
    kafka: &KafkaArgs,
    consumer: &C,
    topic: &str,
    partitions: &[i32],
    committed: &Checkpoints,
) -> anyhow::Result<Positioned> {
    let timeout = Duration::from_secs(10);
    let mut start = Checkpoints::new();
    let mut restarted = Vec::new();
    let mut reasons = Vec::new();
    // The partitions whose record before the checkpoint is to be read back: `(partition,
    // checkpoint, log start)`.
    let mut to_locate = Vec::new();
    for &partition in partitions {
        let Some(checkpoint) = committed.get(&partition).filter(|c| c.next_offset > 0) else {
            let from_start = committed.get(&partition).cloned();
            start.insert(partition, from_start.unwrap_or_else(|| Checkpoint::start(0)));
            continue;
        };
        let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
        let next = checkpoint.next_offset;
        if next > high {
            reasons.push(format!(
                "partition {partition} ends at {high}, before the stored offset {next}"
            ));
            restarted.push((partition, low));
        } else if next <= low {
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
            start.insert(partition, checkpoint.clone());
        } else {
            to_locate.push((partition, checkpoint, low));
        }
    }
    // Each read-back waits on the broker; a rebalance hands several partitions over at once.
    let located: Vec<anyhow::Result<Option<String>>> = std::thread::scope(|scope| {
        let readers: Vec<_> = to_locate
            .iter()
            .map(|&(partition, checkpoint, _)| {
                scope.spawn(move || locate(kafka, topic, partition, checkpoint.next_offset - 1))
            })
            .collect();
        readers
            .into_iter()
            .map(|reader| {
                reader
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("reading back a checkpoint's record panicked")))
            })
            .collect()
    });
    for ((partition, checkpoint, low), located) in to_locate.into_iter().zip(located) {
        match (located?, &checkpoint.last_record) {
            (Some(id), Some(expected)) if &id != expected => {
                reasons.push(format!(
                    "partition {partition} holds another record at offset {} ({id}, stored {expected})",
                    checkpoint.next_offset - 1
                ));
                restarted.push((partition, low));
            }
            (None, _) => {
                tracing::debug!(
                    partition,
                    offset = checkpoint.next_offset - 1,
                    "record gone; trusting the stored offset"
                );
                start.insert(partition, checkpoint.clone());
            }
            _ => {
                start.insert(partition, checkpoint.clone());
            }
        }
    }
    for &(partition, low) in &restarted {
        start.insert(partition, Checkpoint::start(low));
    }
    if !reasons.is_empty() {
        tracing::warn!(
            topic,
            "the topic holds another log than the stored offsets belong to (the broker lost its data, or the topic \
             was created again); reading these partitions from their beginning: {}",
            reasons.join("; ")
        );
    }
    let mut seek = TopicPartitionList::new();
    for (&partition, checkpoint) in &start {
        seek.add_partition_offset(topic, partition, Offset::Offset(checkpoint.next_offset))?;
    }
    seek_assigned(consumer, seek, timeout)?;
    Ok(Positioned { start, restarted })
}

/// Seeks the partitions of `list` to its offsets. A seek, unlike a new assignment, waits for no
/// group commit in flight, and librdkafka drops what was fetched before it. A partition
/// assigned a moment ago may not have started its fetcher yet ("erroneous state"): retried.
pub(super) fn seek_assigned<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    mut list: TopicPartitionList,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut again = TopicPartitionList::new();
        for element in consumer.seek_partitions(list, timeout)?.elements() {
            match element.error() {
                Ok(()) => {}
                Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::State) && Instant::now() < deadline => {
                    again.add_partition_offset(element.topic(), element.partition(), element.offset())?;
                }
                Err(e) => {
                    return Err(anyhow::Error::from(e).context(format!("seeking partition {}", element.partition())));
                }
            }
        }
        if again.count() == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
        list = again;
    }
}

/// The [`record_id`] of the record at `offset` of `partition`, which lies below the log's end;
/// `None` when the log holds no record there (a gap left by retention or compaction). Reads it
/// with a consumer of its own: a fetch from inside a batch returns the whole batch, and
/// librdkafka drops the records before the offset asked for.
pub(super) fn locate(kafka: &KafkaArgs, topic: &str, partition: i32, offset: i64) -> anyhow::Result<Option<String>> {
    let reader: BaseConsumer = kafka
        .client_config()
        .set("group.id", "weather-log-identity")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "error")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    reader.assign(&assignment)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let message = match reader.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "reading back the checkpoint's record");
                continue;
            }
        };
        if message.partition() != partition || message.offset() < offset {
            continue;
        }
        return Ok((message.offset() == offset).then(|| record_id(&message)));
    }
    anyhow::bail!("could not read offset {offset} of partition {partition} of {topic} within 30 s")
}

/// Partition count of `topic`, once the broker answers and the topic exists (the topics in
/// `create` are created when missing). Retries with backoff; `None` on shutdown.
pub async fn wait_for_partitions<C, X>(
    kafka: &KafkaArgs,
    consumer: &Arc<C>,
    topic: &str,
    create: &[&str],
    shutdown: &CancellationToken,
) -> Option<i32>
where
    C: Consumer<X> + Send + Sync + 'static,
    X: ConsumerContext + 'static,
{
    let mut backoff = Backoff::default();
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
