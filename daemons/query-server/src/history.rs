//! What the server remembers of recent queries, for its web UI and Trino's `/v1/query`: the
//! last `capacity` of them, newest first, each query's text capped in size. Nothing here grows
//! without bound, however many queries run.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};

use crate::protocol::{Failure, State};

/// One query as the UI shows it.
#[derive(Debug, Clone)]
pub struct Record {
    pub id: String,
    pub state: State,
    /// The SQL, cut at the history's limit (`sql_truncated` then says so).
    pub sql: String,
    pub sql_truncated: bool,
    pub user: String,
    pub source: Option<String>,
    pub catalog: Option<String>,
    pub schema: Option<String>,
    pub created: DateTime<Utc>,
    pub created_at: Instant,
    /// From submission until the engine had planned it and it began to run.
    pub planning: Option<Duration>,
    /// From submission until its last page, or its failure or cancellation.
    pub ended: Option<Duration>,
    pub ended_at: Option<DateTime<Utc>>,
    /// Rows and pages sent.
    pub rows: u64,
    pub pages: u64,
    /// What the table scans read: data files planned of the snapshot's, their rows and bytes,
    /// and the filter pushed down to Iceberg.
    pub files_scanned: u64,
    pub rows_scanned: u64,
    pub bytes_scanned: u64,
    pub files_total: u64,
    pub filter: Option<String>,
    /// The physical plan, as `EXPLAIN` prints it (cut at the history's limit).
    pub plan: Option<String>,
    pub failure: Option<Failure>,
    /// The column names, once known.
    pub columns: Vec<String>,
}

impl Record {
    /// Time since submission: to its end, or to now while it runs.
    pub fn elapsed(&self) -> Duration {
        self.ended.unwrap_or_else(|| self.created_at.elapsed())
    }

    /// Time it ran after planning.
    pub fn running(&self) -> Option<Duration> {
        self.planning.map(|planning| self.elapsed().saturating_sub(planning))
    }
}

/// The recent queries.
#[derive(Debug)]
pub struct History {
    records: Mutex<VecDeque<Arc<Mutex<Record>>>>,
    capacity: usize,
    max_text: usize,
}

impl History {
    /// Remembers the last `capacity` queries, their SQL and plan cut at `max_text` bytes.
    pub fn new(capacity: usize, max_text: usize) -> Self {
        Self {
            records: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity,
            max_text,
        }
    }

    /// Notes a query just submitted (forgetting the oldest beyond the capacity) and returns its
    /// entry, which the query updates as it goes.
    pub fn begin(&self, id: &str, sql: &str, user: &str, source: Option<String>) -> Entry {
        let (sql, sql_truncated) = cut(sql, self.max_text);
        let record = Arc::new(Mutex::new(Record {
            id: id.to_owned(),
            state: State::Queued,
            sql,
            sql_truncated,
            user: user.to_owned(),
            source,
            catalog: None,
            schema: None,
            created: Utc::now(),
            created_at: Instant::now(),
            planning: None,
            ended: None,
            ended_at: None,
            rows: 0,
            pages: 0,
            files_scanned: 0,
            rows_scanned: 0,
            bytes_scanned: 0,
            files_total: 0,
            filter: None,
            plan: None,
            failure: None,
            columns: Vec::new(),
        }));
        if self.capacity > 0 {
            let mut records = lock(&self.records);
            records.push_front(record.clone());
            records.truncate(self.capacity);
        }
        Entry {
            record,
            max_text: self.max_text,
        }
    }

    /// The queries remembered, newest first.
    pub fn list(&self) -> Vec<Record> {
        lock(&self.records).iter().map(|r| lock(r).clone()).collect()
    }

    pub fn get(&self, id: &str) -> Option<Record> {
        let records = lock(&self.records);
        let record = records.iter().find(|r| lock(r).id == id)?;
        Some(lock(record).clone())
    }
}

/// A query's place in the history.
#[derive(Debug, Clone)]
pub struct Entry {
    record: Arc<Mutex<Record>>,
    max_text: usize,
}

impl Entry {
    pub fn update(&self, change: impl FnOnce(&mut Record)) {
        change(&mut lock(&self.record));
    }

    /// The query as it stands.
    pub fn record(&self) -> Record {
        lock(&self.record).clone()
    }

    /// Notes the plan's text, cut at the history's limit.
    pub fn set_plan(&self, plan: &str) {
        let (plan, _) = cut(plan, self.max_text);
        self.update(|r| r.plan = Some(plan));
    }

    /// Notes its end in `state` (with `failure`), once.
    pub fn end(&self, state: State, failure: Option<&Failure>) {
        self.update(|r| {
            if r.ended.is_none() {
                r.state = state;
                r.ended = Some(r.created_at.elapsed());
                r.ended_at = Some(Utc::now());
                r.failure = failure.cloned();
            }
        });
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves data that is still whole.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `text` cut to at most `max` bytes on a character boundary, and whether it was cut.
fn cut(text: &str, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text.to_owned(), false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (text[..end].to_owned(), true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    #[test]
    fn only_the_last_queries_are_kept_newest_first() {
        let history = History::new(3, 100);
        for i in 0..10 {
            history.begin(&format!("q{i}"), "SELECT 1", "alice", None);
        }
        let ids: Vec<String> = history.list().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["q9", "q8", "q7"]);
        assert!(history.get("q6").is_none());
        assert!(History::new(0, 100).list().is_empty());
    }

    #[test]
    fn long_texts_are_cut_on_a_character_boundary() {
        let history = History::new(3, 10);
        let entry = history.begin("q", "SELECT 'ééééééé'", "alice", None);
        let record = history.get("q").expect("kept");
        assert!(record.sql_truncated);
        assert!(record.sql.len() <= 10, "{}", record.sql);
        assert!("SELECT 'ééééééé'".starts_with(&record.sql));
        entry.set_plan(&"x".repeat(1000));
        assert_eq!(history.get("q").and_then(|r| r.plan).map(|p| p.len()), Some(10));
    }

    #[test]
    fn a_query_ends_once() {
        let history = History::new(3, 100);
        let entry = history.begin("q", "SELECT x", "alice", Some("trino-python-client".into()));
        entry.end(
            State::Failed,
            Some(&Failure::new(
                ErrorCode::ColumnNotFound,
                "Column 'x' cannot be resolved",
            )),
        );
        entry.end(State::Finished, None);
        let record = history.get("q").expect("kept");
        assert_eq!(record.state, State::Failed);
        assert_eq!(record.failure.map(|f| f.code), Some(ErrorCode::ColumnNotFound));
        assert!(record.ended.is_some());
    }
}
