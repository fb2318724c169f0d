//! The windows rebuilt from a day's table (`window-aggregator rebuild --all`, the release
//! binary): readings per second and the process's peak memory, which a rebuild keeps to about
//! one hour's windows whatever the table's size.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use weather_testkit::{Postgres, connect, workspace_binary};

use crate::Row;

/// Rebuilds into a new database of `postgres` from the table in `catalog_url`/`warehouse`,
/// which holds `readings`.
pub(crate) async fn measure(
    postgres: &Postgres,
    catalog_url: &str,
    warehouse: &str,
    readings: usize,
    table_note: &str,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let database_url = postgres.create_database("weather").await?;
    let started = Instant::now();
    let mut child = Command::new(workspace_binary("window-aggregator"))
        .args(["rebuild", "--all"])
        .env("DATABASE_URL", &database_url)
        .env("CATALOG_URL", catalog_url)
        .env("WAREHOUSE", warehouse)
        .env("RUST_LOG", "warn")
        .spawn()?;
    // VmHWM only grows: its last reading before the exit is the peak, give or take 20 ms.
    let mut peak: f64 = 0.0;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        peak = peak.max(crate::peak_rss_mib(child.id()));
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed().as_secs_f64();
    anyhow::ensure!(status.success(), "window-aggregator rebuild: {status}");
    let client = connect(&database_url).await?;
    let row = client
        .query_one("SELECT count(*), sum(record_count)::int8 FROM weather", &[])
        .await?;
    let (windows, counted): (i64, i64) = (row.get(0), row.get(1));
    anyhow::ensure!(
        counted == readings as i64,
        "the rebuilt windows count {counted} readings of the table's {readings}"
    );
    rows.push(Row {
        what: format!("Windows rebuilt from the table, `window-aggregator rebuild --all` ({table_note})"),
        value: format!(
            "{counted} readings into {windows} windows in {elapsed:.2} s ({:.0} readings/s, one PostgreSQL \
             transaction included); peak RSS {peak:.0} MiB",
            counted as f64 / elapsed
        ),
    });
    Ok(())
}
