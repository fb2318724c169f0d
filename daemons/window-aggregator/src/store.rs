//! PostgreSQL side: window rows, offsets and open windows, committed in one transaction.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDateTime, Utc};
use tokio_postgres::{Client, NoTls, Transaction};

use weather_common::consumer::{Checkpoint, Checkpoints, Claim, Fenced};

use crate::window::{Agg, Batch, PartitionState, WindowRow};

/// What is stored of one partition's position: where the consumer is, and the event-time
/// high mark the windows were judged by; stored only while the partition's owner epoch is
/// still `epoch`.
#[derive(Debug)]
pub struct Position<'a> {
    pub partition: i32,
    pub epoch: i64,
    pub checkpoint: &'a Checkpoint,
    pub max_event_time: Option<DateTime<Utc>>,
}

/// What [`Store::claim`] loads of the partitions it takes over.
#[derive(Debug, Default)]
pub struct Claimed {
    pub state: BTreeMap<i32, PartitionState>,
    /// Their checkpoints and the owner epochs they now have: this instance's.
    pub claim: Claim,
}

/// A rebuild ([`crate::rebuild`]) took these partitions over since this instance claimed them:
/// their windows and checkpoints are the rebuild's now. Unlike an owner change ([`Fenced`]),
/// which leaves them to the new owner, they are claimed again at once, from the rebuild's
/// checkpoints.
#[derive(Debug, thiserror::Error)]
#[error(
    "the windows were rebuilt from the Iceberg table meanwhile; partitions {partitions:?} are read again from its checkpoints"
)]
pub struct Rebuilt {
    pub partitions: Vec<i32>,
}

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

    /// Takes `partitions` over: raises their owner epochs (fencing out whoever owned them) and
    /// loads their state as the last commit left it, in one transaction. A commit of the
    /// previous owner that is under way finishes first (it holds the rows); one that comes later
    /// finds the epoch raised and stores nothing.
    pub async fn claim(&mut self, partitions: &[i32]) -> anyhow::Result<Claimed> {
        let tx = self.client.transaction().await?;
        add_partitions(&tx, &self.topic, partitions).await?;
        let mut claimed = Claimed::default();
        for row in tx
            .query(
                "UPDATE aggregator_offsets SET owner_epoch = owner_epoch + 1
                 WHERE topic = $1 AND partition = ANY($2)
                 RETURNING partition, owner_epoch, next_offset, last_record, max_event_time, dead_letters_from",
                &[&self.topic, &partitions],
            )
            .await?
        {
            let partition: i32 = row.get(0);
            claimed.claim.epochs.insert(partition, row.get(1));
            claimed.claim.checkpoints.insert(
                partition,
                Checkpoint {
                    next_offset: row.get(2),
                    last_record: row.get(3),
                    dead_letters_from: row.get(5),
                },
            );
            claimed.state.insert(partition, PartitionState::new(row.get(4)));
        }
        for row in tx
            .query(
                "SELECT partition, city, window_start, window_end, temperature_sum, record_count
                 FROM aggregator_open_windows WHERE topic = $1 AND partition = ANY($2)",
                &[&self.topic, &partitions],
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
            claimed
                .state
                .entry(partition)
                .or_insert_with(|| PartitionState::new(None))
                .open
                .insert((start.and_utc(), row.get(1)), (end.and_utc(), agg));
        }
        tx.commit().await?;
        Ok(claimed)
    }

    /// Stores `positions` (checkpoint and event-time high mark of every partition this
    /// instance owns), adds the deltas to `weather`, replaces the open windows of the changed
    /// partitions and notifies the dashboard, all in one transaction; or, when another instance
    /// has raised the owner epoch of any of the partitions, nothing ([`Fenced`]).
    pub async fn commit(&mut self, batch: &Batch, positions: &[Position<'_>]) -> anyhow::Result<()> {
        let tx = self.client.transaction().await?;
        // First, so that the partitions' rows are locked against a claim for the rest of it.
        if !positions.is_empty() {
            let ids: Vec<i32> = positions.iter().map(|p| p.partition).collect();
            let epochs: Vec<i64> = positions.iter().map(|p| p.epoch).collect();
            let offsets: Vec<i64> = positions.iter().map(|p| p.checkpoint.next_offset).collect();
            let records: Vec<Option<&str>> = positions.iter().map(|p| p.checkpoint.last_record.as_deref()).collect();
            let max_ts: Vec<Option<DateTime<Utc>>> = positions.iter().map(|p| p.max_event_time).collect();
            let dead_letters: Vec<Option<i64>> = positions.iter().map(|p| p.checkpoint.dead_letters_from).collect();
            let stored: BTreeSet<i32> = tx
                .query(
                    "UPDATE aggregator_offsets AS o SET
                         next_offset = u.next_offset, last_record = u.last_record, max_event_time = u.max_ts,
                         dead_letters_from = u.dead_letters_from
                     FROM UNNEST($2::int4[], $3::int8[], $4::int8[], $5::text[], $6::timestamptz[], $7::int8[])
                         AS u(partition, epoch, next_offset, last_record, max_ts, dead_letters_from)
                     WHERE o.topic = $1 AND o.partition = u.partition AND o.owner_epoch = u.epoch
                     RETURNING o.partition",
                    &[&self.topic, &ids, &epochs, &offsets, &records, &max_ts, &dead_letters],
                )
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let fenced: Vec<i32> = ids.into_iter().filter(|p| !stored.contains(p)).collect();
            if !fenced.is_empty() {
                // Which of them a rebuild took over last (and no instance since).
                let rebuilt: BTreeSet<i32> = tx
                    .query(
                        "SELECT partition FROM aggregator_offsets
                         WHERE topic = $1 AND partition = ANY($2) AND owner_epoch = rebuilt_epoch",
                        &[&self.topic, &fenced],
                    )
                    .await?
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                let (rebuilt, moved): (Vec<i32>, Vec<i32>) = fenced.into_iter().partition(|p| rebuilt.contains(p));
                if !moved.is_empty() {
                    return Err(Fenced { partitions: moved }.into());
                }
                return Err(Rebuilt { partitions: rebuilt }.into());
            }
        }
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
        if !batch.deltas.is_empty() {
            let payload = batch.deltas.len().to_string();
            tx.execute("SELECT pg_notify($1, $2)", &[&NOTIFY_CHANNEL, &payload])
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// A rebuild's one transaction: every partition of the topic taken over, every window deleted,
/// the rebuilt windows inserted as they come, then each partition's state set to the table's
/// checkpoints ([`Replace::finish`]). Until it commits, nothing changes for readers, and a
/// running aggregator's commits wait on its partitions' rows; dropped (a crash), it changes
/// nothing.
pub struct Replace<'a> {
    tx: Transaction<'a>,
    topic: &'a str,
    pub windows: u64,
}

impl Store {
    /// Re-creates whatever of the schema is missing (a dropped table) and begins the rebuild's
    /// transaction: the partitions of `topic` known here or in `checkpoints` are taken over (the
    /// owner epoch raised, as a claim does, and recorded as a rebuild's) and every window row is
    /// deleted.
    pub async fn replace(&mut self, checkpoints: &Checkpoints) -> anyhow::Result<Replace<'_>> {
        weather_common::schema::reapply(&mut self.client).await?;
        let tx = self.client.transaction().await?;
        let partitions: Vec<i32> = checkpoints.keys().copied().collect();
        add_partitions(&tx, &self.topic, &partitions).await?;
        tx.execute(
            "UPDATE aggregator_offsets SET owner_epoch = owner_epoch + 1, rebuilt_epoch = owner_epoch + 1
             WHERE topic = $1",
            &[&self.topic],
        )
        .await?;
        tx.execute("DELETE FROM weather", &[]).await?;
        Ok(Replace {
            tx,
            topic: &self.topic,
            windows: 0,
        })
    }
}

impl Replace<'_> {
    /// Inserts finished windows (each `(city, start)` once in a rebuild).
    pub async fn insert(&mut self, windows: &[WindowRow]) -> anyhow::Result<()> {
        if windows.is_empty() {
            return Ok(());
        }
        let city: Vec<&str> = windows.iter().map(|r| r.city.as_str()).collect();
        let start: Vec<NaiveDateTime> = windows.iter().map(|r| r.start.naive_utc()).collect();
        let end: Vec<NaiveDateTime> = windows.iter().map(|r| r.end.naive_utc()).collect();
        let count: Vec<i64> = windows.iter().map(|r| r.agg.count).collect();
        let sum: Vec<f64> = windows.iter().map(|r| r.agg.sum).collect();
        self.tx
            .execute(
                "INSERT INTO weather
                     (city, window_start, window_end, record_count, temperature_sum, avg_temperature, last_updated)
                 SELECT city, ws, we, n, s, s / n, now() AT TIME ZONE 'UTC'
                 FROM UNNEST($1::varchar[], $2::timestamp[], $3::timestamp[], $4::int8[], $5::float8[])
                     AS d(city, ws, we, n, s)",
                &[&city, &start, &end, &count, &sum],
            )
            .await?;
        self.windows += windows.len() as u64;
        Ok(())
    }

    /// Sets every partition of the topic to where the table stands: its checkpoint in
    /// `checkpoints`, or the start of the log for a partition the table holds nothing of; no
    /// window open, no event-time high mark (the next readings set it); the dead-letter mark
    /// unknown, so a claim reads the dead letters back from the start rather than miss this
    /// aggregator's own. Then commits, telling the dashboard.
    pub async fn finish(self, checkpoints: &Checkpoints) -> anyhow::Result<()> {
        let partitions: Vec<i32> = checkpoints.keys().copied().collect();
        let offsets: Vec<i64> = checkpoints.values().map(|c| c.next_offset).collect();
        let records: Vec<Option<&str>> = checkpoints.values().map(|c| c.last_record.as_deref()).collect();
        self.tx
            .execute(
                "UPDATE aggregator_offsets SET
                     next_offset = 0, last_record = NULL, max_event_time = NULL, dead_letters_from = NULL
                 WHERE topic = $1",
                &[&self.topic],
            )
            .await?;
        self.tx
            .execute(
                "UPDATE aggregator_offsets AS o SET next_offset = c.next_offset, last_record = c.last_record
                 FROM UNNEST($2::int4[], $3::int8[], $4::text[]) AS c(partition, next_offset, last_record)
                 WHERE o.topic = $1 AND o.partition = c.partition",
                &[&self.topic, &partitions, &offsets, &records],
            )
            .await?;
        self.tx
            .execute("DELETE FROM aggregator_open_windows WHERE topic = $1", &[&self.topic])
            .await?;
        self.tx
            .execute(
                "SELECT pg_notify($1, $2)",
                &[&NOTIFY_CHANNEL, &self.windows.to_string()],
            )
            .await?;
        self.tx.commit().await?;
        Ok(())
    }
}

/// Rows for `partitions` of `topic` not stored yet: at offset 0, owner epoch 0.
async fn add_partitions(tx: &Transaction<'_>, topic: &str, partitions: &[i32]) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO aggregator_offsets (topic, partition, next_offset)
         SELECT $1, p, 0 FROM UNNEST($2::int4[]) AS p
         ON CONFLICT (topic, partition) DO NOTHING",
        &[&topic, &partitions],
    )
    .await
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
