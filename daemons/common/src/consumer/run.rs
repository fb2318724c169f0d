//! [`run`]: joins the group, opens the store and resumes from the last commit after any failure.

use std::{sync::Arc, time::Duration};

use rdkafka::consumer::Consumer;
use tokio_util::sync::CancellationToken;

use crate::{
    dead_letters::DeadLetters,
    runtime::{self, Backoff},
};

use super::assignment::Assignment;
use super::config::Config;
use super::group::{GroupConsumer, SESSION_TIMEOUT, pause};
use super::metrics::Metrics;
use super::position::wait_for_partitions;
use super::store::{Fenced, Store, Unresumable};
use super::worker::Worker;

/// Consumes `config.args.topic` into `store` until `shutdown`, then commits what was read and
/// returns. Fails only if that last commit fails (what it held is read again next time).
///
/// The instance joins `config.args.group_id`; the group spreads the topic's partitions over its
/// instances (cooperative-sticky: a rebalance moves only the partitions that must move).
pub async fn run<S: Store>(
    config: &Config,
    store: &mut S,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let consumer = config
        .args
        .kafka
        .group_consumer(&config.args.group_id, &config.args.topic)?;
    let consumed = consume(config, &consumer, store, metrics, shutdown).await;
    close(consumer).await;
    consumed
}

/// Leaves the group and closes `consumer`, waiting at most [`SESSION_TIMEOUT`] (the group
/// forgets a silent member after that anyway): librdkafka's close waits for the broker's
/// answers, and a broker that went away with this instance (a `kill -9` of `pipeline` stops
/// both) may never give them. The close runs on a thread of its own, which exiting ends.
pub(super) async fn close(consumer: Arc<GroupConsumer>) {
    let (closed, done) = tokio::sync::oneshot::channel();
    let closing = std::thread::Builder::new()
        .name("consumer-close".into())
        .spawn(move || {
            // The last reference closes it: lag and group checks in flight let go of theirs.
            let mut consumer = consumer;
            loop {
                match Arc::try_unwrap(consumer) {
                    Ok(last) => {
                        drop(last);
                        break;
                    }
                    Err(shared) => consumer = shared,
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = closed.send(());
        });
    let closed = match closing {
        Ok(_) => tokio::time::timeout(SESSION_TIMEOUT, done).await.is_ok(),
        Err(_) => false,
    };
    if !closed {
        tracing::warn!(
            "the Kafka consumer did not close within {SESSION_TIMEOUT:?} (the broker does not answer); exiting \
             without it"
        );
    }
}

/// [`run`] with its consumer.
pub(super) async fn consume<S: Store>(
    config: &Config,
    consumer: &Arc<GroupConsumer>,
    store: &mut S,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let topics = [config.args.topic.as_str(), config.args.dead_letter_topic.as_str()];
    if wait_for_partitions(&config.args.kafka, consumer, &config.args.topic, &topics, shutdown)
        .await
        .is_none()
    {
        return Ok(());
    }
    let dead_letters = Arc::new(
        tokio::task::spawn_blocking({
            let (kafka, topic, name) = (
                config.args.kafka.clone(),
                config.args.dead_letter_topic.clone(),
                config.name,
            );
            move || DeadLetters::new(&kafka, &topic, name)
        })
        .await??,
    );
    consumer.subscribe(&[config.args.topic.as_str()])?;
    let mut assigned = Assignment::default();
    let mut ready = false;
    let mut backoff = Backoff::default();
    loop {
        match store.open(shutdown).await {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "store unavailable");
                if backoff.wait(shutdown).await {
                    continue;
                }
                return Ok(());
            }
        }
        if !ready {
            ready = true;
            runtime::notify_ready();
            tracing::info!(group = %config.args.group_id, topic = %config.args.topic, "consuming the partitions the group assigns");
        }
        let mut worker = Worker::new(config, consumer, &dead_letters, metrics, &mut assigned);
        let consumed = worker.consume(store, shutdown).await;
        let owned = worker.owned();
        match consumed {
            Ok(()) => return Ok(()),
            Err(e) if shutdown.is_cancelled() => {
                return Err(e.context("the last commit failed; what it held is read again on the next start"));
            }
            Err(e) if e.chain().any(|c| c.is::<Unresumable>()) => {
                tracing::error!(error = %format!("{e:#}"), "stopping: resuming would lose or double records");
                return Err(e);
            }
            Err(e) => {
                store.release(&owned);
                metrics.forget(&owned);
                if let Some(fenced) = e.chain().find_map(|c| c.downcast_ref::<Fenced>()) {
                    // A zombie's view: the group moved these partitions while this instance was
                    // not looking. They are left to their owner until the group says so too
                    // (see `Assignment::hold`); the others resume from their last commit at once.
                    metrics.fenced.inc_by(fenced.partitions.len() as u64);
                    tracing::warn!(
                        partitions = ?fenced.partitions,
                        "another instance took these partitions over; what was read of them since the last commit \
                         is left to it"
                    );
                    assigned.hold(&fenced.partitions);
                    pause(consumer.as_ref(), &config.args.topic, &fenced.partitions);
                    continue;
                }
                metrics.recoveries.inc();
                tracing::warn!(error = %format!("{e:#}"), "resuming from the last commit");
                if !backoff.wait(shutdown).await {
                    return Ok(());
                }
            }
        }
    }
}
