//! Which tables a statement reads, and their metadata reused while it is unchanged.
//!
//! Each statement reads the catalog's rows once ([`CatalogRows::layout`]: every namespace and
//! table with its current metadata file), so a commit is seen by the next statement, as when
//! the table was loaded for every statement. A table whose metadata file is the one loaded
//! before is not loaded again: its parsed metadata is reused, and with it the manifest list and
//! manifests iceberg cached for it (its object cache, 32 MiB at most per table), its schema as
//! DataFusion sees it, and its data file count where its summary does not record one. A new
//! version starts with an empty one: manifests a new snapshot shares with the last are read
//! again once. One loaded version per table of the catalog is kept; a dropped table's goes at
//! the next statement.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use arrow_schema::{Schema, SchemaRef};
use iceberg::{Catalog, NamespaceIdent, TableIdent, table::Table};
use tokio::sync::OnceCell;
use weather_common::{
    file_totals::{FileTotals, recorded_data_files},
    lakehouse::{CatalogRows, Layout},
};

use crate::{
    files,
    protocol::{ErrorCode, Failure},
};

pub struct Tables {
    catalog: Arc<dyn Catalog>,
    rows: CatalogRows,
    loaded: Mutex<HashMap<TableIdent, Loaded>>,
}

/// One version of a table (one metadata file), with what is worked out from it once.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub table: Table,
    /// The current schema as DataFusion sees it: without iceberg's field-id metadata (which
    /// DataFusion would carry into results), strings as string views.
    pub schema: SchemaRef,
    data_files: Arc<OnceCell<usize>>,
}

impl Loaded {
    pub fn new(table: Table) -> iceberg::Result<Self> {
        let schema = iceberg::arrow::schema_to_arrow_schema(table.metadata().current_schema())?;
        let schema = Schema::new(
            schema
                .fields()
                .iter()
                .map(|f| files::as_string_view(f).with_metadata(Default::default()))
                .collect::<Vec<_>>(),
        );
        Ok(Self {
            table,
            schema: Arc::new(schema),
            data_files: Arc::default(),
        })
    }

    /// The data files of the current snapshot, for reporting how many a scan skipped: as its
    /// writer summed them up (`total-data-files`), else counted from its manifest list once.
    pub async fn data_files(&self) -> iceberg::Result<usize> {
        let Some(snapshot) = self.table.metadata().current_snapshot() else {
            return Ok(0);
        };
        if let Some(total) = recorded_data_files(&snapshot.summary().additional_properties) {
            return Ok(total as usize);
        }
        let count = || async {
            let list = self.table.manifest_list_reader(snapshot).load().await?;
            // A manifest without counts (format v1 allows it) leaves the total unknown: 0.
            Ok(FileTotals::counted(list.entries()).map_or(0, |t| t.data_files as usize))
        };
        self.data_files.get_or_try_init(count).await.copied()
    }
}

impl Tables {
    pub fn new(catalog: Arc<dyn Catalog>, rows: CatalogRows) -> Self {
        Self {
            catalog,
            rows,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// The catalog as it is now; forgets the tables it no longer has.
    pub async fn layout(&self) -> Result<Layout, Failure> {
        let layout = self
            .rows
            .layout()
            .await
            .map_err(|e| Failure::new(ErrorCode::GenericInternalError, format!("Iceberg catalog: {e}")))?;
        self.lock().retain(|ident, _| {
            layout
                .tables
                .iter()
                .any(|t| ident == &identifier(&t.namespace, &t.name))
        });
        Ok(layout)
    }

    /// Table `ident` at metadata file `location`: the version loaded before if it is that one,
    /// else loaded from the catalog (which may by then give a newer one: it is kept as well).
    pub async fn table(&self, ident: &TableIdent, location: &str) -> iceberg::Result<Loaded> {
        if let Some(loaded) = self.lock().get(ident)
            && loaded.table.metadata_location() == Some(location)
        {
            return Ok(loaded.clone());
        }
        let loaded = Loaded::new(self.catalog.load_table(ident).await?)?;
        self.lock().insert(ident.clone(), loaded.clone());
        Ok(loaded)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TableIdent, Loaded>> {
        // The map is whole between statements: a panic holding the lock leaves it usable.
        self.loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl std::fmt::Debug for Tables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tables")
            .field("loaded", &self.lock().len())
            .finish_non_exhaustive()
    }
}

/// A namespace as the catalog stores it (parts joined by dots), as iceberg names it.
pub fn namespace(stored: &str) -> NamespaceIdent {
    NamespaceIdent::from_strs(stored.split('.')).unwrap_or_else(|_| NamespaceIdent::new(stored.to_owned()))
}

pub fn identifier(stored_namespace: &str, name: &str) -> TableIdent {
    TableIdent::new(namespace(stored_namespace), name.to_owned())
}
