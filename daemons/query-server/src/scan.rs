//! The Iceberg table as a DataFusion table: filters on columns become an Iceberg predicate, so
//! iceberg's planning skips the `hour(ts)` partitions and files a filter rules out, and the
//! files left are read by iceberg's own Parquet reader, spread over the engine's partitions.

use std::{any::Any, fmt, sync::Arc};

use arrow_array::{RecordBatch, RecordBatchOptions};
use arrow_schema::{Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::{
    catalog::Session,
    common::{DataFusionError, Result, ScalarValue},
    datasource::{TableProvider, TableType},
    execution::{SendableRecordBatchStream, TaskContext},
    logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown},
    physical_expr::EquivalenceProperties,
    physical_plan::{
        DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
        execution_plan::{Boundedness, EmissionType},
        stream::RecordBatchStreamAdapter,
    },
};
use futures::{StreamExt, TryStreamExt};
use iceberg::{
    expr::{Predicate, Reference},
    scan::{FileScanTask, TableScan},
    spec::{Datum, PrimitiveType, Type},
    table::Table,
};

use crate::{Metrics, history::Entry};

pub fn external(e: iceberg::Error) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// A table of the catalog, as loaded when the query was planned: the query reads that
/// snapshot, whatever is committed meanwhile.
#[derive(Debug)]
pub struct IcebergTable {
    table: Table,
    schema: SchemaRef,
    metrics: Arc<Metrics>,
}

impl IcebergTable {
    pub fn new(table: Table, metrics: Arc<Metrics>) -> Result<Self> {
        let schema = iceberg::arrow::schema_to_arrow_schema(table.metadata().current_schema()).map_err(external)?;
        Ok(Self {
            table,
            schema: Arc::new(without_metadata(&schema)),
            metrics,
        })
    }
}

/// The schema without iceberg's field-id metadata, which DataFusion would carry into results.
fn without_metadata(schema: &Schema) -> Schema {
    Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_metadata(Default::default()))
            .collect::<Vec<_>>(),
    )
}

