//! The Iceberg catalog, opened the same way by every daemon that reads or writes the table:
//! its flags, the S3 credentials and the SQL catalog.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use anyhow::Context;
use iceberg::{Catalog, CatalogBuilder};
use iceberg_catalog_sql::{SqlBindStyle, SqlCatalogBuilder};
use iceberg_storage_opendal::OpenDalResolvingStorageFactory;

/// Where the table is: catalog, warehouse, S3.
#[derive(clap::Args, Debug, Clone)]
pub struct CatalogArgs {
    /// Iceberg SQL catalog: `postgresql://…` (shared with Trino and PyIceberg) or `sqlite://…`.
    #[arg(long, env = "CATALOG_URL", default_value = "postgresql://postgres@localhost/iceberg")]
    pub catalog_url: String,

    /// Catalog name (the `catalog_name` column of the catalog tables).
    #[arg(long, env = "CATALOG_NAME", default_value = "weather")]
    pub catalog_name: String,

    /// Where new tables go: `s3://bucket/prefix` or `file:///path`.
    #[arg(long, env = "WAREHOUSE", default_value = "s3://warehouse/")]
    pub warehouse: String,

    /// Namespace of the table.
    #[arg(long, env = "ICEBERG_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Table name.
    #[arg(long, env = "ICEBERG_TABLE", default_value = "weather")]
    pub table: String,

    /// S3 endpoint for S3-compatible servers (MinIO, Garage, …); empty for AWS.
    #[arg(long, env = "S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// S3 region.
    #[arg(long, env = "S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,

    /// Path-style S3 URLs (`endpoint/bucket/key`), which most S3-compatible servers need.
    #[arg(long, env = "S3_PATH_STYLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub s3_path_style: bool,

    /// File with `AWS_ACCESS_KEY_ID=…` and `AWS_SECRET_ACCESS_KEY=…` lines (for systemd
    /// credentials); otherwise those environment variables are used.
    #[arg(long, env = "S3_CREDENTIALS_FILE")]
    pub s3_credentials_file: Option<PathBuf>,
}

impl CatalogArgs {
    /// Catalog settings with S3 credentials resolved from the file or the environment.
    pub fn config(&self) -> anyhow::Result<CatalogConfig> {
        let mut storage = HashMap::new();
        if let Some(endpoint) = &self.s3_endpoint {
            storage.insert("s3.endpoint".to_owned(), endpoint.clone());
        }
        storage.insert("s3.region".to_owned(), self.s3_region.clone());
        storage.insert("s3.path-style-access".to_owned(), self.s3_path_style.to_string());
        let mut credentials: HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k == "AWS_ACCESS_KEY_ID" || k == "AWS_SECRET_ACCESS_KEY")
            .collect();
        if let Some(path) = &self.s3_credentials_file {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            for line in text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
            {
                let (key, value) = line
                    .split_once('=')
                    .with_context(|| format!("{}: lines must be KEY=VALUE", path.display()))?;
                credentials.insert(key.trim().to_owned(), value.trim().to_owned());
            }
        }
        if let Some(key) = credentials.get("AWS_ACCESS_KEY_ID") {
            storage.insert("s3.access-key-id".to_owned(), key.clone());
        }
        if let Some(secret) = credentials.get("AWS_SECRET_ACCESS_KEY") {
            storage.insert("s3.secret-access-key".to_owned(), secret.clone());
        }
        Ok(CatalogConfig {
            url: self.catalog_url.clone(),
            name: self.catalog_name.clone(),
            warehouse: self.warehouse.clone(),
            storage,
        })
    }
}

/// What the catalog needs to know; built from [`CatalogArgs`].
#[derive(Debug, Clone)]
pub struct CatalogConfig {
    /// `postgresql://…` or `sqlite://…` (the JDBC catalog layout: `iceberg_tables`,
    /// `iceberg_namespace_properties`).
    pub url: String,
    pub name: String,
    pub warehouse: String,
    /// FileIO properties (`s3.endpoint`, `s3.access-key-id`, …).
    pub storage: HashMap<String, String>,
}

