//! Running queries and their pages. Each query runs in a task of its own and hands its
//! batches over a channel of two, so a client that reads slowly holds the query back rather
//! than its results piling up in memory. A client fetches pages by token; fetching the same
//! token again gives the same page (a retry), and anything else is refused.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use arrow_array::RecordBatch;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    Metrics,
    engine::{Engine, Session, SessionUpdate},
    errors::failure,
    history::{Entry, History},
    protocol::{self, Column, ErrorCode, Failure, QueryResults, State, Stats},
};

/// How long the response to a statement waits for its first rows. Trino answers at once with
/// a `nextUri`; answering with the rows when they come this soon saves short statements a
/// round trip, and clients read rows from any response. Kept short so that a client has the
/// query's id (to cancel it) soon.
const FIRST_PAGE_WAIT: Duration = Duration::from_millis(100);

/// What a query's task hands to the pages.
enum Message {
    Start {
        columns: Vec<Column>,
        session: SessionUpdate,
        update_type: Option<&'static str>,
    },
    Batch(RecordBatch),
    Failed(Failure),
}

/// A page as sent, kept for a retry of the same token.
#[derive(Clone)]
pub struct Page {
    pub results: Arc<QueryResults>,
    pub session: SessionUpdate,
}

pub struct Query {
    pub id: String,
    /// Where the client reached the server: the base of every `nextUri`.
    base_url: String,
    /// A random part of every `nextUri`: knowing a query's id is not enough to read it.
    slug: String,
    created: Instant,
    /// Its record in the history the UI shows.
    entry: Entry,
    cancel: CancellationToken,
    cursor: tokio::sync::Mutex<Cursor>,
    touched: Mutex<Instant>,
}

struct Cursor {
    receiver: mpsc::Receiver<Message>,
    token: u64,
    last: Option<Page>,
    columns: Option<Vec<Column>>,
    session: SessionUpdate,
    update_type: Option<&'static str>,
    pending: VecDeque<Vec<Value>>,
    rows: u64,
    done: bool,
    failed: Option<Failure>,
}

/// Limits of every query.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_queries: usize,
    pub query_timeout: Duration,
    pub client_timeout: Duration,
    pub page_rows: usize,
    /// How long a fetch waits for rows before answering with none.
    pub max_wait: Duration,
}

pub struct Queries {
    engine: Arc<Engine>,
    limits: Limits,
    running: Mutex<HashMap<String, Arc<Query>>>,
    metrics: Arc<Metrics>,
    history: Arc<History>,
}

/// A statement as [`Queries::start`] left it: its first response, its record, and the running
/// query, or none when it was refused (the queue was full).
struct Started {
    page: Page,
    entry: Entry,
    query: Option<Arc<Query>>,
}

/// What [`Queries::collect`] gathered of a query.
pub struct Collected {
    pub id: String,
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<Value>>,
    /// All the rows the query returned; `rows` holds the first of them.
    pub total_rows: u64,
    pub failure: Option<Failure>,
}

