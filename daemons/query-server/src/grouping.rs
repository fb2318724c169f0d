//! `GROUP BY` one string column of an Iceberg scan, on the keys of the Parquet dictionary the
//! column is stored with.
//!
//! DataFusion 53 groups by a string column by hashing and comparing every row's value; on the
//! weather table (`GROUP BY city`, a handful of cities in every file's dictionary) that is about
//! two fifths of a full scan's CPU. Its grouping cannot be swapped for another, so this
//! physical-plan rule replaces the partial aggregation sitting on the scan: the scan reads the
//! column as a dictionary, each dictionary value is looked up once per file (once per batch
//! where the file had no dictionary), and each row only maps its key to its group. The output
//! is the partial aggregation's, so DataFusion's final aggregation above it is unchanged. This
//! can go when DataFusion groups dictionary-encoded columns by their keys itself.

use std::{any::Any, collections::HashMap, fmt, sync::Arc};

use arrow_array::{
    Array, ArrayRef, DictionaryArray, RecordBatch, StringArray,
    builder::{ArrayBuilder, StringViewBuilder},
    cast::AsArray,
    types::Int32Type,
};
use arrow_schema::{DataType, SchemaRef};
use datafusion::{
    arrow::compute::filter_record_batch,
    common::{
        DataFusionError, Result,
        tree_node::{Transformed, TreeNode},
    },
    config::ConfigOptions,
    execution::{
        SendableRecordBatchStream, TaskContext,
        memory_pool::{MemoryConsumer, MemoryReservation},
    },
    logical_expr::{EmitTo, GroupsAccumulator},
    physical_expr::{
        EquivalenceProperties, PhysicalExpr, aggregate::AggregateFunctionExpr, expressions::Column,
        utils::collect_columns,
    },
    physical_optimizer::PhysicalOptimizerRule,
    physical_plan::{
        DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties,
        aggregates::{AggregateExec, AggregateMode},
        execution_plan::{Boundedness, EmissionType},
        filter::FilterExec,
        metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet},
        stream::RecordBatchStreamAdapter,
    },
};
use futures::StreamExt;

use crate::scan::IcebergScan;

/// The rule: a partial aggregation grouped by one string column of an [`IcebergScan`] (with
/// at most a filter between them) becomes a [`DictionaryAggregate`], when nothing but the
/// grouping reads that column and every aggregate has a groups accumulator.
#[derive(Debug, Default)]
pub struct GroupOnDictionary;

