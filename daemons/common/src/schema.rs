//! The PostgreSQL schema, from the migrations in `sql/`, applied in order at start-up.

/// `(version, SQL)` in the order they apply. Each is idempotent on its own as well.
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("001_weather", include_str!("../../../sql/001_weather.sql")),
    (
        "002_aggregator_state",
        include_str!("../../../sql/002_aggregator_state.sql"),
    ),
    ("003_log_identity", include_str!("../../../sql/003_log_identity.sql")),
    (
        "004_window_retention",
        include_str!("../../../sql/004_window_retention.sql"),
    ),
    (
        "005_partition_owners",
        include_str!("../../../sql/005_partition_owners.sql"),
    ),
    (
        "006_dead_letter_marks",
        include_str!("../../../sql/006_dead_letter_marks.sql"),
    ),
    ("007_rebuilds", include_str!("../../../sql/007_rebuilds.sql")),
];

/// Arbitrary constant naming the migration lock, so concurrent daemons migrate one at a time.
const MIGRATION_LOCK: i64 = 0x7765_6174_6865_7201;

/// Applies the migrations not applied yet, each recorded in `schema_migrations`.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version TEXT PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await?;
    for (version, sql) in MIGRATIONS {
        let applied = tx
            .query_opt("SELECT 1 FROM schema_migrations WHERE version = $1", &[version])
            .await?
            .is_some();
        if !applied {
            tx.batch_execute(sql).await?;
            tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[version])
                .await?;
            tracing::info!(version, "applied migration");
        }
    }
    tx.commit().await
}

/// Applies every migration again, recorded or not, each being idempotent: what a table dropped
/// since it was recorded needs to exist again (a rebuild of the windows after the loss of the
/// window table). After [`migrate`], which records them.
pub async fn reapply(client: &mut tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    // "already exists, skipping" for each part that is there: expected, not worth a line.
    tx.batch_execute("SET LOCAL client_min_messages = warning").await?;
    for (_, sql) in MIGRATIONS {
        tx.batch_execute(sql).await?;
    }
    tx.commit().await
}
