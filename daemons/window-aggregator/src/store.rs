//! PostgreSQL side: window rows, offsets and open windows, committed in one transaction.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use tokio_postgres::{Client, NoTls};

use weather_common::consumer::{Checkpoint, Checkpoints};

use crate::window::{Agg, Batch, PartitionState};

/// What is stored of one partition's position: where the consumer is, and the event-time
/// high mark the windows were judged by.
#[derive(Debug)]
pub struct Position<'a> {
    pub partition: i32,
    pub checkpoint: &'a Checkpoint,
    pub max_event_time: Option<DateTime<Utc>>,
}

/// Names the single-writer lock: one active aggregator per database, others stand by.
const WRITER_LOCK: i64 = 0x7765_6174_6865_7202;

/// Channel the dashboard listens on; notified in the transaction that changed rows.
pub const NOTIFY_CHANNEL: &str = "weather_updates";

pub struct Store {
    client: Client,
    topic: String,
}

impl Store {
    /// Connects, applies the migrations and sets the session to UTC (`TIMESTAMP` columns hold UTC).
    pub async fn connect(url: &str, topic: &str) -> anyhow::Result<Self> {
        let (mut client, connection) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "PostgreSQL connection lost");
            }
        });
        client.batch_execute("SET TIME ZONE 'UTC'").await?;
        weather_common::schema::migrate(&mut client).await?;
        Ok(Self {
            client,
            topic: topic.to_owned(),
        })
    }

    /// Takes the writer lock if free. It is held by the session: a lost connection frees it.
    pub async fn try_lock(&self) -> anyhow::Result<bool> {
        let row = self
            .client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&WRITER_LOCK])
            .await?;
        Ok(row.get(0))
    }

    /// The state of the last commit: checkpoints, event-time high marks and open windows.
    pub async fn load(&self) -> anyhow::Result<(BTreeMap<i32, PartitionState>, Checkpoints)> {
        let mut partitions = BTreeMap::new();
        let mut checkpoints = Checkpoints::new();
        for row in self
            .client
            .query(
                "SELECT partition, next_offset, last_record, max_event_time FROM aggregator_offsets WHERE topic = $1",
                &[&self.topic],
            )
            .await?
        {
            let partition: i32 = row.get(0);
            checkpoints.insert(
                partition,
                Checkpoint {
                    next_offset: row.get(1),
                    last_record: row.get(2),
                },
            );
            partitions.insert(partition, PartitionState::new(row.get(3)));
        }
        for row in self
            .client
            .query(
                "SELECT partition, city, window_start, window_end, temperature_sum, record_count
                 FROM aggregator_open_windows WHERE topic = $1",
                &[&self.topic],
            )
            .await?
        {
            let partition: i32 = row.get(0);
            let start: NaiveDateTime = row.get(2);
            let end: NaiveDateTime = row.get(3);
            let agg = Agg {
                sum: row.get(4),
                count: row.get(5),
            };
            partitions
                .entry(partition)
                .or_insert_with(|| PartitionState::new(None))
                .open
                .insert((start.and_utc(), row.get(1)), (end.and_utc(), agg));
        }
        Ok((partitions, checkpoints))
    }

    /// Adds the deltas to `weather`, replaces the open windows of the changed partitions,
    /// stores `positions` (checkpoint and event-time high mark of every partition) and
    /// notifies the dashboard, all in one transaction.
    pub async fn commit(&mut self, batch: &Batch, positions: &[Position<'_>]) -> anyhow::Result<()> {
        let tx = self.client.transaction().await?;
        if !batch.deltas.is_empty() {
            let city: Vec<&str> = batch.deltas.iter().map(|r| r.city.as_str()).collect();
            let start: Vec<NaiveDateTime> = batch.deltas.iter().map(|r| r.start.naive_utc()).collect();
            let end: Vec<NaiveDateTime> = batch.deltas.iter().map(|r| r.end.naive_utc()).collect();
            let count: Vec<i64> = batch.deltas.iter().map(|r| r.agg.count).collect();
            let sum: Vec<f64> = batch.deltas.iter().map(|r| r.agg.sum).collect();
            tx.execute(
                "INSERT INTO weather AS w
                     (city, window_start, window_end, record_count, temperature_sum, avg_temperature, last_updated)
                 SELECT city, ws, we, n, s, s / n, now() AT TIME ZONE 'UTC'
                 FROM UNNEST($1::varchar[], $2::timestamp[], $3::timestamp[], $4::int8[], $5::float8[])
                     AS d(city, ws, we, n, s)
                 ON CONFLICT (city, window_start) DO UPDATE SET
                     record_count = COALESCE(w.record_count, 0) + EXCLUDED.record_count,
                     temperature_sum = COALESCE(w.temperature_sum, w.avg_temperature * w.record_count, 0)
                         + EXCLUDED.temperature_sum,
                     avg_temperature = (COALESCE(w.temperature_sum, w.avg_temperature * w.record_count, 0)
                         + EXCLUDED.temperature_sum) / (COALESCE(w.record_count, 0) + EXCLUDED.record_count),
                     window_end = EXCLUDED.window_end,
                     last_updated = EXCLUDED.last_updated",
                &[&city, &start, &end, &count, &sum],
            )
            .await?;
        }
        if !batch.partitions.is_empty() {
            let ids: Vec<i32> = batch.partitions.iter().map(|p| p.partition).collect();
            tx.execute(
                "DELETE FROM aggregator_open_windows WHERE topic = $1 AND partition = ANY($2)",
                &[&self.topic, &ids],
            )
            .await?;
            let open = batch
                .partitions
                .iter()
                .flat_map(|p| p.open.iter().map(move |w| (p.partition, w)));
            let (mut partition, mut city, mut start, mut end, mut sum, mut count) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (p, window) in open {
                partition.push(p);
                city.push(window.city.as_str());
                start.push(window.start.naive_utc());
                end.push(window.end.naive_utc());
                sum.push(window.agg.sum);
                count.push(window.agg.count);
            }
            if !partition.is_empty() {
                tx.execute(
                    "INSERT INTO aggregator_open_windows
                         (topic, partition, city, window_start, window_end, temperature_sum, record_count)
                     SELECT $1, * FROM UNNEST($2::int4[], $3::varchar[], $4::timestamp[], $5::timestamp[],
                                              $6::float8[], $7::int8[])",
                    &[&self.topic, &partition, &city, &start, &end, &sum, &count],
                )
                .await?;
            }
        }
        if !positions.is_empty() {
            let ids: Vec<i32> = positions.iter().map(|p| p.partition).collect();
            let offsets: Vec<i64> = positions.iter().map(|p| p.checkpoint.next_offset).collect();
            let records: Vec<Option<&str>> = positions.iter().map(|p| p.checkpoint.last_record.as_deref()).collect();
            let max_ts: Vec<Option<DateTime<Utc>>> = positions.iter().map(|p| p.max_event_time).collect();
            tx.execute(
                "INSERT INTO aggregator_offsets (topic, partition, next_offset, last_record, max_event_time)
                 SELECT $1, * FROM UNNEST($2::int4[], $3::int8[], $4::text[], $5::timestamptz[])
                 ON CONFLICT (topic, partition) DO UPDATE SET
                     next_offset = EXCLUDED.next_offset, last_record = EXCLUDED.last_record,
                     max_event_time = EXCLUDED.max_event_time",
                &[&self.topic, &ids, &offsets, &records, &max_ts],
            )
            .await?;
        }
        if !batch.deltas.is_empty() {
            let payload = batch.deltas.len().to_string();
            tx.execute("SELECT pg_notify($1, $2)", &[&NOTIFY_CHANNEL, &payload])
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Rows one retention statement deletes: small enough that no statement holds locks long.
const RETENTION_BATCH: i64 = 1_000;

/// Deletes window rows older than `retention`, every minute until `shutdown`, in batches of
/// [`RETENTION_BATCH`] on a connection of its own, so the aggregator's commits never wait
/// behind a large delete. A zero `retention` keeps every row.
pub async fn enforce_retention(
    url: String,
    retention: std::time::Duration,
    deleted: prometheus_client::metrics::counter::Counter,
    shutdown: tokio_util::sync::CancellationToken,
) {
    if retention.is_zero() {
        return;
    }
    let mut client: Option<Client> = None;
    loop {
        // First wait: at start the aggregator's own connection applies the migrations.
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
        }
        if client.as_ref().is_none_or(Client::is_closed) {
            client = match tokio_postgres::connect(&url, NoTls).await {
                Ok((c, connection)) => {
                    tokio::spawn(connection);
                    Some(c)
                }
                Err(e) => {
                    tracing::debug!(error = %e, "retention: PostgreSQL unavailable");
                    None
                }
            };
        }
        if let Some(c) = &client {
            match delete_expired(c, retention).await {
                Ok(0) => {}
                Ok(n) => {
                    deleted.inc_by(n);
                    tracing::info!(rows = n, "deleted windows older than the retention");
                }
                Err(e) => tracing::warn!(error = ?e, "retention: deleting old windows failed"),
            }
        }
    }
}

/// Deletes every window that started more than `retention` ago, a batch per statement.
pub async fn delete_expired(client: &Client, retention: std::time::Duration) -> Result<u64, tokio_postgres::Error> {
    let mut total = 0;
    loop {
        let n = client
            .execute(
                "DELETE FROM weather WHERE ctid IN (
                     SELECT ctid FROM weather
                     WHERE window_start < (now() AT TIME ZONE 'UTC') - make_interval(secs => $1)
                     LIMIT $2)",
                &[&retention.as_secs_f64(), &RETENTION_BATCH],
            )
            .await?;
        total += n;
        if n < RETENTION_BATCH as u64 {
            return Ok(total);
        }
    }
}