impl CatalogConfig {
    /// The catalog URL as logs may show it: without its password.
    pub fn shown_url(&self) -> String {
        let Some((scheme, rest)) = self.url.split_once("://") else {
            return self.url.clone();
        };
        match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
                None => self.url.clone(),
            },
            None => self.url.clone(),
        }
    }

    /// Connects to the SQL catalog.
    ///
    /// `iceberg-catalog-sql` creates the catalog's tables with `CREATE TABLE IF NOT EXISTS` at
    /// every connect, which PostgreSQL does not make atomic across sessions: of several first
    /// connects at once (two sinks and a query-server on a new host), all but one can fail
    /// ([`created_meanwhile`]). Each such failure means another connect created one of the
    /// tables, so a connect that failed so is made again, once per table at most. This can go if
    /// the catalog creates its tables under a lock of its own.
    pub async fn connect(&self) -> iceberg::Result<Arc<dyn Catalog>> {
        // iceberg_tables and iceberg_namespace_properties.
        const CATALOG_TABLES: usize = 2;
        let mut attempt = 0;
        loop {
            match self.connect_once().await {
                Err(e) if attempt < CATALOG_TABLES && created_meanwhile(&e) => {
                    attempt += 1;
                    tracing::info!("another process created the catalog's tables at the same moment; connecting again");
                }
                connected => return connected,
            }
        }
    }

    async fn connect_once(&self) -> iceberg::Result<Arc<dyn Catalog>> {
        let bind_style = if self.url.starts_with("sqlite:") {
            SqlBindStyle::QMark
        } else {
            SqlBindStyle::DollarNumeric
        };
        let catalog = SqlCatalogBuilder::default()
            .uri(&self.url)
            // A trailing slash would put an empty path segment into every table location.
            .warehouse_location(self.warehouse.trim_end_matches('/'))
            .sql_bind_style(bind_style)
            .props(self.storage.clone())
            .with_storage_factory(Arc::new(OpenDalResolvingStorageFactory::new()))
            .load(&self.name, HashMap::new())
            .await?;
        Ok(Arc::new(catalog))
    }
}

/// Where `hour(field)` is in the partition of every file of the table: only when the table has
/// one partition spec, as iceberg's planned files do not say which spec theirs is of.
pub fn hour_partition(metadata: &iceberg::spec::TableMetadata, field_id: i32) -> Option<usize> {
    let mut specs = metadata.partition_specs_iter();
    let (Some(spec), None) = (specs.next(), specs.next()) else {
        return None;
    };
    spec.fields()
        .iter()
        .position(|f| f.source_id == field_id && f.transform == iceberg::spec::Transform::Hour)
}

/// The hour (since the epoch) of a planned file's partition at `position` (from
/// [`hour_partition`]), when it has one.
pub fn file_hour(task: &iceberg::scan::FileScanTask, position: usize) -> Option<i32> {
    use iceberg::spec::{Literal, PrimitiveLiteral};
    match task.partition.as_ref()?.iter().nth(position).flatten() {
        Some(Literal::Primitive(PrimitiveLiteral::Int(hour))) => Some(*hour),
        _ => None,
    }
}

/// The SQL catalog's own rows, read and written with SQL where `iceberg-catalog-sql` 0.10.1
/// has no call for what a daemon needs: the sink's maintenance commit (a compare-and-set of a
/// table's `metadata_location`) and the query-server's one read of every table's current
/// metadata file per statement. The layout is the JDBC catalog's, which Trino and PyIceberg
/// share: tables and views in `iceberg_tables`, told apart by `iceberg_type` (NULL in catalogs
/// made before views); a nested namespace is its parts joined by dots.
pub struct CatalogRows {
    pub pool: sqlx::AnyPool,
    /// `$1`-style placeholders (PostgreSQL) rather than `?` (SQLite).
    numbered: bool,
    pub catalog_name: String,
}

/// A table of the catalog and where its current metadata file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRow {
    pub namespace: String,
    pub name: String,
    pub metadata_location: String,
}

/// What [`CatalogRows::layout`] reads: the namespaces (with or without tables) and the tables.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    pub namespaces: Vec<String>,
    pub tables: Vec<TableRow>,
}