#[async_trait]
impl TableProvider for IcebergTable {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Every filter that becomes a predicate prunes partitions and files; DataFusion still
    /// applies it to the rows read (Inexact), as a file holds rows on both sides of a bound.
    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| {
                if predicate(&self.table, f).is_some() {
                    TableProviderFilterPushDown::Inexact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let output = Arc::new(match projection {
            Some(p) => self.schema.project(p)?,
            None => self.schema.as_ref().clone(),
        });
        // An empty projection (`count(*)`) still needs rows: read the narrowest column.
        let read: Vec<String> = match output.fields().len() {
            0 => vec![self.schema.field(0).name().clone()],
            _ => output.fields().iter().map(|f| f.name().clone()).collect(),
        };
        let predicate = filters
            .iter()
            .filter_map(|f| predicate(&self.table, f))
            .reduce(Predicate::and);
        let mut builder = self.table.scan().select(read.clone());
        if let Some(predicate) = &predicate {
            builder = builder.with_filter(predicate.clone());
        }
        let scan = builder.build().map_err(external)?;
        // The snapshot's file count only feeds EXPLAIN and the metrics: read beside the planning.
        let (tasks, total_files) =
            futures::try_join!(planned_files(&scan), data_files(&self.table)).map_err(external)?;
        self.metrics.files_scanned.inc_by(tasks.len() as u64);
        self.metrics
            .files_skipped
            .inc_by(total_files.saturating_sub(tasks.len()) as u64);
        if let Some(entry) = state.config().get_extension::<Entry>() {
            let (rows, bytes) = tasks.iter().fold((0, 0), |(rows, bytes), t| {
                (rows + t.record_count.unwrap_or(0), bytes + t.length)
            });
            let filter = predicate.as_ref().map(ToString::to_string);
            entry.update(|r| {
                r.files_scanned += tasks.len() as u64;
                r.files_total += total_files as u64;
                r.rows_scanned += rows;
                r.bytes_scanned += bytes;
                r.filter = filter;
            });
        }
        let partitions = state.config().target_partitions().clamp(1, tasks.len().max(1));
        Ok(Arc::new(IcebergScan {
            table: self.table.clone(),
            output: output.clone(),
            read,
            predicate,
            groups: spread(tasks, partitions),
            total_files,
            properties: Arc::new(PlanProperties::new(
                EquivalenceProperties::new(output),
                Partitioning::UnknownPartitioning(partitions),
                EmissionType::Incremental,
                Boundedness::Bounded,
            )),
        }))
    }
}

/// The files `scan` reads, as iceberg plans them.
pub async fn planned_files(scan: &TableScan) -> iceberg::Result<Vec<FileScanTask>> {
    scan.plan_files().await?.try_collect().await
}

/// Data files of the current snapshot, for reporting how many a scan skipped.
async fn data_files(table: &Table) -> iceberg::Result<usize> {
    let Some(snapshot) = table.metadata().current_snapshot() else {
        return Ok(0);
    };
    let list = table.manifest_list_reader(snapshot).load().await?;
    Ok(list
        .entries()
        .iter()
        .map(|m| (m.added_files_count.unwrap_or(0) + m.existing_files_count.unwrap_or(0)) as usize)
        .sum())
}

/// Deals the files round-robin, largest first, so the partitions get similar work.
fn spread(mut tasks: Vec<FileScanTask>, partitions: usize) -> Vec<Vec<FileScanTask>> {
    tasks.sort_by_key(|t| std::cmp::Reverse(t.length));
    let mut groups: Vec<Vec<FileScanTask>> = (0..partitions).map(|_| Vec::new()).collect();
    for (i, task) in tasks.into_iter().enumerate() {
        groups[i % partitions].push(task);
    }
    groups
}

/// `column <op> literal` (or the other way round), `AND`, `OR`, `IN` lists and `IS [NOT]
/// NULL` on the table's own columns, as an Iceberg predicate; `None` for anything else.
fn predicate(table: &Table, expr: &Expr) -> Option<Predicate> {
    match expr {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::And => Some(predicate(table, left)?.and(predicate(table, right)?)),
            Operator::Or => Some(predicate(table, left)?.or(predicate(table, right)?)),
            _ => match (column(table, left), column(table, right)) {
                (Some((name, ty)), None) => compare(name, *op, datum(&ty, right)?),
                (None, Some((name, ty))) => compare(name, flip(*op)?, datum(&ty, left)?),
                _ => None,
            },
        },
        Expr::InList(list) if !list.negated => {
            let (name, ty) = column(table, &list.expr)?;
            let values: Option<Vec<Datum>> = list.list.iter().map(|e| datum(&ty, e)).collect();
            Some(Reference::new(name).is_in(values?))
        }
        Expr::IsNull(e) => Some(Reference::new(column(table, e)?.0).is_null()),
        Expr::IsNotNull(e) => Some(Reference::new(column(table, e)?.0).is_not_null()),
        _ => None,
    }
}

fn compare(name: String, op: Operator, value: Datum) -> Option<Predicate> {
    let reference = Reference::new(name);
    Some(match op {
        Operator::Eq => reference.equal_to(value),
        Operator::NotEq => reference.not_equal_to(value),
        Operator::Lt => reference.less_than(value),
        Operator::LtEq => reference.less_than_or_equal_to(value),
        Operator::Gt => reference.greater_than(value),
        Operator::GtEq => reference.greater_than_or_equal_to(value),
        _ => return None,
    })
}

/// `a < b` is `b > a`.
fn flip(op: Operator) -> Option<Operator> {
    Some(match op {
        Operator::Eq | Operator::NotEq => op,
        Operator::Lt => Operator::Gt,
        Operator::LtEq => Operator::GtEq,
        Operator::Gt => Operator::Lt,
        Operator::GtEq => Operator::LtEq,
        _ => return None,
    })
}

