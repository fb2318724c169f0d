//! `window-aggregator rebuild`: the windows recomputed from the Iceberg table, which keeps every
//! reading for good where Kafka keeps them for its retention. For a lost or damaged window
//! table, a new window size, or a fixed aggregator.
//!
//! Exactly once: a snapshot of the table holds exactly the readings before the Kafka checkpoints
//! its summary records (the sink commits them together). The rebuild writes that snapshot's
//! windows and sets every partition's checkpoint to the snapshot's, in one PostgreSQL
//! transaction ([`Replace`]); the aggregator then reads on from there. Readings that the live
//! aggregator dropped as too late are in the table, and so in the rebuilt windows.
//!
//! Bounded: files are read an hour partition at a time, in order, and a window is written as
//! soon as no later hour can add to it, so memory holds about one hour's windows.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Context;
use arrow_array::{
    Array, RecordBatch,
    cast::AsArray,
    types::{Float64Type, TimestampMicrosecondType},
};
use chrono::{DateTime, TimeDelta, Utc};
use futures::{StreamExt, TryStreamExt};
use iceberg::{TableIdent, expr::Reference, scan::FileScanTask, spec::Datum, table::Table};
use weather_common::{
    consumer::Checkpoints,
    kafka::WEATHER_TOPIC,
    lakehouse::{self, CatalogArgs},
    snapshot_summary::{self, Lineage},
};

use crate::{
    store::Store,
    window::{Agg, WindowRow, window_of},
};

/// `window-aggregator rebuild`'s flags.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "window-aggregator rebuild",
    about = "Rebuilds the PostgreSQL windows from the Iceberg table, exactly, and sets the aggregator to read on \
             from the table's Kafka checkpoints. Safe while aggregators run: they take the rebuilt state over."
)]
pub struct RebuildArgs {
    #[command(flatten)]
    pub windows: crate::WindowArgs,

    /// Topic whose checkpoints the table records.
    #[arg(long, env = "KAFKA_TOPIC", default_value = WEATHER_TOPIC)]
    pub topic: String,

    /// The snapshot to rebuild from (default: the table's current one).
    #[arg(long)]
    pub snapshot: Option<i64>,

    /// Also the windows older than --retention (which the running aggregator deletes again
    /// unless it runs with --retention 0 too).
    #[arg(long)]
    pub all: bool,

    #[command(flatten)]
    pub catalog: CatalogArgs,

    /// Waits this long before committing, every partition taken over: for tests of a rebuild
    /// killed halfway.
    #[arg(long, hide = true, value_parser = humantime::parse_duration)]
    pub hold_before_commit: Option<Duration>,
}

/// Rebuilds the windows and sets the checkpoints, in one transaction.
pub async fn rebuild(args: &RebuildArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let size = TimeDelta::from_std(args.windows.window).context("--window too large")?;
    anyhow::ensure!(size >= TimeDelta::milliseconds(1), "--window must be at least 1ms");
    let cutoff = match args.all || args.windows.retention.is_zero() {
        true => None,
        false => Some(Utc::now() - TimeDelta::from_std(args.windows.retention).context("--retention too large")?),
    };

    let config = args.catalog.config()?;
    let catalog = config
        .connect()
        .await
        .with_context(|| format!("connecting to the Iceberg catalog at {}", config.shown_url()))?;
    let ident = TableIdent::from_strs([args.catalog.namespace.as_str(), args.catalog.table.as_str()])?;
    let table = catalog
        .load_table(&ident)
        .await
        .with_context(|| format!("loading the table {ident}"))?;
    let snapshot = args.snapshot.or(table.metadata().current_snapshot_id());
    let checkpoints = match snapshot {
        Some(id) => checkpoints_at(&table, id, &args.topic)?,
        None => Checkpoints::new(),
    };
    let groups = match snapshot {
        Some(id) => hour_groups(&table, id, cutoff).await?,
        None => Vec::new(),
    };
    tracing::info!(
        snapshot = ?snapshot,
        hours = groups.len(),
        files = groups.iter().map(|g| g.tasks.len()).sum::<usize>(),
        from = ?cutoff,
        partitions = checkpoints.len(),
        "rebuilding the windows from the Iceberg table"
    );

    let mut store = Store::connect(&args.windows.database_url, &args.topic)
        .await
        .context("connecting to PostgreSQL")?;
    let mut replace = store.replace(&checkpoints).await?;
    let mut windows = Hours::new(size, cutoff);
    let mut readings = 0;
    let total = groups.len();
    for (done, group) in groups.iter().enumerate() {
        let mut batches = table
            .reader_builder()
            .build()
            .read(futures::stream::iter(group.tasks.clone().into_iter().map(Ok)).boxed())?
            .stream();
        while let Some(batch) = batches.try_next().await? {
            readings += windows.add(&batch)?;
        }
        // Every later group's readings are from its hour on.
        let next = groups.get(done + 1).and_then(|g| g.hour).map(hour_start);
        replace.insert(&windows.finished_before(next)).await?;
        let seconds = started.elapsed().as_secs_f64().max(1e-3);
        tracing::info!(
            hour = %group.hour.map_or_else(|| "unpartitioned".to_owned(), |h| hour_start(h).to_rfc3339()),
            done = done + 1,
            of = total,
            readings,
            readings_per_second = (readings as f64 / seconds).round(),
            "rebuilt an hour"
        );
    }
    replace.insert(&windows.finished_before(None)).await?;
    if let Some(hold) = args.hold_before_commit {
        tracing::info!(?hold, "holding before the commit");
        tokio::time::sleep(hold).await;
    }
    let written = replace.windows;
    replace.finish(&checkpoints).await.context("committing the rebuild")?;
    tracing::info!(
        snapshot = ?snapshot,
        readings,
        windows = written,
        seconds = started.elapsed().as_secs_f64(),
        "windows rebuilt; aggregators read on from the table's checkpoints"
    );
    Ok(())
}

