//! Which tables a statement reads, and their metadata reused while it is unchanged.
//!
//! Each statement reads the catalog's rows once ([`CatalogRows::layout`]: every namespace and
//! table with its current metadata file), so a commit is seen by the next statement, as when
//! the table was loaded for every statement. A table whose metadata file is the one loaded
//! before is not loaded again: its parsed metadata is reused, and with it the manifest list and
//! manifests iceberg cached for it (its object cache, 32 MiB at most per table). A new version
//! starts with an empty one: manifests a new snapshot shares with the last are read again once.
//! One loaded version per table of the catalog is kept; a dropped table's goes at the next
//! statement.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use iceberg::{Catalog, NamespaceIdent, TableIdent, table::Table};
use weather_common::lakehouse::{CatalogRows, Layout};

use crate::protocol::{ErrorCode, Failure};

pub struct Tables {
    catalog: Arc<dyn Catalog>,
    rows: CatalogRows,
    loaded: Mutex<HashMap<TableIdent, Table>>,
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
    pub async fn table(&self, ident: &TableIdent, location: &str) -> iceberg::Result<Table> {
        if let Some(table) = self.lock().get(ident)
            && table.metadata_location() == Some(location)
        {
            return Ok(table.clone());
        }
        let table = self.catalog.load_table(ident).await?;
        self.lock().insert(ident.clone(), table.clone());
        Ok(table)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TableIdent, Table>> {
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
