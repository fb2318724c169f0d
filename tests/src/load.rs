//! Load of unique readings against a logging-server, with a ledger of what each answer
//! promised, and the exactly-once tally of a table against that ledger.
//!
//! Every reading sent is unique (city and temperature encode a sequence number), so a
//! duplicate or a loss is seen per reading, not only in totals.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use weather_common::reading::DEMO_CITIES;

use crate::http_get;

/// A reading's identity: city and temperature in hundredths.
pub type Key = (String, i64);

#[derive(Default)]
pub struct Ledger {
    pub sent: u64,
    pub acknowledged: HashSet<Key>,
    /// Answered 503, or cut off by a killed server: maybe stored, maybe not.
    pub unacknowledged: HashSet<Key>,
    pub unavailable: u64,
    pub cut_off: u64,
    /// Any other answer: a failure of the test.
    pub unexpected: Vec<String>,
    pub last_ack: Option<Instant>,
}

/// Clients sending unique readings with `GET /log` as fast as the server answers, with a
/// short pause between requests.
pub struct Load {
    ledger: Arc<Mutex<Ledger>>,
    paused: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: &str, clients: usize) -> Self {
        Self::start_at(addr, clients, 0)
    }

    /// [`Load::start`] with sequence numbers from `first`, so that several loads against one
    /// table send different readings.
    pub fn start_at(addr: &str, clients: usize, first: u64) -> Self {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let (paused, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let sequence = Arc::new(AtomicU64::new(first));
        let workers = (0..clients)
            .map(|_| {
                let (addr, ledger, paused, stop, in_flight, sequence) = (
                    addr.to_owned(),
                    ledger.clone(),
                    paused.clone(),
                    stop.clone(),
                    in_flight.clone(),
                    sequence.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        // Counted in flight before looking at `paused`, so `pause` cannot miss it.
                        in_flight.fetch_add(1, Ordering::SeqCst);
                        if paused.load(Ordering::SeqCst) {
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                        let n = sequence.fetch_add(1, Ordering::SeqCst);
                        let key: Key = (
                            DEMO_CITIES[n as usize % DEMO_CITIES.len()].to_owned(),
                            (n / DEMO_CITIES.len() as u64) as i64 - 10_000,
                        );
                        let target = format!(
                            "/log?city={}&temperature={:.2}",
                            key.0.replace(' ', "%20"),
                            key.1 as f64 / 100.0
                        );
                        let answer = tokio::time::timeout(Duration::from_secs(30), http_get(&addr, &target)).await;
                        if let Ok(mut ledger) = ledger.lock() {
                            ledger.sent += 1;
                            match answer {
                                Ok(Ok(response)) if response.status == 200 => {
                                    ledger.acknowledged.insert(key);
                                    ledger.last_ack = Some(Instant::now());
                                }
                                Ok(Ok(response)) if response.status == 503 => {
                                    ledger.unavailable += 1;
                                    ledger.unacknowledged.insert(key);
                                }
                                Ok(Ok(response)) => {
                                    ledger.unexpected.push(format!("{} {}", response.status, response.body));
                                }
                                // Connection refused or cut: only while the server is killed.
                                Ok(Err(_)) => {
                                    ledger.cut_off += 1;
                                    ledger.unacknowledged.insert(key);
                                }
                                Err(_) => ledger.unexpected.push(format!("no answer in 30 s to {target}")),
                            }
                        }
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            })
            .collect();
        Self {
            ledger,
            paused,
            in_flight,
            stop,
            workers,
        }
    }

    pub async fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    pub fn with<T>(&self, f: impl FnOnce(&Ledger) -> T) -> T {
        f(&self.ledger.lock().expect("ledger"))
    }

    /// Stops the clients once their requests in flight are answered; the final ledger.
    pub async fn stop(self) -> Ledger {
        self.stop.store(true, Ordering::SeqCst);
        for worker in self.workers {
            worker.await.expect("load worker");
        }
        std::mem::take(&mut *self.ledger.lock().expect("ledger"))
    }
}

/// How a table's readings compare with what the load was told.
#[derive(Debug, PartialEq, Eq)]
pub struct Tally {
    /// Readings stored more than once, counting each extra copy.
    pub duplicates: u64,
    /// Acknowledged readings not stored.
    pub lost: usize,
    /// Stored readings nobody sent.
    pub unknown: Vec<Key>,
    /// Stored readings whose request got no 200 (they may or may not be stored).
    pub stored_unacknowledged: usize,
}

impl Tally {
    pub fn of(stored: &[Key], acknowledged: &HashSet<Key>, unacknowledged: &HashSet<Key>) -> Self {
        let mut copies: HashMap<&Key, u64> = HashMap::new();
        for key in stored {
            *copies.entry(key).or_default() += 1;
        }
        Self {
            duplicates: copies.values().map(|c| c - 1).sum(),
            lost: acknowledged.iter().filter(|k| !copies.contains_key(k)).count(),
            unknown: copies
                .keys()
                .filter(|k| !acknowledged.contains(**k) && !unacknowledged.contains(**k))
                .map(|k| (*k).clone())
                .collect(),
            stored_unacknowledged: copies.keys().filter(|k| unacknowledged.contains(**k)).count(),
        }
    }
}

/// Readings per city.
pub fn per_city(readings: &[Key]) -> BTreeMap<String, i64> {
    let mut counts = BTreeMap::new();
    for (city, _) in readings {
        *counts.entry(city.clone()).or_default() += 1;
    }
    counts
}