/// The checkpoints of `topic` the snapshot's line records, which its readings are exactly the
/// ones before. Fails closed when the line is broken: what the table holds is then not known.
fn checkpoints_at(table: &Table, snapshot: i64, topic: &str) -> anyhow::Result<Checkpoints> {
    anyhow::ensure!(
        table.metadata().snapshot_by_id(snapshot).is_some(),
        "snapshot {snapshot} is not in the table's metadata"
    );
    match snapshot_summary::lineage(&table.metadata_ref(), snapshot, topic)? {
        Lineage::Recorded { checkpoints, .. } => Ok(checkpoints),
        Lineage::Unrecorded => Ok(Checkpoints::new()),
        Lineage::Broken { oldest } => anyhow::bail!(
            "cannot tell which Kafka records snapshot {snapshot} holds: the parent of snapshot {oldest} was \
             expired before any snapshot on its line recorded the checkpoints of {topic}; rebuild from a newer \
             snapshot (--snapshot) whose line records them"
        ),
    }
}

/// Files of one hour partition (`None`: files whose hour is not known, read first).
struct HourGroup {
    hour: Option<i32>,
    tasks: Vec<FileScanTask>,
}

/// The files of the snapshot with readings from `cutoff` on, by hour partition, in order.
async fn hour_groups(table: &Table, snapshot: i64, cutoff: Option<DateTime<Utc>>) -> anyhow::Result<Vec<HourGroup>> {
    let mut scan = table.scan().snapshot_id(snapshot).select(["city", "temperature", "ts"]);
    if let Some(cutoff) = cutoff {
        scan = scan.with_filter(
            Reference::new("ts").greater_than_or_equal_to(Datum::timestamptz_micros(cutoff.timestamp_micros())),
        );
    }
    let tasks: Vec<FileScanTask> = scan.build()?.plan_files().await?.try_collect().await?;
    let position = table
        .metadata()
        .current_schema()
        .field_by_name("ts")
        .and_then(|ts| lakehouse::hour_partition(table.metadata(), ts.id));
    let mut groups: BTreeMap<Option<i32>, Vec<FileScanTask>> = BTreeMap::new();
    for task in tasks {
        let hour = position.and_then(|p| lakehouse::file_hour(&task, p));
        groups.entry(hour).or_default().push(task);
    }
    Ok(groups
        .into_iter()
        .map(|(hour, tasks)| HourGroup { hour, tasks })
        .collect())
}

/// The start of an hour partition (hours since the epoch).
fn hour_start(hour: i32) -> DateTime<Utc> {
    DateTime::UNIX_EPOCH + TimeDelta::hours(i64::from(hour))
}

/// The windows being summed, keyed by `(start, city)`: pure, so the order rules are tested here.
struct Hours {
    size: TimeDelta,
    /// Windows starting before it are not rebuilt (the retention).
    cutoff: Option<DateTime<Utc>>,
    open: BTreeMap<(DateTime<Utc>, String), Agg>,
}

impl Hours {
    fn new(size: TimeDelta, cutoff: Option<DateTime<Utc>>) -> Self {
        Self {
            size,
            cutoff,
            open: BTreeMap::new(),
        }
    }