impl PhysicalOptimizerRule for GroupOnDictionary {
    fn optimize(&self, plan: Arc<dyn ExecutionPlan>, _: &ConfigOptions) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            Ok(match DictionaryAggregate::replacing(&node) {
                Some(replacement) => Transformed::yes(Arc::new(replacement) as Arc<dyn ExecutionPlan>),
                None => Transformed::no(node),
            })
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "group_on_dictionary"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// A partial aggregation by one string column read as a dictionary: its output is that of the
/// `AggregateExec` it replaces (the group's value as a string view, then each aggregate's state).
#[derive(Debug)]
pub struct DictionaryAggregate {
    /// The scan, reading the group column as a dictionary.
    input: Arc<dyn ExecutionPlan>,
    /// Applied to each batch before grouping; it does not read the group column.
    filter: Option<Arc<dyn PhysicalExpr>>,
    group: Column,
    aggregates: Vec<Arc<AggregateFunctionExpr>>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl DictionaryAggregate {
    /// What replaces `node`, if it is a partial aggregation this can do.
    fn replacing(node: &Arc<dyn ExecutionPlan>) -> Option<Self> {
        let aggregate = node.as_any().downcast_ref::<AggregateExec>()?;
        let group_by = aggregate.group_expr();
        let [(group, _)] = group_by.expr() else {
            return None;
        };
        let group = group.as_any().downcast_ref::<Column>()?.clone();
        let plain = *aggregate.mode() == AggregateMode::Partial
            && group_by.is_single()
            && aggregate.limit_options().is_none()
            && aggregate.filter_expr().iter().all(Option::is_none)
            && aggregate.aggr_expr().iter().all(|a| {
                a.groups_accumulator_supported()
                    && !a.is_distinct()
                    && a.order_bys().is_empty()
                    && a.expressions().iter().all(|e| !reads(e, &group))
            });
        if !plain {
            return None;
        }
        let (filter, scan) = match aggregate.input().as_any().downcast_ref::<FilterExec>() {
            Some(f) if f.projection().is_none() && f.fetch().is_none() && !reads(f.predicate(), &group) => {
                (Some(f.predicate().clone()), f.input())
            }
            Some(_) => return None,
            None => (None, aggregate.input()),
        };
        let scan = scan
            .as_any()
            .downcast_ref::<IcebergScan>()?
            .with_dictionary(group.index())?;
        let schema = aggregate.schema();
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            scan.properties().partitioning.clone(),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        Some(Self {
            input: Arc::new(scan),
            filter,
            group,
            aggregates: aggregate.aggr_expr().to_vec(),
            schema,
            properties: Arc::new(properties),
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }
}

/// Whether `expr` reads `column`.
fn reads(expr: &Arc<dyn PhysicalExpr>, column: &Column) -> bool {
    collect_columns(expr).iter().any(|c| c.index() == column.index())
}

impl DisplayAs for DictionaryAggregate {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let aggregates: Vec<&str> = self.aggregates.iter().map(|a| a.name()).collect();
        write!(
            f,
            "DictionaryAggregate: mode=Partial, gby=[{}], aggr=[{}]",
            self.group.name(),
            aggregates.join(", ")
        )?;
        if let Some(filter) = &self.filter {
            write!(f, ", filter={filter}")?;
        }
        Ok(())
    }
}

impl ExecutionPlan for DictionaryAggregate {
    fn name(&self) -> &str {
        "DictionaryAggregate"
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        let [input] = <[_; 1]>::try_from(children)
            .map_err(|_| DataFusionError::Internal("DictionaryAggregate has one input".into()))?;
        Ok(Arc::new(Self {
            input,
            filter: self.filter.clone(),
            group: self.group.clone(),
            aggregates: self.aggregates.clone(),
            schema: self.schema.clone(),
            properties: self.properties.clone(),
            metrics: ExecutionPlanMetricsSet::new(),
        }))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context.clone())?;
        let accumulators = self
            .aggregates
            .iter()
            .map(|a| Ok((a.expressions(), a.create_groups_accumulator()?)))
            .collect::<Result<Vec<_>>>()?;
        let grouping = Grouping {
            filter: self.filter.clone(),
            group: self.group.index(),
            groups: Groups::default(),
            rows: Vec::new(),
            accumulators,
            schema: self.schema.clone(),
            reservation: MemoryConsumer::new(format!("DictionaryAggregate[{partition}]"))
                .register(context.memory_pool()),
            metrics: BaselineMetrics::new(&self.metrics, partition),
        };
        let stream = futures::stream::unfold(Some((input, grouping)), |state| async move {
            let (mut input, mut grouping) = state?;
            while let Some(batch) = input.next().await {
                let elapsed = grouping.metrics.elapsed_compute().clone();
                let timer = elapsed.timer();
                let early = batch.and_then(|b| grouping.add(&b));
                timer.done();
                match early {
                    Ok(None) => {}
                    Ok(Some(out)) => return Some((Ok(out), Some((input, grouping)))),
                    Err(e) => return Some((Err(e), None)),
                }
            }
            let last = grouping.emit().transpose()?;
            Some((last, None))
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream)))
    }
}

/// An aggregate's arguments and its accumulator.
type Accumulator = (Vec<Arc<dyn PhysicalExpr>>, Box<dyn GroupsAccumulator>);

/// One partition's groups and their accumulators.
struct Grouping {
    filter: Option<Arc<dyn PhysicalExpr>>,
    /// Where the group column is in the input.
    group: usize,
    groups: Groups,
    /// Each row's group, for the batch being added.
    rows: Vec<usize>,
    accumulators: Vec<Accumulator>,
    schema: SchemaRef,
    reservation: MemoryReservation,
    metrics: BaselineMetrics,
}

impl Grouping {
    /// Adds `batch`'s rows to their groups; when the memory limit is reached, the groups so
    /// far are given out (a partial aggregation may give a group more than once; the final one
    /// merges them), as DataFusion's partial aggregation does.
    fn add(&mut self, batch: &RecordBatch) -> Result<Option<RecordBatch>> {
        let filtered;
        let batch = match &self.filter {
            Some(filter) => {
                let keep = filter.evaluate(batch)?.into_array(batch.num_rows())?;
                let keep = keep.as_boolean_opt().ok_or_else(|| internal(keep.data_type()))?;
                filtered = filter_record_batch(batch, keep)?;
                &filtered
            }
            None => batch,
        };
        self.groups.of_rows(batch.column(self.group), &mut self.rows)?;
        for (arguments, accumulator) in &mut self.accumulators {
            let values = arguments
                .iter()
                .map(|e| e.evaluate(batch)?.into_array(batch.num_rows()))
                .collect::<Result<Vec<_>>>()?;
            accumulator.update_batch(&values, &self.rows, None, self.groups.len())?;
        }
        if self.reservation.try_resize(self.size()).is_ok() {
            return Ok(None);
        }
        let early = self.emit()?;
        self.reservation.try_resize(self.size())?;
        Ok(early)
    }

