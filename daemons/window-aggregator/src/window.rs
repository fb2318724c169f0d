//! Event-time tumbling windows per Kafka partition. Pure state: no I/O, so the rules about
//! watermarks and lateness are tested here directly.
//!
//! Every emitted row is a *delta* (sum and count) that the store adds to the row already there,
//! so a window emitted early (idle partition) or updated late (late reading) still ends up
//! exact. Exactly once comes from committing deltas, open windows and offsets together.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Instant,
};

use chrono::{DateTime, TimeDelta, Utc};
use weather_common::WeatherReading;

#[derive(Debug, Clone, Copy)]
pub struct WindowConfig {
    /// Window length.
    pub size: TimeDelta,
    /// Watermark = highest event time seen in the partition minus this.
    pub allowed_lateness: TimeDelta,
    /// A reading for an already emitted window still merges into it if the window ended less
    /// than this before the watermark; older ones are dropped and counted.
    pub max_lateness: TimeDelta,
}

/// The window of length `size` that `ts` falls in, `[start, end)`, aligned to the Unix epoch:
/// the live windows and a rebuild's agree on it.
pub fn window_of(size: TimeDelta, ts: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let millis = size.num_milliseconds().max(1);
    let start_ms = ts.timestamp_millis().div_euclid(millis) * millis;
    let start = DateTime::from_timestamp_millis(start_ms).unwrap_or(ts);
    (start, start + size)
}

/// Sum and count of temperatures; the average is `sum / count`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Agg {
    pub sum: f64,
    pub count: i64,
}

impl Agg {
    pub fn add(&mut self, other: Agg) {
        self.sum += other.sum;
        self.count += other.count;
    }
}

/// A window of one city: `[start, end)`.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowRow {
    pub city: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub agg: Agg,
}

/// Open windows keyed by `(start, city)` → `(end, agg)`. All windows have one size, so start
/// order is end order.
pub type OpenWindows = BTreeMap<(DateTime<Utc>, String), (DateTime<Utc>, Agg)>;
/// Window deltas waiting for the next commit, keyed by `(city, start)` → `(end, agg)`.
type Deltas = HashMap<(String, DateTime<Utc>), (DateTime<Utc>, Agg)>;

/// Per-partition state; what [`Aggregator::take_batch`] persists and a restart loads back.
/// (The partition's Kafka position is the consumer's, committed beside it.)
#[derive(Debug, Clone)]
pub struct PartitionState {
    pub max_event_time: Option<DateTime<Utc>>,
    pub open: OpenWindows,
    last_record: Option<Instant>,
}

impl PartitionState {
    pub fn new(max_event_time: Option<DateTime<Utc>>) -> Self {
        Self {
            max_event_time,
            open: BTreeMap::new(),
            last_record: None,
        }
    }
}

/// What happened to one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Added to an open window.
    Windowed,
    /// Its window was already emitted; merged into the row as a late update.
    Late,
    /// Too late even for a late update: counted, not stored.
    Dropped,
}

/// Everything to commit in one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    /// Deltas to add to `weather` rows.
    pub deltas: Vec<WindowRow>,
    /// Partitions whose offsets and open windows changed, with their full current state.
    pub partitions: Vec<PartitionSnapshot>,
}

/// A partition's state as committed: its event-time high mark and the windows still open.
#[derive(Debug)]
pub struct PartitionSnapshot {
    pub partition: i32,
    pub max_event_time: Option<DateTime<Utc>>,
    pub open: Vec<WindowRow>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty() && self.partitions.is_empty()
    }
}

pub struct Aggregator {
    config: WindowConfig,
    pub partitions: BTreeMap<i32, PartitionState>,
    deltas: Deltas,
    dirty: BTreeSet<i32>,
}