/// A column of the table, with its Iceberg type.
fn column(table: &Table, expr: &Expr) -> Option<(String, PrimitiveType)> {
    match expr {
        Expr::Column(c) => {
            let field = table.metadata().current_schema().field_by_name(&c.name)?;
            match field.field_type.as_ref() {
                Type::Primitive(ty) => Some((c.name.clone(), ty.clone())),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A literal as a value of the column's Iceberg type, if it is one exactly.
fn datum(ty: &PrimitiveType, expr: &Expr) -> Option<Datum> {
    let Expr::Literal(value, _) = expr else {
        return None;
    };
    let micros = |value: &ScalarValue| -> Option<i64> {
        match value {
            ScalarValue::TimestampSecond(Some(v), _) => v.checked_mul(1_000_000),
            ScalarValue::TimestampMillisecond(Some(v), _) => v.checked_mul(1_000),
            ScalarValue::TimestampMicrosecond(Some(v), _) => Some(*v),
            // Nanoseconds between two microseconds would round; only exact values prune.
            ScalarValue::TimestampNanosecond(Some(v), _) if v % 1_000 == 0 => Some(v / 1_000),
            _ => None,
        }
    };
    match (ty, value) {
        (
            PrimitiveType::String,
            ScalarValue::Utf8(Some(v)) | ScalarValue::Utf8View(Some(v)) | ScalarValue::LargeUtf8(Some(v)),
        ) => Some(Datum::string(v)),
        (PrimitiveType::Double, ScalarValue::Float64(Some(v))) if v.is_finite() => Some(Datum::double(*v)),
        (PrimitiveType::Long, ScalarValue::Int64(Some(v))) => Some(Datum::long(*v)),
        (PrimitiveType::Timestamptz, v) => Some(Datum::timestamptz_micros(micros(v)?)),
        (PrimitiveType::Timestamp, v) => Some(Datum::timestamp_micros(micros(v)?)),
        _ => None,
    }
}

/// Reads the files a scan planned, one group of files per DataFusion partition.
struct IcebergScan {
    table: Table,
    output: SchemaRef,
    /// Columns read from the files (one, when the query needs only the row count).
    read: Vec<String>,
    predicate: Option<Predicate>,
    groups: Vec<Vec<FileScanTask>>,
    total_files: usize,
    properties: Arc<PlanProperties>,
}

impl fmt::Debug for IcebergScan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IcebergScan")
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

impl DisplayAs for IcebergScan {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let files: usize = self.groups.iter().map(Vec::len).sum();
        write!(
            f,
            "IcebergScan: table={}, files={files} of {}, columns=[{}], predicate=[{}]",
            self.table.identifier(),
            self.total_files,
            self.read.join(", "),
            self.predicate
                .as_ref()
                .map_or_else(|| "none".to_owned(), ToString::to_string),
        )
    }
}

impl ExecutionPlan for IcebergScan {
    fn name(&self) -> &str {
        "IcebergScan"
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn with_new_children(self: Arc<Self>, _: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let tasks = self.groups.get(partition).cloned().unwrap_or_default();
        let reader = self
            .table
            .reader_builder()
            .with_batch_size(context.session_config().batch_size())
            .build();
        let output = self.output.clone();
        let rows_only = output.fields().is_empty();
        let stream = reader
            .read(futures::stream::iter(tasks.into_iter().map(Ok)).boxed())
            .map_err(external)?
            .stream()
            .map(move |batch| {
                let batch = batch.map_err(external)?;
                if rows_only {
                    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
                    Ok(RecordBatch::try_new_with_options(output.clone(), vec![], &options)?)
                } else {
                    // iceberg's batches carry field ids in their schema; results must not.
                    Ok(RecordBatch::try_new(output.clone(), batch.columns().to_vec())?)
                }
            });
        Ok(Box::pin(RecordBatchStreamAdapter::new(self.output.clone(), stream)))
    }
}