    /// The groups so far with their aggregates' states, `None` if there are none; starts
    /// again with no group.
    fn emit(&mut self) -> Result<Option<RecordBatch>> {
        if self.groups.len() == 0 {
            return Ok(None);
        }
        let mut columns: Vec<ArrayRef> = vec![Arc::new(self.groups.take())];
        for (_, accumulator) in &mut self.accumulators {
            columns.extend(accumulator.state(EmitTo::All)?);
        }
        let batch = RecordBatch::try_new(self.schema.clone(), columns)?;
        self.metrics.record_output(batch.num_rows());
        Ok(Some(batch))
    }

    fn size(&self) -> usize {
        self.groups.size()
            + self.rows.capacity() * size_of::<usize>()
            + self.accumulators.iter().map(|(_, a)| a.size()).sum::<usize>()
    }
}

/// The groups: each distinct value of the column (or null) has an index, in order of first
/// appearance.
#[derive(Default)]
struct Groups {
    index: HashMap<Box<str>, usize>,
    null: Option<usize>,
    /// Each group's value, by group index.
    values: StringViewBuilder,
    bytes: usize,
    /// The dictionary of the last batch, and the group of each of its keys seen so far.
    dictionary: Option<ArrayRef>,
    keys: Vec<usize>,
}

/// A dictionary key not yet looked up.
const UNSEEN: usize = usize::MAX;

impl Groups {
    fn len(&self) -> usize {
        self.values.len()
    }

    /// Each row's group in `rows`, the column's values added as groups where new. The rows'
    /// keys are looked up in a dictionary once per dictionary, not once per row.
    fn of_rows(&mut self, column: &ArrayRef, rows: &mut Vec<usize>) -> Result<()> {
        let dictionary = column
            .as_any()
            .downcast_ref::<DictionaryArray<Int32Type>>()
            .ok_or_else(|| internal(column.data_type()))?;
        let values = dictionary.values();
        let strings = values
            .as_string_opt::<i32>()
            .ok_or_else(|| internal(values.data_type()))?;
        if !self.dictionary.as_ref().is_some_and(|d| Arc::ptr_eq(d, values)) {
            self.dictionary = Some(values.clone());
            self.keys.clear();
            self.keys.resize(values.len(), UNSEEN);
        }
        rows.clear();
        let keys = dictionary.keys();
        for (row, key) in keys.values().iter().enumerate() {
            if keys.is_null(row) {
                rows.push(self.null());
                continue;
            }
            // A key is within the dictionary: DictionaryArray checks it when built.
            let key = *key as usize;
            let group = match self.keys[key] {
                UNSEEN => {
                    let group = self.of_value(strings, key);
                    self.keys[key] = group;
                    group
                }
                group => group,
            };
            rows.push(group);
        }
        Ok(())
    }

