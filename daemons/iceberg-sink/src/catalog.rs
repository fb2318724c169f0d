//! The two places the sink works around `iceberg` 0.10.1's catalog commit, each named with the
//! behaviour it works around and when it can go: [`Pinned`] (appends) and [`CatalogRow`]
//! (maintenance's own commit).

use std::{collections::HashMap, sync::Arc};

use anyhow::Context;
use iceberg::{Catalog, Namespace, NamespaceIdent, TableCommit, TableCreation, TableIdent, table::Table};

/// The catalog as one commit sees it: its table as of the base the commit was built on.
///
/// iceberg's `Transaction::commit` loads the table again and, when another commit landed
/// meanwhile, applies the actions again on the new base, including the snapshot summary, which
/// was merged from the old one: it would record stale offsets for the other writers' partitions.
/// Pinned, the base is the one the summary was merged from; the catalog refuses the commit if
/// the table moved on (its requirement on the current snapshot), and that refusal is not retried
/// inside iceberg (not retryable here) but by [`crate::table::WeatherTable::commit`], which
/// merges again. It can go once iceberg-rust lets an action see the base it is applied to again
/// (to merge the summary there) or stops re-applying actions on a new base.
#[derive(Debug)]
pub struct Pinned {
    pub inner: Arc<dyn Catalog>,
    pub base: Table,
}

#[async_trait::async_trait]
impl Catalog for Pinned {
    async fn list_namespaces(&self, parent: Option<&NamespaceIdent>) -> iceberg::Result<Vec<NamespaceIdent>> {
        self.inner.list_namespaces(parent).await
    }

    async fn create_namespace(
        &self,
        namespace: &NamespaceIdent,
        properties: HashMap<String, String>,
    ) -> iceberg::Result<Namespace> {
        self.inner.create_namespace(namespace, properties).await
    }

    async fn get_namespace(&self, namespace: &NamespaceIdent) -> iceberg::Result<Namespace> {
        self.inner.get_namespace(namespace).await
    }

    async fn namespace_exists(&self, namespace: &NamespaceIdent) -> iceberg::Result<bool> {
        self.inner.namespace_exists(namespace).await
    }

    async fn update_namespace(
        &self,
        namespace: &NamespaceIdent,
        properties: HashMap<String, String>,
    ) -> iceberg::Result<()> {
        self.inner.update_namespace(namespace, properties).await
    }

    async fn drop_namespace(&self, namespace: &NamespaceIdent) -> iceberg::Result<()> {
        self.inner.drop_namespace(namespace).await
    }

    async fn list_tables(&self, namespace: &NamespaceIdent) -> iceberg::Result<Vec<TableIdent>> {
        self.inner.list_tables(namespace).await
    }

    async fn create_table(&self, namespace: &NamespaceIdent, creation: TableCreation) -> iceberg::Result<Table> {
        self.inner.create_table(namespace, creation).await
    }

    async fn load_table(&self, table: &TableIdent) -> iceberg::Result<Table> {
        if table == self.base.identifier() {
            return Ok(self.base.clone());
        }
        self.inner.load_table(table).await
    }

    async fn drop_table(&self, table: &TableIdent) -> iceberg::Result<()> {
        self.inner.drop_table(table).await
    }

    async fn purge_table(&self, table: &TableIdent) -> iceberg::Result<()> {
        self.inner.purge_table(table).await
    }

    async fn table_exists(&self, table: &TableIdent) -> iceberg::Result<bool> {
        self.inner.table_exists(table).await
    }

    async fn rename_table(&self, src: &TableIdent, dest: &TableIdent) -> iceberg::Result<()> {
        self.inner.rename_table(src, dest).await
    }

    async fn register_table(&self, table: &TableIdent, metadata_location: String) -> iceberg::Result<Table> {
        self.inner.register_table(table, metadata_location).await
    }

    async fn update_table(&self, commit: TableCommit) -> iceberg::Result<Table> {
        self.inner
            .update_table(commit)
            .await
            .map_err(|e| iceberg::Error::new(e.kind(), e.message().to_owned()).with_retryable(false))
    }
}

/// Where the catalog keeps the table's current metadata file, for the compare-and-set.
pub struct CatalogRow {
    pub pool: sqlx::AnyPool,
    /// `$1`-style placeholders (PostgreSQL) rather than `?` (SQLite).
    pub numbered: bool,
    pub catalog_name: String,
}

impl CatalogRow {
    pub fn connect(url: &str, catalog_name: &str) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        // Connected on first use: with maintenance off, never.
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect_lazy(url)
            .context("the catalog database URL")?;
        Ok(Self {
            pool,
            numbered: !url.starts_with("sqlite:"),
            catalog_name: catalog_name.to_owned(),
        })
    }

    /// Points the table at `new` if it still points at `old`; false when another commit came
    /// first. The statement is `iceberg-catalog-sql` 0.10.1's own commit (`update_table`),
    /// which cannot be called with a `TableCommit` built here; the JDBC catalog's layout, which
    /// Trino and PyIceberg share, keeps tables and views in one table told apart by
    /// `iceberg_type` (NULL in catalogs made before views). It can go once iceberg-rust commits
    /// a manifest rewrite itself.
    pub(crate) async fn swap(&self, table: &Table, old: &str, new: &str) -> anyhow::Result<bool> {
        let mut sql = "UPDATE iceberg_tables SET metadata_location = ?, previous_metadata_location = ? \
                       WHERE catalog_name = ? AND table_namespace = ? AND table_name = ? \
                       AND (iceberg_type = 'TABLE' OR iceberg_type IS NULL) AND metadata_location = ?"
            .to_owned();
        if self.numbered {
            for n in 1..=6 {
                sql = sql.replacen('?', &format!("${n}"), 1);
            }
        }
        let ident = table.identifier();
        let done = sqlx::query(&sql)
            .bind(new)
            .bind(old)
            .bind(&self.catalog_name)
            .bind(ident.namespace().join("."))
            .bind(ident.name())
            .bind(old)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}