    /// Adds a batch of the table's rows (`city`, `temperature`, `ts`); returns the readings
    /// counted.
    fn add(&mut self, batch: &RecordBatch) -> anyhow::Result<u64> {
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .with_context(|| format!("no column {name} in the table"))
        };
        let city = arrow_cast::cast(column("city")?, &arrow_schema::DataType::Utf8)?;
        let city = city.as_string::<i32>();
        let temperature = column("temperature")?
            .as_primitive_opt::<Float64Type>()
            .context("temperature is not a double")?;
        let ts = column("ts")?
            .as_primitive_opt::<TimestampMicrosecondType>()
            .context("ts is not a timestamp in microseconds")?;
        let mut counted = 0;
        for row in 0..batch.num_rows() {
            if city.is_null(row) || temperature.is_null(row) || ts.is_null(row) {
                continue;
            }
            let Some(at) = DateTime::from_timestamp_micros(ts.value(row)) else {
                continue;
            };
            counted += u64::from(self.add_reading(city.value(row), temperature.value(row), at));
        }
        Ok(counted)
    }

    /// Adds one reading; false when its window is before the cutoff.
    fn add_reading(&mut self, city: &str, temperature: f64, ts: DateTime<Utc>) -> bool {
        let (start, _) = window_of(self.size, ts);
        if self.cutoff.is_some_and(|cutoff| start < cutoff) {
            return false;
        }
        let agg = Agg {
            sum: temperature,
            count: 1,
        };
        self.open.entry((start, city.to_owned())).or_default().add(agg);
        true
    }

    /// Takes the windows that end by `next` (every one when `None`): no reading from `next` on
    /// can fall in them.
    fn finished_before(&mut self, next: Option<DateTime<Utc>>) -> Vec<WindowRow> {
        let kept = match next {
            // Windows start in order of their ends (one size): split at the first one that
            // ends after `next`.
            Some(next) => self
                .open
                .split_off(&(next - self.size + TimeDelta::microseconds(1), String::new())),
            None => BTreeMap::new(),
        };
        std::mem::replace(&mut self.open, kept)
            .into_iter()
            .map(|((start, city), agg)| WindowRow {
                city,
                start,
                end: start + self.size,
                agg,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: f64) -> DateTime<Utc> {
        DateTime::from_timestamp_micros((seconds * 1e6) as i64).expect("in range")
    }

    #[test]
    fn a_window_is_written_once_no_later_hour_can_add_to_it() {
        let mut hours = Hours::new(TimeDelta::seconds(5), None);
        assert!(hours.add_reading("Oslo", 1.0, at(3_598.0)));
        assert!(hours.add_reading("Oslo", 3.0, at(3_599.9)));
        assert!(hours.add_reading("Rome", 10.0, at(3_595.0)));
        // Read out of order within the hour: still one window each.
        assert!(hours.add_reading("Oslo", 2.0, at(3_596.0)));
        let written = hours.finished_before(Some(hour_start(1)));
        assert_eq!(written.len(), 2, "{written:?}");
        assert_eq!(
            written[0],
            WindowRow {
                city: "Oslo".into(),
                start: at(3_595.0),
                end: at(3_600.0),
                agg: Agg { sum: 6.0, count: 3 },
            }
        );
        assert!(hours.finished_before(None).is_empty());
    }

    #[test]
    fn a_window_across_an_hour_waits_for_the_next_hour() {
        // 7-second windows do not divide an hour: [3591, 3598) ends in hour 0 but [3598, 3605)
        // spans into hour 1.
        let mut hours = Hours::new(TimeDelta::seconds(7), None);
        hours.add_reading("Oslo", 1.0, at(3_592.0));
        hours.add_reading("Oslo", 2.0, at(3_599.0));
        let written = hours.finished_before(Some(hour_start(1)));
        assert_eq!(written.iter().map(|w| w.start).collect::<Vec<_>>(), [at(3_591.0)]);
        hours.add_reading("Oslo", 4.0, at(3_601.0));
        let rest = hours.finished_before(None);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].agg, Agg { sum: 6.0, count: 2 });
        assert_eq!(rest[0].end, at(3_605.0));
    }

    #[test]
    fn windows_before_the_cutoff_are_not_rebuilt() {
        let mut hours = Hours::new(TimeDelta::seconds(5), Some(at(100.0)));
        assert!(!hours.add_reading("Oslo", 1.0, at(99.9)));
        assert!(hours.add_reading("Oslo", 1.0, at(100.0)));
        // A window that starts before the cutoff is left out whole, not in part.
        let mut hours = Hours::new(TimeDelta::seconds(5), Some(at(102.0)));
        assert!(!hours.add_reading("Oslo", 1.0, at(103.0)));
        assert_eq!(hours.finished_before(None), []);
    }
}
