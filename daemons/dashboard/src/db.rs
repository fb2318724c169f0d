//! Reads the window rows written by window-aggregator, and listens for its notifications.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, NaiveDateTime, Utc};
use tokio::sync::Mutex;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::CancellationToken;

/// Channel window-aggregator notifies after each commit.
pub const NOTIFY_CHANNEL: &str = "weather_updates";
const LISTEN: &str = "LISTEN weather_updates";

/// One window average.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub time: DateTime<Utc>,
    pub temperature: f64,
    pub count: i64,
}

/// Windows per city, oldest first, and when the table last changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub cities: BTreeMap<String, Vec<Point>>,
    pub last_updated: Option<DateTime<Utc>>,
}

impl Snapshot {
    pub fn points(&self) -> usize {
        self.cities.values().map(Vec::len).sum()
    }

    pub fn readings(&self) -> i64 {
        self.cities.values().flatten().map(|p| p.count).sum()
    }

    /// Average over all readings (each window weighted by its count).
    pub fn average(&self) -> Option<f64> {
        let readings = self.readings();
        (readings > 0).then(|| {
            self.cities
                .values()
                .flatten()
                .map(|p| p.temperature * p.count as f64)
                .sum::<f64>()
                / readings as f64
        })
    }
}

/// A lazily (re)connected client: a lost connection is replaced on the next query.
pub struct Db {
    url: String,
    client: Mutex<Option<Client>>,
    /// The longest a read may take, connecting included.
    timeout: Duration,
}

/// Why a read gave no rows.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error("PostgreSQL did not answer within {0:?}")]
    Timeout(Duration),
}

impl Db {
    pub fn new(url: &str, timeout: Duration) -> Self {
        Self {
            url: url.to_owned(),
            client: Mutex::new(None),
            timeout,
        }
    }

    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>, tokio_postgres::Error> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "PostgreSQL connection lost");
                }
            });
            let mut client = client;
            // The server ends a query that runs too long; a server that does not answer at
            // all is the caller's timeout.
            let statement_timeout = format!("SET statement_timeout = {}", self.timeout.as_millis());
            client.batch_execute(&statement_timeout).await?;
            client.batch_execute("SET TIME ZONE 'UTC'").await?;
            // The dashboard may start before the aggregator: the table must exist to be read.
            weather_common::schema::migrate(&mut client).await?;
            *guard = Some(client);
        }
        Ok(guard)
    }

    /// Windows that started within `history` of now, and after `since` if given; fails after
    /// the timeout when PostgreSQL does not answer (stopped, frozen, unreachable).
    pub async fn snapshot(&self, history: Duration, since: Option<DateTime<Utc>>) -> Result<Snapshot, DbError> {
        match tokio::time::timeout(self.timeout, self.read(history, since)).await {
            Ok(read) => Ok(read?),
            Err(_) => {
                // The connection may be stuck behind the unanswered query: start a new one.
                if let Ok(mut guard) = self.client.try_lock() {
                    *guard = None;
                }
                Err(DbError::Timeout(self.timeout))
            }
        }
    }

    async fn read(&self, history: Duration, since: Option<DateTime<Utc>>) -> Result<Snapshot, tokio_postgres::Error> {
        let guard = self.client().await?;
        let Some(client) = guard.as_ref() else {
            unreachable!("client() always leaves a client");
        };
        let since = since.map(|s| s.naive_utc());
        let rows = client
            .query(
                "SELECT city, window_start, avg_temperature, record_count, last_updated
                 FROM weather
                 WHERE window_start >= (now() AT TIME ZONE 'UTC') - make_interval(secs => $1)
                   AND ($2::timestamp IS NULL OR window_start > $2)
                   AND avg_temperature IS NOT NULL
                 ORDER BY city, window_start",
                &[&history.as_secs_f64(), &since],
            )
            .await?;
        let mut snapshot = Snapshot::default();
        for row in rows {
            let time: NaiveDateTime = row.get(1);
            let updated: Option<NaiveDateTime> = row.get(4);
            let point = Point {
                time: time.and_utc(),
                temperature: row.get(2),
                count: row.get::<_, Option<i64>>(3).unwrap_or(0),
            };
            snapshot.cities.entry(row.get(0)).or_default().push(point);
            let updated = updated.map(|u| u.and_utc());
            snapshot.last_updated = snapshot.last_updated.max(updated);
        }
        Ok(snapshot)
    }
}

/// Calls `on_notify` for every `NOTIFY weather_updates`; reconnects with backoff until
/// `shutdown`. Returns when shut down.
pub async fn listen(url: String, shutdown: CancellationToken, on_notify: impl Fn()) {
    let mut delay = Duration::from_millis(200);
    loop {
        match tokio_postgres::connect(&url, NoTls).await {
            Ok((client, mut connection)) => {
                let listen = client.batch_execute(LISTEN);
                let mut listening = false;
                tokio::pin!(listen);
                loop {
                    tokio::select! {
                        result = &mut listen, if !listening => match result {
                            Ok(()) => {
                                listening = true;
                                delay = Duration::from_millis(200);
                                tracing::debug!("listening for {NOTIFY_CHANNEL}");
                                // Anything may have changed while we were not listening.
                                on_notify();
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "LISTEN failed");
                                break;
                            }
                        },
                        message = std::future::poll_fn(|cx| connection.poll_message(cx)) => match message {
                            Some(Ok(AsyncMessage::Notification(_))) => on_notify(),
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "notification connection lost");
                                break;
                            }
                            None => break,
                        },
                        () = shutdown.cancelled() => return,
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "PostgreSQL unavailable for notifications"),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {},
            () = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