    fn of_value(&mut self, strings: &StringArray, key: usize) -> usize {
        if strings.is_null(key) {
            return self.null();
        }
        let value = strings.value(key);
        if let Some(group) = self.index.get(value) {
            return *group;
        }
        let group = self.len();
        self.values.append_value(value);
        self.bytes += value.len() + size_of::<(Box<str>, usize)>();
        self.index.insert(value.into(), group);
        group
    }

    fn null(&mut self) -> usize {
        *self.null.get_or_insert_with(|| {
            self.values.append_null();
            self.values.len() - 1
        })
    }

    /// The groups' values in order; starts again with none.
    fn take(&mut self) -> arrow_array::StringViewArray {
        let values = self.values.finish();
        *self = Self::default();
        values
    }

    fn size(&self) -> usize {
        // Each group's string twice (the index and the values) and its view.
        2 * self.bytes + self.len() * 16 + self.keys.capacity() * size_of::<usize>()
    }
}

/// A column of a type the plan rules out: the group column not a dictionary of strings, or
/// the filter not a boolean.
fn internal(data_type: &DataType) -> DataFusionError {
    DataFusionError::Internal(format!("DictionaryAggregate was given a {data_type} column"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dictionary(keys: Vec<Option<i32>>, values: &ArrayRef) -> ArrayRef {
        Arc::new(DictionaryArray::<Int32Type>::try_new(keys.into(), values.clone()).expect("keys within the values"))
    }

    #[test]
    fn rows_get_the_group_of_their_value_across_dictionaries() {
        let mut groups = Groups::default();
        let mut rows = Vec::new();
        let first: ArrayRef = Arc::new(StringArray::from(vec![Some("Oslo"), Some("Lima"), None, Some("Kyiv")]));
        groups
            .of_rows(&dictionary(vec![Some(1), Some(1), Some(0), None], &first), &mut rows)
            .expect("a dictionary of strings");
        assert_eq!(rows, vec![0, 0, 1, 2], "Lima, Lima, Oslo, a null key");
        // "Kyiv" is in the dictionary but in no row: it is no group.
        assert_eq!(groups.len(), 3);
        // Another file's dictionary, in another order, with a null value.
        let second: ArrayRef = Arc::new(StringArray::from(vec![Some("Oslo"), None, Some("Kyiv"), Some("Lima")]));
        groups
            .of_rows(
                &dictionary(vec![Some(3), Some(2), Some(1), Some(0)], &second),
                &mut rows,
            )
            .expect("a dictionary of strings");
        assert_eq!(rows, vec![0, 3, 2, 1], "Lima, Kyiv (new), null, Oslo");
        let values = groups.take();
        let values: Vec<Option<&str>> = values.iter().collect();
        assert_eq!(values, vec![Some("Lima"), Some("Oslo"), None, Some("Kyiv")]);
        assert_eq!(groups.len(), 0, "taking the groups starts again");
        groups
            .of_rows(&dictionary(vec![Some(2)], &second), &mut rows)
            .expect("a dictionary of strings");
        assert_eq!(rows, vec![0], "no group index is kept from before");
    }

    #[test]
    fn a_column_that_is_not_a_dictionary_is_an_error_not_a_panic() {
        let mut rows = Vec::new();
        let plain: ArrayRef = Arc::new(StringArray::from(vec!["Oslo"]));
        assert!(Groups::default().of_rows(&plain, &mut rows).is_err());
    }
}