impl CatalogRows {
    /// A pool of up to `connections`, connected on first use.
    pub fn connect(url: &str, catalog_name: &str, connections: u32) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(connections.max(1))
            .connect_lazy(url)
            .context("the catalog database URL")?;
        Ok(Self {
            pool,
            numbered: !url.starts_with("sqlite:"),
            catalog_name: catalog_name.to_owned(),
        })
    }

    /// `sql` with its `?` placeholders as the database writes them.
    pub fn statement(&self, sql: &str) -> String {
        if !self.numbered {
            return sql.to_owned();
        }
        let mut out = String::with_capacity(sql.len() + 8);
        for (n, part) in sql.split('?').enumerate() {
            if n > 0 {
                out.push_str(&format!("${n}"));
            }
            out.push_str(part);
        }
        out
    }

    /// Every namespace and table of the catalog with its current metadata file, in one
    /// statement (one snapshot of the catalog).
    pub async fn layout(&self) -> Result<Layout, sqlx::Error> {
        let sql = self.statement(
            "SELECT table_namespace, table_name, metadata_location FROM iceberg_tables \
             WHERE catalog_name = ? AND (iceberg_type = 'TABLE' OR iceberg_type IS NULL) \
             UNION ALL SELECT DISTINCT namespace, CAST(NULL AS VARCHAR(255)), CAST(NULL AS VARCHAR(1000)) \
             FROM iceberg_namespace_properties WHERE catalog_name = ?",
        );
        let rows: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(&sql)
            .bind(&self.catalog_name)
            .bind(&self.catalog_name)
            .fetch_all(&self.pool)
            .await?;
        let mut layout = Layout::default();
        for (namespace, name, location) in rows {
            if !layout.namespaces.contains(&namespace) {
                layout.namespaces.push(namespace.clone());
            }
            if let (Some(name), Some(metadata_location)) = (name, location) {
                layout.tables.push(TableRow {
                    namespace,
                    name,
                    metadata_location,
                });
            }
        }
        layout.namespaces.sort();
        layout
            .tables
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok(layout)
    }
}

/// Whether `error` is PostgreSQL's answer to creating what another session created at the same
/// moment: a unique violation (23505, on its catalog of types), a duplicate object (42710, the
/// table's row type) or a duplicate table (42P07).
fn created_meanwhile(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(sqlx::Error::Database(database)) = e.downcast_ref::<sqlx::Error>() {
            return matches!(database.code().as_deref(), Some("23505" | "42710" | "42P07"));
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_show_the_catalog_url_without_its_password() {
        let shown = |url: &str| {
            CatalogConfig {
                url: url.into(),
                name: "weather".into(),
                warehouse: "s3://warehouse/".into(),
                storage: HashMap::new(),
            }
            .shown_url()
        };
        assert_eq!(
            shown("postgresql://postgres:s3cr@t@db:5432/iceberg"),
            "postgresql://postgres:***@db:5432/iceberg"
        );
        assert_eq!(
            shown("postgresql://weather@db/iceberg"),
            "postgresql://weather@db/iceberg"
        );
        assert_eq!(shown("sqlite://catalog.db"), "sqlite://catalog.db");
    }

    /// The layout read from an SQLite catalog in the JDBC layout: a table, a view (left out), a
    /// namespace without tables, another catalog's table (left out).
    #[tokio::test]
    async fn the_layout_has_every_namespace_and_each_tables_metadata_file() {
        let rows = CatalogRows::connect("sqlite::memory:", "weather", 1).expect("lazy");
        for statement in [
            "CREATE TABLE iceberg_tables (catalog_name VARCHAR(255), table_namespace VARCHAR(255), \
             table_name VARCHAR(255), metadata_location VARCHAR(1000), previous_metadata_location VARCHAR(1000), \
             iceberg_type VARCHAR(5))",
            "CREATE TABLE iceberg_namespace_properties (catalog_name VARCHAR(255), namespace VARCHAR(255), \
             property_key VARCHAR(255), property_value VARCHAR(1000))",
            "INSERT INTO iceberg_tables VALUES ('weather', 'default', 'weather', 'm1.json', NULL, 'TABLE'), \
             ('weather', 'default', 'old', 'm0.json', NULL, NULL), ('weather', 'default', 'v', 'v.json', NULL, 'VIEW'), \
             ('other', 'default', 'theirs', 'x.json', NULL, 'TABLE')",
            "INSERT INTO iceberg_namespace_properties VALUES ('weather', 'default', 'exists', 'true'), \
             ('weather', 'empty', 'exists', 'true'), ('weather', 'empty', 'location', 's3://w/empty')",
        ] {
            sqlx::query(statement).execute(&rows.pool).await.expect(statement);
        }
        let layout = rows.layout().await.expect("layout");
        assert_eq!(layout.namespaces, ["default", "empty"]);
        let table = |name: &str, location: &str| TableRow {
            namespace: "default".into(),
            name: name.into(),
            metadata_location: location.into(),
        };
        assert_eq!(layout.tables, [table("old", "m0.json"), table("weather", "m1.json")]);
    }

    #[tokio::test]
    async fn placeholders_are_numbered_for_postgresql_only() {
        let sql = "UPDATE t SET a = ? WHERE b = ? AND c = ?";
        let postgres = CatalogRows::connect("postgresql://localhost/x", "weather", 1).expect("lazy");
        assert_eq!(postgres.statement(sql), "UPDATE t SET a = $1 WHERE b = $2 AND c = $3");
        let sqlite = CatalogRows::connect("sqlite::memory:", "weather", 1).expect("lazy");
        assert_eq!(sqlite.statement(sql), sql);
    }
}
