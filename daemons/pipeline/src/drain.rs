//! Stopping the daemons in dependency order, so that a stop loses nothing: no new readings
//! first, then the consumers read everything the logging-server acknowledged (and commit it as
//! they stop), then the rest.

use std::time::Duration;

use weather_common::consumer::metrics::{READ_OFFSET, prefix};

use crate::{
    http_client::get,
    supervisor::{self, Supervised},
};

/// Stops `running` (started in dependency order): the weather-client and the logging-server,
/// then, once the consumers among the rest have read the log to its end (at most `timeout`;
/// `consumers`: each consumer daemon with the admin address of each instance), the rest in
/// reverse start order. Whether all exited cleanly.
pub async fn stop_daemons(
    mut running: Vec<Supervised>,
    consumers: &[(&str, Vec<(&'static str, String)>)],
    brokers: &str,
    timeout: Duration,
) -> bool {
    let mut front = Vec::new();
    for name in ["weather-client", "logging-server"] {
        if let Some(i) = running.iter().position(|c| c.name == name) {
            front.push(running.remove(i));
        }
    }
    let mut clean = supervisor::stop_in_order(front).await;
    let running_admins: Vec<(&str, Vec<String>)> = consumers
        .iter()
        .map(|(daemon, instances)| {
            let admins = instances
                .iter()
                .filter(|(name, _)| running.iter().any(|c| c.name == *name))
                .map(|(_, admin)| admin.clone())
                .collect();
            (*daemon, admins)
        })
        .collect();
    wait_for_consumers(brokers, &running_admins, timeout).await;
    running.reverse();
    clean &= supervisor::stop_in_order(running).await;
    clean
}

/// The end of each partition of the `weather` topic.
async fn log_ends(brokers: &str) -> anyhow::Result<Vec<(i32, i64)>> {
    let brokers = brokers.to_owned();
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "pipeline-drain")
            .create()?;
        let topic = weather_common::kafka::WEATHER_TOPIC;
        let partitions = weather_common::kafka::partition_count(&consumer, topic)?;
        (0..partitions)
            .map(|p| Ok((p, consumer.fetch_watermarks(topic, p, Duration::from_secs(5))?.1)))
            .collect()
    })
    .await?
}

/// `NAME_read_offset{partition="P"}` from a consumer's metrics (0 when absent).
fn read_offset(metrics: &str, name: &str, partition: i32) -> i64 {
    let prefix = format!("{}_{READ_OFFSET}{{partition=\"{partition}\"}} ", prefix(name));
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until every consumer (all its instances together) has read the topic to the end it
/// has now, so that what the logging-server acknowledged is committed when they stop; at most
/// `timeout`. `consumers`: each daemon with the admin addresses of its running instances.
async fn wait_for_consumers(brokers: &str, consumers: &[(&str, Vec<String>)], timeout: Duration) {
    if consumers.iter().all(|(_, admins)| admins.is_empty()) {
        return;
    }
    let ends = match log_ends(brokers).await {
        Ok(ends) => ends,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "could not read the end of the log; stopping the consumers");
            return;
        }
    };
    let started = tokio::time::Instant::now();
    let mut reported = started;
    loop {
        let mut behind = Vec::new();
        for (name, admins) in consumers.iter().filter(|(_, admins)| !admins.is_empty()) {
            let mut metrics = Vec::new();
            for admin in admins {
                metrics.push(get(admin, "/metrics").await.unwrap_or_default());
            }
            // A partition's reader is whichever instance owns it now; offsets only grow, so the
            // furthest any instance reports is where the group stands.
            let left: i64 = ends
                .iter()
                .map(|&(p, end)| {
                    let read = metrics.iter().map(|m| read_offset(m, name, p)).max().unwrap_or(0);
                    (end - read).max(0)
                })
                .sum();
            if left > 0 {
                behind.push(format!("{name} {left}"));
            }
        }
        if behind.is_empty() {
            return;
        }
        if started.elapsed() > timeout {
            tracing::warn!(
                "stopping the consumers before they read the whole log (records left: {}); a durable broker \
                 keeps the rest for the next start",
                behind.join(", ")
            );
            return;
        }
        if reported.elapsed() > Duration::from_secs(5) {
            reported = tokio::time::Instant::now();
            tracing::info!(
                "waiting for the consumers to read the log to its end (records left: {})",
                behind.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