impl Queries {
    pub fn new(engine: Arc<Engine>, limits: Limits, metrics: Arc<Metrics>, history: Arc<History>) -> Self {
        Self {
            engine,
            limits,
            running: Mutex::new(HashMap::new()),
            metrics,
            history,
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Query>>> {
        // A panic while holding the lock leaves a map that is still whole.
        self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts `sql`, sent by client `source`, and answers with its first page: the rows when
    /// they are ready within [`FIRST_PAGE_WAIT`] (a short statement then takes one round trip),
    /// else a `nextUri` (on `base_url`) that leads to them.
    pub async fn submit(&self, sql: String, session: Session, source: Option<String>, base_url: String) -> Page {
        let Started { page, query, .. } = self.start(sql, session, source, base_url);
        match query {
            Some(query) => self.page(&query, 1, FIRST_PAGE_WAIT).await.unwrap_or(page),
            None => page,
        }
    }

    fn start(&self, sql: String, session: Session, source: Option<String>, base_url: String) -> Started {
        let id = query_id();
        let entry = self.history.begin(&id, &sql, &session.user, source);
        entry.update(|r| {
            r.catalog = session.catalog.clone();
            r.schema = session.schema.clone();
        });
        if self.count() >= self.limits.max_queries {
            self.metrics.finished(State::Failed);
            let failure = Failure::new(
                ErrorCode::QueryQueueFull,
                format!("Too many queries: {} are running", self.limits.max_queries),
            );
            entry.end(State::Failed, Some(&failure));
            return Started {
                page: failed_page(&id, &base_url, &failure),
                entry,
                query: None,
            };
        }
        let cancel = CancellationToken::new();
        let (sender, receiver) = mpsc::channel(2);
        let query = Arc::new(Query {
            id: id.clone(),
            base_url,
            slug: uuid::Uuid::new_v4().simple().to_string(),
            created: Instant::now(),
            entry: entry.clone(),
            cancel: cancel.clone(),
            cursor: tokio::sync::Mutex::new(Cursor {
                receiver,
                token: 0,
                last: None,
                columns: None,
                session: SessionUpdate::default(),
                update_type: None,
                pending: VecDeque::new(),
                rows: 0,
                done: false,
                failed: None,
            }),
            touched: Mutex::new(Instant::now()),
        });
        self.lock().insert(id.clone(), query.clone());
        self.metrics.running.inc();
        // Debug formatting keeps a statement's line breaks from splitting the log line.
        tracing::info!(query = %id, user = ?session.user, sql = ?sql, "query submitted");
        let engine = self.engine.clone();
        let timeout = self.limits.query_timeout;
        tokio::spawn(async move {
            let late = tokio::select! {
                () = execute(&engine, &sql, &session, &entry, &sender) => None,
                () = tokio::time::sleep(timeout) => Some(Failure::new(
                    ErrorCode::ExceededTimeLimit,
                    format!("Query exceeded the maximum execution time limit of {}", humantime::format_duration(timeout)),
                )),
                () = cancel.cancelled() => None,
            };
            if let Some(failure) = late {
                tokio::select! {
                    _ = sender.send(Message::Failed(failure)) => {}
                    () = cancel.cancelled() => {}
                }
            }
        });
        let results = QueryResults {
            id: id.clone(),
            info_uri: info_uri(&query.base_url, &id),
            next_uri: Some(next_uri(&query, 1)),
            columns: None,
            data: None,
            stats: Stats::default(),
            error: None,
            warnings: vec![],
            update_type: None,
        };
        let page = Page {
            results: Arc::new(results),
            session: SessionUpdate::default(),
        };
        Started {
            page,
            entry: query.entry.clone(),
            query: Some(query),
        }
    }

    fn find(&self, id: &str, slug: &str) -> Option<Arc<Query>> {
        let query = self.lock().get(id).cloned()?;
        (query.slug == slug).then_some(query)
    }

    /// The page `token` of query `id`; `None` when there is no such query or page.
    pub async fn fetch(&self, id: &str, slug: &str, token: u64) -> Option<Page> {
        let query = self.find(id, slug)?;
        self.page(&query, token, self.limits.max_wait).await
    }

    /// The page `token` of `query`, waiting up to `wait` for rows; `None` when there is no
    /// such page.
    async fn page(&self, query: &Query, token: u64, wait: Duration) -> Option<Page> {
        *query.touched.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        let mut cursor = query.cursor.lock().await;
        if let Some(last) = &cursor.last
            && cursor.token == token
        {
            return Some(last.clone());
        }
        if token != cursor.token + 1 {
            return None;
        }
        self.fill(query, &mut cursor, wait).await;
        let data: Vec<Vec<Value>> = {
            let take = cursor.pending.len().min(self.limits.page_rows);
            cursor.pending.drain(..take).collect()
        };
        cursor.rows += data.len() as u64;
        self.metrics.rows.inc_by(data.len() as u64);
        let finished = cursor.failed.is_some() || (cursor.done && cursor.pending.is_empty());
        let state = match (&cursor.failed, finished, &cursor.columns) {
            (Some(_), _, _) => State::Failed,
            (None, true, _) => State::Finished,
            (None, false, Some(_)) => State::Running,
            (None, false, None) => State::Queued,
        };
        let elapsed = query.created.elapsed().as_millis() as u64;
        let results = QueryResults {
            id: query.id.clone(),
            info_uri: info_uri(&query.base_url, &query.id),
            next_uri: (!finished).then(|| next_uri(query, token + 1)),
            columns: cursor.columns.clone(),
            data: (!data.is_empty()).then_some(data),
            stats: Stats {
                state,
                queued: state == State::Queued,
                scheduled: state != State::Queued,
                nodes: 1,
                elapsed_time_millis: elapsed,
                wall_time_millis: elapsed,
                processed_rows: cursor.rows,
                ..Stats::default()
            },
            error: cursor.failed.as_ref().map(Failure::to_error),
            warnings: vec![],
            update_type: cursor.update_type.map(str::to_owned),
        };
        let page = Page {
            results: Arc::new(results),
            session: cursor.session.clone(),
        };
        cursor.token = token;
        cursor.last = Some(page.clone());
        let rows = cursor.rows;
        query.entry.update(|r| {
            r.rows = rows;
            r.pages += 1;
        });
        if finished {
            self.finish(query, state, cursor.failed.as_ref());
        }
        Some(page)
    }

    /// Reads what the query has ready: waits up to `wait` for the first message, then takes
    /// what is there without waiting, until a page is full.
    async fn fill(&self, query: &Query, cursor: &mut Cursor, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        while !cursor.done && cursor.failed.is_none() && cursor.pending.len() < self.limits.page_rows {
            let message = if cursor.pending.is_empty() {
                match tokio::time::timeout_at(deadline, cursor.receiver.recv()).await {
                    Ok(message) => message,
                    Err(_) => return,
                }
            } else {
                match cursor.receiver.try_recv() {
                    Ok(message) => Some(message),
                    Err(mpsc::error::TryRecvError::Empty) => return,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            };
            match message {
                Some(Message::Start {
                    columns,
                    session,
                    update_type,
                }) => {
                    let planned = query.created.elapsed();
                    let names = columns.iter().map(|c| c.name.clone()).collect();
                    query.entry.update(|r| {
                        r.planning = Some(planned);
                        r.state = State::Running;
                        r.columns = names;
                    });
                    cursor.columns = Some(columns);
                    cursor.session = session;
                    cursor.update_type = update_type;
                }
                Some(Message::Batch(batch)) => cursor.pending.extend(protocol::rows(&batch)),
                Some(Message::Failed(failure)) => cursor.failed = Some(failure),
                None => cursor.done = true,
            }
        }
    }

    fn finish(&self, query: &Query, state: State, failure: Option<&Failure>) {
        query.entry.end(state, failure);
        if self.lock().remove(&query.id).is_some() {
            self.metrics.running.dec();
            self.metrics.finished(state);
            self.metrics.duration.observe(query.created.elapsed().as_secs_f64());
            match failure {
                Some(f) => {
                    tracing::info!(query = %query.id, error = f.code.name(), message = %f.message, "query failed")
                }
                None => tracing::info!(query = %query.id, elapsed = ?query.created.elapsed(), "query finished"),
            }
        }
        query.cancel.cancel();
    }

    /// `DELETE` of a `nextUri`: stops the query and forgets it.
    pub fn cancel(&self, id: &str, slug: &str) -> bool {
        let Some(query) = self.find(id, slug) else {
            return false;
        };
        if self.lock().remove(id).is_some() {
            self.metrics.running.dec();
            self.metrics.canceled.inc();
            tracing::info!(query = %id, "query canceled by the client");
        }
        query.entry.end(
            State::Failed,
            Some(&Failure::new(ErrorCode::UserCanceled, "Query was canceled")),
        );
        query.cancel.cancel();
        true
    }

    /// Forgets queries no client has asked about for `client_timeout` (Trino's abandoned
    /// queries), stopping their work.
    pub fn purge_abandoned(&self) {
        let abandoned: Vec<Arc<Query>> = self
            .lock()
            .values()
            .filter(|q| q.touched.lock().unwrap_or_else(|p| p.into_inner()).elapsed() > self.limits.client_timeout)
            .cloned()
            .collect();
        for query in abandoned {
            if self.lock().remove(&query.id).is_some() {
                self.metrics.running.dec();
                self.metrics.abandoned.inc();
                tracing::warn!(query = %query.id, "query abandoned: no client fetched its results");
            }
            query.entry.end(
                State::Failed,
                Some(&Failure::new(
                    ErrorCode::AbandonedQuery,
                    "Query was abandoned: no client fetched its results",
                )),
            );
            query.cancel.cancel();
        }
    }

    /// Stops every query (the drain ran out).
    pub fn cancel_all(&self) {
        let all: Vec<Arc<Query>> = self.lock().drain().map(|(_, q)| q).collect();
        for query in all {
            self.metrics.running.dec();
            query.entry.end(
                State::Failed,
                Some(&Failure::new(
                    ErrorCode::ServerShuttingDown,
                    "the server is shutting down",
                )),
            );
            query.cancel.cancel();
        }
    }

    /// Runs `sql` as a client of its own would (same limits, same history) and gathers its
    /// first `max_rows` rows: the SQL console's way to run a statement.
    pub async fn collect(&self, sql: String, session: Session, max_rows: usize) -> Collected {
        let Started { page, entry, query } =
            self.start(sql, session, Some("query-server console".to_owned()), String::new());
        let id = page.results.id.clone();
        let mut collected = Collected {
            id: id.clone(),
            columns: Vec::new(),
            rows: Vec::new(),
            total_rows: 0,
            failure: None,
        };
        // No query when it was refused (the queue was full): its failure is in `entry`.
        let mut token = 1;
        while let Some(page) = match &query {
            Some(query) => self.page(query, token, self.limits.max_wait).await,
            None => None,
        } {
            let results = &page.results;
            if let Some(columns) = &results.columns {
                collected.columns.clone_from(columns);
            }
            if let Some(data) = &results.data {
                collected.total_rows += data.len() as u64;
                let room = max_rows.saturating_sub(collected.rows.len());
                collected.rows.extend(data.iter().take(room).cloned());
            }
            if results.next_uri.is_none() {
                break;
            }
            token += 1;
        }
        collected.failure = entry.record().failure;
        collected
    }
}

fn info_uri(base_url: &str, id: &str) -> String {
    format!("{base_url}/ui/query.html?{id}")
}

fn next_uri(query: &Query, token: u64) -> String {
    format!(
        "{}/v1/statement/executing/{}/{}/{token}",
        query.base_url, query.id, query.slug
    )
}

/// The response of a query that failed before it started.
pub fn failed_page(id: &str, base_url: &str, failure: &Failure) -> Page {
    Page {
        results: Arc::new(QueryResults {
            id: id.to_owned(),
            info_uri: info_uri(base_url, id),
            next_uri: None,
            columns: None,
            data: None,
            stats: Stats {
                state: State::Failed,
                ..Stats::default()
            },
            error: Some(failure.to_error()),
            warnings: vec![],
            update_type: None,
        }),
        session: SessionUpdate::default(),
    }
}

/// Runs the statement and sends its columns, then its batches, to the pages.
async fn execute(engine: &Engine, sql: &str, session: &Session, entry: &Entry, sender: &mpsc::Sender<Message>) {
    let outcome = match engine.run(sql, session, Some(entry)).await {
        Ok(outcome) => outcome,
        Err(failure) => {
            let _ = sender.send(Message::Failed(failure)).await;
            return;
        }
    };
    let mut columns = protocol::columns(&outcome.stream.schema());
    if let Some(names) = outcome.names {
        for (column, name) in columns.iter_mut().zip(names) {
            column.name = name;
        }
    }
    let start = Message::Start {
        columns,
        session: outcome.session,
        update_type: outcome.update_type,
    };
    if sender.send(start).await.is_err() {
        return;
    }
    let mut stream = outcome.stream;
    while let Some(batch) = stream.next().await {
        let message = match batch {
            Ok(batch) if batch.num_rows() == 0 => continue,
            Ok(batch) => Message::Batch(batch),
            Err(e) => Message::Failed(failure(e)),
        };
        let failed = matches!(message, Message::Failed(_));
        if sender.send(message).await.is_err() || failed {
            return;
        }
    }
}

/// Trino's query id form, `20260108_140000_00001_abcde`: time, sequence, and a random part.
fn query_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed) % 100_000;
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "{}_{sequence:05}_{}",
        chrono::Utc::now().format("%Y%m%d_%H%M%S"),
        &random[..5]
    )
}
