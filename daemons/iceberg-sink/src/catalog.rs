//! The two places the sink works around `iceberg` 0.10.1's catalog commit, each named with the
//! behaviour it works around and when it can go: [`Pinned`] (appends) and [`swap`]
//! (maintenance's own commit).

use std::{collections::HashMap, sync::Arc};

use iceberg::{Catalog, Namespace, NamespaceIdent, TableCommit, TableCreation, TableIdent, table::Table};
use weather_common::lakehouse::CatalogRows;

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

/// Points `table` at metadata file `new` if the catalog still points it at `old`; false when
/// another commit came first. The statement is `iceberg-catalog-sql` 0.10.1's own commit
/// (`update_table`), which cannot be called with a `TableCommit` built here. It can go once
/// iceberg-rust commits a manifest rewrite itself.
pub(crate) async fn swap(rows: &CatalogRows, table: &Table, old: &str, new: &str) -> anyhow::Result<bool> {
    let sql = rows.statement(
        "UPDATE iceberg_tables SET metadata_location = ?, previous_metadata_location = ? \
         WHERE catalog_name = ? AND table_namespace = ? AND table_name = ? \
         AND (iceberg_type = 'TABLE' OR iceberg_type IS NULL) AND metadata_location = ?",
    );
    let ident = table.identifier();
    let done = sqlx::query(&sql)
        .bind(new)
        .bind(old)
        .bind(&rows.catalog_name)
        .bind(ident.namespace().join("."))
        .bind(ident.name())
        .bind(old)
        .execute(&rows.pool)
        .await?;
    Ok(done.rows_affected() == 1)
}
