//! The Iceberg table as a DataFusion table: filters on columns become an Iceberg predicate, so
//! iceberg's planning skips the `hour(ts)` partitions and files a filter rules out, and the
//! files left are read (`files.rs`) spread over the engine's partitions. Strings are string
//! views (`Utf8View`) throughout.

use std::{any::Any, fmt, sync::Arc};

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::{
    catalog::Session,
    common::{DataFusionError, Result, ScalarValue, Statistics, stats::Precision},
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

use weather_common::lakehouse;

use crate::{
    Metrics,
    files::{self, Reading},
    history::Entry,
    tables::Loaded,
};

pub fn external(e: iceberg::Error) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// A table of the catalog, as loaded when the query was planned: the query reads that
/// snapshot, whatever is committed meanwhile.
#[derive(Debug)]
pub struct IcebergTable {
    loaded: Loaded,
    metrics: Arc<Metrics>,
}

impl IcebergTable {
    pub fn new(loaded: Loaded, metrics: Arc<Metrics>) -> Self {
        Self { loaded, metrics }
    }
}

#[async_trait]
impl TableProvider for IcebergTable {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn schema(&self) -> SchemaRef {
        self.loaded.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Every filter that becomes a predicate (or an hour of day) prunes partitions and files;
    /// DataFusion still applies it to the rows read (Inexact), as a file holds rows on both
    /// sides of a bound.
    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| {
                if predicate(&self.loaded.table, f).is_some() || hour_of_day(&self.loaded.table, f).is_some() {
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
            Some(p) => self.loaded.schema.project(p)?,
            None => self.loaded.schema.as_ref().clone(),
        });
        // An empty projection (`count(*)`) still needs rows: read the narrowest column.
        let read: Vec<&Field> = match output.fields().len() {
            0 => vec![self.loaded.schema.field(0)],
            _ => output.fields().iter().map(AsRef::as_ref).collect(),
        };
        let iceberg_schema = self.loaded.table.metadata().current_schema();
        let columns = read
            .into_iter()
            .map(|f| {
                let id = iceberg_schema.field_by_name(f.name()).map(|c| c.id);
                id.map(|id| (id, f.clone()))
                    .ok_or_else(|| DataFusionError::Plan(format!("no column {} in the table", f.name())))
            })
            .collect::<Result<Vec<_>>>()?;
        let predicate = filters
            .iter()
            .filter_map(|f| predicate(&self.loaded.table, f))
            .reduce(Predicate::and);
        let mut builder = self
            .loaded
            .table
            .scan()
            .select(columns.iter().map(|(_, f)| f.name().clone()));
        if let Some(predicate) = &predicate {
            builder = builder.with_filter(predicate.clone());
        }
        let scan = builder.build().map_err(external)?;
        // The snapshot's file count only feeds EXPLAIN and the metrics: read beside the planning.
        let (mut tasks, total_files) =
            futures::try_join!(planned_files(&scan), self.loaded.data_files()).map_err(external)?;
        let hours: Vec<HourOfDay> = filters
            .iter()
            .filter_map(|f| hour_of_day(&self.loaded.table, f))
            .collect();
        tasks.retain(|task| hours.iter().all(|h| h.may_match(task)));
        self.metrics.files_scanned.inc_by(tasks.len() as u64);
        self.metrics
            .files_skipped
            .inc_by(total_files.saturating_sub(tasks.len()) as u64);
        // What prunes files: the Iceberg predicate and the hours of day.
        let filter = predicate
            .as_ref()
            .map(ToString::to_string)
            .into_iter()
            .chain(hours.iter().map(ToString::to_string))
            .reduce(|a, b| format!("{a} AND {b}"));
        if let Some(entry) = state.config().get_extension::<Entry>() {
            let (rows, bytes) = tasks.iter().fold((0, 0), |(rows, bytes), t| {
                (rows + t.record_count.unwrap_or(0), bytes + t.length)
            });
            let filter = filter.clone();
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
            table: self.loaded.table.clone(),
            output: output.clone(),
            columns,
            predicate,
            filter,
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

/// What a planned file says about the rows a scan of it gives.
struct FileRows {
    /// As its manifest entry records them.
    records: Option<u64>,
    /// The task reads the whole file, not a split of it.
    whole: bool,
    /// Row-level deletes apply to it.
    deletes: bool,
}

/// The rows a scan gives, when the manifests say it exactly: every file read whole, with its
/// record count known, no row-level deletes, and no predicate filtering rows as they are read.
fn exact_rows(files: impl Iterator<Item = FileRows>, filtered: bool) -> Option<u64> {
    if filtered {
        return None;
    }
    files
        .map(|f| if f.whole && !f.deletes { f.records } else { None })
        .sum()
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

/// `hour(column) <op> hour`, where the table is partitioned by the column's `hour` transform:
/// every row of a file has the hour of day of its partition (hours since the epoch, UTC), so a
/// file whose partition's hour fails the comparison has no matching row. `hour()` reads a
/// timestamp in its own zone, which for the table's columns is UTC (or none).
#[derive(Debug)]
struct HourOfDay {
    column: String,
    /// Where the hour is in a file's partition: the table has one partition spec, so every
    /// file's partition is of that spec (iceberg's planned files do not name theirs).
    position: usize,
    op: Operator,
    hour: i64,
}

impl HourOfDay {
    /// Whether `task`'s file may hold a matching row: yes unless its partition says no.
    fn may_match(&self, task: &FileScanTask) -> bool {
        lakehouse::file_hour(task, self.position)
            .is_none_or(|hours| compares(i64::from(hours).rem_euclid(24), self.op, self.hour))
    }
}

impl fmt::Display for HourOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hour({}) {} {} (by partition)", self.column, self.op, self.hour)
    }
}

/// `hour(column) <op> literal` (or the other way round) on a timestamp column in UTC.
fn hour_of_day(table: &Table, expr: &Expr) -> Option<HourOfDay> {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = expr else {
        return None;
    };
    let hour_of = |e: &Expr| match e {
        Expr::ScalarFunction(f) if f.func.name() == "hour" => match f.args.as_slice() {
            [Expr::Column(c)] => Some(c.name.clone()),
            _ => None,
        },
        _ => None,
    };
    let number = |e: &Expr| match e {
        Expr::Literal(ScalarValue::Int64(Some(v)), _) => Some(*v),
        _ => None,
    };
    let (column, op, hour) = match (hour_of(left), hour_of(right)) {
        (Some(c), None) => (c, *op, number(right)?),
        (None, Some(c)) => (c, flip(*op)?, number(left)?),
        _ => return None,
    };
    let field = table.metadata().current_schema().field_by_name(&column)?;
    let utc = matches!(
        field.field_type.as_ref(),
        Type::Primitive(
            PrimitiveType::Timestamptz
                | PrimitiveType::Timestamp
                | PrimitiveType::TimestamptzNs
                | PrimitiveType::TimestampNs
        )
    );
    let position = lakehouse::hour_partition(table.metadata(), field.id)?;
    (utc && compare_op(op)).then_some(HourOfDay {
        column,
        position,
        op,
        hour,
    })
}

fn compare_op(op: Operator) -> bool {
    matches!(
        op,
        Operator::Eq | Operator::NotEq | Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq
    )
}

fn compares(left: i64, op: Operator, right: i64) -> bool {
    match op {
        Operator::Eq => left == right,
        Operator::NotEq => left != right,
        Operator::Lt => left < right,
        Operator::LtEq => left <= right,
        Operator::Gt => left > right,
        Operator::GtEq => left >= right,
        _ => true,
    }
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
#[derive(Clone)]
pub struct IcebergScan {
    table: Table,
    output: SchemaRef,
    /// Columns read from the files, with their field ids (one, when the query needs only the
    /// row count).
    columns: Vec<(i32, Field)>,
    predicate: Option<Predicate>,
    /// The predicate and the hours of day, as EXPLAIN and the query's page show them.
    filter: Option<String>,
    groups: Vec<Vec<FileScanTask>>,
    total_files: usize,
    properties: Arc<PlanProperties>,
}

impl fmt::Debug for IcebergScan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IcebergScan")
            .field("read", &self.column_names())
            .finish_non_exhaustive()
    }
}

impl IcebergScan {
    fn column_names(&self) -> Vec<&str> {
        self.columns.iter().map(|(_, f)| f.name().as_str()).collect()
    }

    /// This scan with its string column at `index` read as a dictionary
    /// ([`files::string_dictionary`]): only for a plan that reads it as one (`grouping.rs`),
    /// as its type is no longer the table's.
    pub fn with_dictionary(&self, index: usize) -> Option<Self> {
        let field = self.output.fields().get(index)?;
        let (_, column) = self.columns.get(index)?;
        if column.name() != field.name() || *field.data_type() != DataType::Utf8View {
            return None;
        }
        let dictionary = field.as_ref().clone().with_data_type(files::string_dictionary());
        let mut fields: Vec<Field> = self.output.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields[index] = dictionary.clone();
        let output = Arc::new(Schema::new_with_metadata(fields, self.output.metadata().clone()));
        let mut columns = self.columns.clone();
        columns[index].1 = dictionary;
        let properties = PlanProperties::new(
            EquivalenceProperties::new(output.clone()),
            self.properties.partitioning.clone(),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Some(Self {
            output,
            columns,
            properties: Arc::new(properties),
            ..self.clone()
        })
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
            self.column_names().join(", "),
            self.filter.as_deref().unwrap_or("none"),
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

    /// The row count, exact when the files are read whole and as they are: DataFusion then
    /// answers `count(*)` from it without reading a row.
    fn partition_statistics(&self, partition: Option<usize>) -> Result<Statistics> {
        let tasks: Vec<&FileScanTask> = match partition {
            Some(i) => self.groups.get(i).into_iter().flatten().collect(),
            None => self.groups.iter().flatten().collect(),
        };
        let mut statistics = Statistics::new_unknown(&self.output);
        let files = tasks.iter().map(|t| FileRows {
            records: t.record_count,
            whole: files::whole_file(t),
            deletes: !t.deletes.is_empty(),
        });
        if let Some(rows) = exact_rows(files, self.predicate.is_some()) {
            statistics.num_rows = Precision::Exact(rows as usize);
        }
        Ok(statistics)
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let tasks = self.groups.get(partition).cloned().unwrap_or_default();
        let batch_size = context.session_config().batch_size();
        let reading = Reading {
            table: self.table.clone(),
            batch_size,
            columns: self.columns.clone(),
            output: self.output.clone(),
        };
        // The next file is opened (its footer read) while this one's rows are read.
        let stream = futures::stream::iter(tasks)
            .map(move |task| reading.clone().file(task))
            .buffered(2)
            .try_flatten()
            .map_err(external);
        Ok(Box::pin(RecordBatchStreamAdapter::new(self.output.clone(), stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_hour_of_day_compares_as_sql_does() {
        assert!(compares(14, Operator::Eq, 14));
        assert!(!compares(13, Operator::Eq, 14));
        assert!(compares(13, Operator::Lt, 14) && !compares(14, Operator::Lt, 14));
        assert!(compares(14, Operator::GtEq, 14) && compares(3, Operator::NotEq, 14));
        // Hours before the epoch are hours of their day too.
        assert_eq!((-1_i64).rem_euclid(24), 23);
    }

    fn file(records: Option<u64>, whole: bool, deletes: bool) -> FileRows {
        FileRows {
            records,
            whole,
            deletes,
        }
    }

    #[test]
    fn the_row_count_is_exact_only_for_whole_files_without_deletes_read_unfiltered() {
        let plain = || vec![file(Some(10), true, false), file(Some(5), true, false)].into_iter();
        assert_eq!(exact_rows(plain(), false), Some(15));
        assert_eq!(
            exact_rows(plain(), true),
            None,
            "a predicate drops rows as they are read"
        );
        assert_eq!(exact_rows(std::iter::empty(), false), Some(0), "an empty table");
        for odd in [
            file(None, true, false),
            file(Some(5), false, false),
            file(Some(5), true, true),
        ] {
            assert_eq!(exact_rows(plain().chain([odd]), false), None);
        }
    }
}