impl Aggregator {
    pub fn new(config: WindowConfig, partitions: BTreeMap<i32, PartitionState>) -> Self {
        Self {
            config,
            partitions,
            deltas: HashMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// The window `ts` falls in, aligned to the Unix epoch.
    pub fn window_of(&self, ts: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        window_of(self.config.size, ts)
    }

    /// Applies a reading of `partition`.
    pub fn apply(&mut self, partition: i32, reading: &WeatherReading, now: Instant) -> Outcome {
        let (start, end) = self.window_of(reading.ts);
        let config = self.config;
        let state = self
            .partitions
            .entry(partition)
            .or_insert_with(|| PartitionState::new(None));
        self.dirty.insert(partition);
        state.last_record = Some(now);
        let watermark = state.max_event_time.map(|max| max - config.allowed_lateness);
        let agg = Agg {
            sum: reading.temperature,
            count: 1,
        };
        let key = (start, reading.city.clone());
        let outcome = match watermark {
            // The window was emitted already (or never opened before the watermark passed it).
            Some(watermark) if end <= watermark && !state.open.contains_key(&key) => {
                if end + config.max_lateness > watermark {
                    add_delta(&mut self.deltas, &reading.city, start, end, agg);
                    Outcome::Late
                } else {
                    Outcome::Dropped
                }
            }
            _ => {
                state.open.entry(key).or_insert((end, Agg::default())).1.add(agg);
                Outcome::Windowed
            }
        };
        if state.max_event_time.is_none_or(|max| reading.ts > max) {
            state.max_event_time = Some(reading.ts);
            let watermark = reading.ts - config.allowed_lateness;
            emit_until(&mut state.open, &mut self.deltas, |end| end <= watermark);
        }
        outcome
    }

    /// Emits the windows of partitions that received nothing for `idle` and whose end is more
    /// than the allowed lateness in the past (wall clock): a quiet partition must not hold its
    /// last windows open forever.
    pub fn close_idle(&mut self, wall: DateTime<Utc>, now: Instant, idle: std::time::Duration) -> usize {
        let cutoff = wall - self.config.allowed_lateness;
        let mut emitted = 0;
        for (partition, state) in &mut self.partitions {
            let quiet = state.last_record.is_none_or(|last| now.duration_since(last) >= idle);
            if quiet && state.open.first_key_value().is_some_and(|(_, (end, _))| *end <= cutoff) {
                emitted += emit_until(&mut state.open, &mut self.deltas, |end| end <= cutoff);
                self.dirty.insert(*partition);
            }
        }
        emitted
    }

    /// Forgets event-time high marks later than `limit`: a reading from a clock far in the
    /// future (stored before such readings were refused) would otherwise hold every later
    /// reading as too late, across restarts. Returns how many partitions were repaired.
    pub fn repair_future_watermarks(&mut self, limit: DateTime<Utc>) -> usize {
        let mut repaired = 0;
        for (partition, state) in &mut self.partitions {
            if state.max_event_time.is_some_and(|max| max > limit) {
                state.max_event_time = None;
                self.dirty.insert(*partition);
                repaired += 1;
            }
        }
        repaired
    }

    /// Adds the state of partitions this instance took over.
    pub fn insert_partitions(&mut self, partitions: BTreeMap<i32, PartitionState>) {
        self.partitions.extend(partitions);
    }

    /// Forgets partitions handed to another instance (after their last commit).
    pub fn remove_partitions(&mut self, partitions: &[i32]) {
        for partition in partitions {
            self.partitions.remove(partition);
            self.dirty.remove(partition);
        }
    }

    /// Number of window deltas waiting for the next commit.
    pub fn pending_rows(&self) -> usize {
        self.deltas.len()
    }

    /// Takes what changed since the last batch.
    pub fn take_batch(&mut self) -> Batch {
        let mut deltas: Vec<WindowRow> = self
            .deltas
            .drain()
            .map(|((city, start), (end, agg))| WindowRow { city, start, end, agg })
            .collect();
        // Every instance upserts rows in one order, so two of them never wait on each other's
        // rows in a cycle (a deadlock) should the same city reach both.
        deltas.sort_unstable_by(|a, b| (&a.city, a.start).cmp(&(&b.city, b.start)));
        let partitions = std::mem::take(&mut self.dirty)
            .into_iter()
            .filter_map(|p| {
                let state = self.partitions.get(&p)?;
                let open = state
                    .open
                    .iter()
                    .map(|((start, city), (end, agg))| WindowRow {
                        city: city.clone(),
                        start: *start,
                        end: *end,
                        agg: *agg,
                    })
                    .collect();
                Some(PartitionSnapshot {
                    partition: p,
                    max_event_time: state.max_event_time,
                    open,
                })
            })
            .collect();
        Batch { deltas, partitions }
    }
}

fn add_delta(deltas: &mut Deltas, city: &str, start: DateTime<Utc>, end: DateTime<Utc>, agg: Agg) {
    deltas
        .entry((city.to_owned(), start))
        .or_insert((end, Agg::default()))
        .1
        .add(agg);
}

/// Moves the open windows whose end satisfies `due` (a prefix, in start order) to `deltas`.
fn emit_until(open: &mut OpenWindows, deltas: &mut Deltas, due: impl Fn(DateTime<Utc>) -> bool) -> usize {
    let mut emitted = 0;
    while let Some(entry) = open.first_entry() {
        if !due(entry.get().0) {
            break;
        }
        let ((start, city), (end, agg)) = entry.remove_entry();
        add_delta(deltas, &city, start, end, agg);
        emitted += 1;
    }
    emitted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> WindowConfig {
        WindowConfig {
            size: TimeDelta::seconds(5),
            allowed_lateness: TimeDelta::seconds(2),
            max_lateness: TimeDelta::seconds(60),
        }
    }

    fn at(seconds: f64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis((1_800_000_000.0 * 1000.0 + seconds * 1000.0) as i64).expect("ts")
    }

    fn reading(city: &str, temperature: f64, seconds: f64) -> WeatherReading {
        WeatherReading {
            city: city.into(),
            temperature,
            ts: at(seconds),
        }
    }

    fn rows(batch: &Batch) -> Vec<(String, f64, f64, i64)> {
        let base = at(0.0);
        let mut rows: Vec<_> = batch
            .deltas
            .iter()
            .map(|r| {
                (
                    r.city.clone(),
                    (r.start - base).as_seconds_f64(),
                    r.agg.sum,
                    r.agg.count,
                )
            })
            .collect();
        rows.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        rows
    }

    #[test]
    fn window_closes_when_watermark_passes_its_end() {
        let mut agg = Aggregator::new(config(), BTreeMap::new());
        let now = Instant::now();
        assert_eq!(agg.apply(0, &reading("A", 10.0, 1.0), now), Outcome::Windowed);
        assert_eq!(agg.apply(0, &reading("A", 20.0, 4.0), now), Outcome::Windowed);
        // 6.9 - 2 = 4.9 < 5: still open.
        assert_eq!(agg.apply(0, &reading("A", 30.0, 6.9), now), Outcome::Windowed);
        assert_eq!(agg.pending_rows(), 0);
        // Out of order but the window is still open: counted in it.
        assert_eq!(agg.apply(0, &reading("A", 60.0, 3.0), now), Outcome::Windowed);
        agg.apply(0, &reading("A", 1.0, 7.0), now);
        let batch = agg.take_batch();
        assert_eq!(rows(&batch), vec![("A".into(), 0.0, 90.0, 3)]);
        assert_eq!(batch.partitions.len(), 1);
        let snapshot = &batch.partitions[0];
        assert_eq!(snapshot.partition, 0);
        assert_eq!(snapshot.max_event_time, Some(at(7.0)));
        assert_eq!(snapshot.open.len(), 1, "window [5, 10) is still open");
        assert_eq!(snapshot.open[0].agg, Agg { sum: 31.0, count: 2 });
    }

    #[test]
    fn late_readings_merge_within_max_lateness_and_drop_beyond() {
        let mut agg = Aggregator::new(config(), BTreeMap::new());
        let now = Instant::now();
        agg.apply(0, &reading("A", 10.0, 1.0), now);
        agg.apply(0, &reading("A", 10.0, 30.0), now); // watermark 28: [0,5) emitted
        assert_eq!(agg.apply(0, &reading("A", 50.0, 2.0), now), Outcome::Late);
        // A window never opened before the watermark passed it is late as well.
        assert_eq!(agg.apply(0, &reading("A", 7.0, 12.0), now), Outcome::Late);
        agg.apply(0, &reading("A", 10.0, 100.0), now); // watermark 98
        // [0,5) ended 93 s before the watermark: more than a minute.
        assert_eq!(agg.apply(0, &reading("A", 99.0, 4.0), now), Outcome::Dropped);
        let batch = agg.take_batch();
        assert_eq!(
            rows(&batch),
            vec![
                ("A".into(), 0.0, 60.0, 2),
                ("A".into(), 10.0, 7.0, 1),
                ("A".into(), 30.0, 10.0, 1)
            ]
        );
    }

    #[test]
    fn partitions_keep_their_own_watermark() {
        let mut agg = Aggregator::new(config(), BTreeMap::new());
        let now = Instant::now();
        agg.apply(0, &reading("A", 1.0, 1.0), now);
        agg.apply(1, &reading("B", 1.0, 100.0), now);
        // Partition 1 racing ahead does not make partition 0's readings late.
        assert_eq!(agg.apply(0, &reading("A", 1.0, 2.0), now), Outcome::Windowed);
    }

    #[test]
    fn a_watermark_in_the_future_is_repaired() {
        let mut partitions = BTreeMap::new();
        partitions.insert(0, PartitionState::new(Some(at(1_000_000.0))));
        partitions.insert(1, PartitionState::new(Some(at(10.0))));
        let mut agg = Aggregator::new(config(), partitions);
        let now = Instant::now();
        // Poisoned: a reading of now is dropped as too late.
        assert_eq!(agg.apply(0, &reading("A", 1.0, 20.0), now), Outcome::Dropped);
        assert_eq!(agg.repair_future_watermarks(at(100.0)), 1);
        assert_eq!(agg.partitions[&1].max_event_time, Some(at(10.0)), "a sane one is kept");
        assert_eq!(agg.apply(0, &reading("A", 1.0, 20.0), now), Outcome::Windowed);
        assert!(agg.take_batch().partitions.iter().any(|p| p.partition == 0));
    }

    #[test]
    fn idle_partitions_emit_windows_past_the_wall_clock() {
        let mut agg = Aggregator::new(config(), BTreeMap::new());
        let start = Instant::now();
        agg.apply(0, &reading("A", 5.0, 1.0), start);
        agg.apply(0, &reading("A", 5.0, 6.0), start);
        let idle = std::time::Duration::from_secs(3);
        // Not quiet long enough yet.
        assert_eq!(agg.close_idle(at(60.0), start, idle), 0);
        // Quiet: every window that ended before wall clock minus allowed lateness is emitted.
        assert_eq!(agg.close_idle(at(9.0), start + idle, idle), 1);
        assert_eq!(agg.close_idle(at(60.0), start + idle, idle), 1);
        assert_eq!(rows(&agg.take_batch()).len(), 2);
    }

    #[test]
    fn windows_align_to_the_epoch_for_any_timestamp() {
        let agg = Aggregator::new(config(), BTreeMap::new());
        let (start, end) = agg.window_of(at(7.123));
        assert_eq!((start, end), (at(5.0), at(10.0)));
        let before_epoch = DateTime::from_timestamp_millis(-1).expect("ts");
        assert_eq!(agg.window_of(before_epoch).0.timestamp_millis(), -5000);
    }
}
