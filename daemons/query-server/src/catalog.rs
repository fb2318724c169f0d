//! The Iceberg catalog as DataFusion sees it: one catalog of the namespaces' tables, each table
//! with Trino's `$snapshots` and `$files` metadata tables beside it.

use std::{any::Any, collections::HashMap, sync::Arc};

use arrow_array::{ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Fields, Schema};
use async_trait::async_trait;
use datafusion::{
    catalog::{CatalogProvider, MemTable, SchemaProvider},
    common::DataFusionError,
    datasource::TableProvider,
};
use futures::TryStreamExt;
use iceberg::{Catalog, TableIdent, spec::PrimitiveLiteral, table::Table};
use weather_common::file_totals::TOTAL_DATA_FILES;

use crate::{
    Metrics,
    scan::{IcebergTable, external, planned_files},
    tables::Tables,
};

/// The catalog's namespaces as DataFusion schemas.
/// The one catalog this server has, as Trino's Iceberg connector is usually named.
pub const CATALOG: &str = "iceberg";

#[derive(Debug)]
pub(crate) struct IcebergCatalog {
    pub(crate) schemas: HashMap<String, Arc<dyn SchemaProvider>>,
}

impl CatalogProvider for IcebergCatalog {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn schema_names(&self) -> Vec<String> {
        self.schemas.keys().cloned().collect()
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        self.schemas.get(name).cloned()
    }
}

/// A namespace's tables, each loaded when a query names it (see [`Tables`]), and Trino's
/// metadata tables `"<table>$snapshots"` and `"<table>$files"`.
#[derive(Debug)]
pub(crate) struct IcebergSchema {
    pub(crate) loaded: Arc<Tables>,
    /// The namespace's tables and their metadata files, as the statement found them.
    pub(crate) tables: Vec<(TableIdent, String)>,
    pub(crate) metrics: Arc<Metrics>,
}

#[async_trait]
impl SchemaProvider for IcebergSchema {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn table_names(&self) -> Vec<String> {
        self.tables.iter().map(|(t, _)| t.name.clone()).collect()
    }

    async fn table(&self, name: &str) -> datafusion::common::Result<Option<Arc<dyn TableProvider>>> {
        let (base, suffix) = match name.split_once('$') {
            Some((base, suffix)) => (base, Some(suffix)),
            None => (name, None),
        };
        let Some((ident, location)) = self.tables.iter().find(|(t, _)| t.name == base) else {
            return Ok(None);
        };
        let loaded = self.loaded.table(ident, location).await.map_err(external)?;
        Ok(Some(match suffix {
            Some("snapshots") => snapshots(&loaded.table).await?,
            Some("files") => files(&loaded.table).await?,
            None => Arc::new(IcebergTable::new(loaded, self.metrics.clone())),
            Some(_) => return Ok(None),
        }))
    }

    fn table_exist(&self, name: &str) -> bool {
        let base = name.split_once('$').map_or(name, |(base, _)| base);
        self.tables.iter().any(|(t, _)| t.name == base)
    }
}

/// `$snapshots`: committed_at, snapshot_id, parent_id, operation, manifest_list, summary.
pub(crate) async fn snapshots(table: &Table) -> datafusion::common::Result<Arc<dyn TableProvider>> {
    let batches: Vec<RecordBatch> = table
        .inspect()
        .snapshots()
        .scan()
        .await
        .map_err(external)?
        .try_collect()
        .await
        .map_err(external)?;
    let schema = match batches.first() {
        Some(batch) => batch.schema(),
        None => return Err(DataFusionError::Internal("the snapshots scan gave no batch".into())),
    };
    Ok(Arc::new(MemTable::try_new(schema, vec![batches])?))
}

/// `$files`: the data files of the current snapshot, with Trino's first columns (content,
/// file_path, file_format, spec_id, partition, record_count, file_size_in_bytes).
pub(crate) async fn files(table: &Table) -> datafusion::common::Result<Arc<dyn TableProvider>> {
    let spec = table.metadata().default_partition_spec();
    let partition_fields: Fields = spec
        .fields()
        .iter()
        .map(|f| Field::new(&f.name, DataType::Int32, true))
        .collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("content", DataType::Int32, false),
        Field::new("file_path", DataType::Utf8, false),
        Field::new("file_format", DataType::Utf8, false),
        Field::new("spec_id", DataType::Int32, false),
        Field::new("partition", DataType::Struct(partition_fields.clone()), true),
        Field::new("record_count", DataType::Int64, false),
        Field::new("file_size_in_bytes", DataType::Int64, false),
    ]));
    let tasks = match table.metadata().current_snapshot() {
        Some(_) => planned_files(&table.scan().build().map_err(external)?)
            .await
            .map_err(external)?,
        None => vec![],
    };
    let partition_columns: Vec<ArrayRef> = (0..partition_fields.len())
        .map(|i| {
            Arc::new(Int32Array::from(
                tasks
                    .iter()
                    .map(|t| match t.partition.as_ref().and_then(|p| p.iter().nth(i).flatten()) {
                        Some(iceberg::spec::Literal::Primitive(PrimitiveLiteral::Int(v))) => Some(*v),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            )) as ArrayRef
        })
        .collect();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int32Array::from(vec![0; tasks.len()])),
            Arc::new(StringArray::from_iter_values(
                tasks.iter().map(|t| t.data_file_path.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                tasks.iter().map(|t| t.data_file_format.to_string().to_uppercase()),
            )),
            Arc::new(Int32Array::from(
                tasks
                    .iter()
                    .map(|t| t.partition_spec.as_ref().map_or(0, |s| s.spec_id()))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(StructArray::try_new(partition_fields, partition_columns, None)?),
            Arc::new(Int64Array::from(
                tasks
                    .iter()
                    .map(|t| t.record_count.unwrap_or(0) as i64)
                    .collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                tasks.iter().map(|t| t.file_size_in_bytes as i64).collect::<Vec<_>>(),
            )),
        ],
    )?;
    Ok(Arc::new(MemTable::try_new(schema, vec![vec![batch]])?))
}

/// The table as the web UI's overview shows it.
#[derive(Debug, Clone)]
pub struct TableSummary {
    pub name: String,
    pub snapshot_id: Option<i64>,
    /// From the current snapshot's summary, where the writer recorded them.
    pub files: Option<u64>,
    pub rows: Option<u64>,
    pub last_commit: Option<chrono::DateTime<chrono::Utc>>,
}

/// Loads table `name` (namespace, table) and sums up its current snapshot.
pub async fn summary(catalog: &dyn Catalog, name: &[&str; 2]) -> iceberg::Result<TableSummary> {
    let table = catalog.load_table(&TableIdent::from_strs(name)?).await?;
    let snapshot = table.metadata().current_snapshot();
    let property = |key: &str| {
        snapshot
            .and_then(|s| s.summary().additional_properties.get(key))
            .and_then(|v| v.parse().ok())
    };
    Ok(TableSummary {
        name: name.join("."),
        snapshot_id: snapshot.map(|s| s.snapshot_id()),
        files: property(TOTAL_DATA_FILES),
        rows: property("total-records"),
        last_commit: snapshot.and_then(|s| chrono::DateTime::from_timestamp_millis(s.timestamp_ms())),
    })
}
