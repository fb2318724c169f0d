//! Reading one planned data file: with the Parquet reader directly, strings as string views
//! (or as the Parquet dictionary's keys, for the column a scan groups by: `grouping.rs`),
//! when the file is plain enough to need nothing of what iceberg's reader adds; else with
//! iceberg's reader, its strings then turned into views.
//!
//! iceberg's reader (0.10.1) decodes every string column into contiguous strings, copying each
//! value out of the file's dictionary; as string views they point into it, and grouping by them
//! (`GROUP BY city`) hashes views rather than copied strings. A file is plain when it is read
//! whole, with no row-level deletes and no row filter, in Parquet, and every column read is
//! found in it by its Iceberg field id, at the top level, with the table's type (so no type
//! promotion, no column added since the file was written, no identity-partition constant).
//! This boundary can go when iceberg's reader can be asked for string views.

use std::sync::Arc;

use arrow_array::{RecordBatch, RecordBatchOptions};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use iceberg::{
    arrow::ArrowFileReader,
    io::FileMetadata,
    scan::FileScanTask,
    spec::{DataFileFormat, Transform},
    table::Table,
};
use parquet::arrow::{
    PARQUET_FIELD_ID_META_KEY, ParquetRecordBatchStreamBuilder, ProjectionMask,
    arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions},
};

/// The record batches of one file, as the scan's output schema has them.
pub type Batches = BoxStream<'static, iceberg::Result<RecordBatch>>;

/// What a scan reads of each file, the same for all of them.
#[derive(Clone)]
pub struct Reading {
    /// Its FileIO reads the files; its reader reads those that are not plain.
    pub table: Table,
    pub batch_size: usize,
    /// The columns read, with their field ids, in the order the output has them.
    pub columns: Vec<(i32, Field)>,
    /// The scan's output: the columns read, or none when only the rows are counted.
    pub output: SchemaRef,
}

impl Reading {
    /// The batches of `task`'s file.
    pub async fn file(self, task: FileScanTask) -> iceberg::Result<Batches> {
        let batches = match self.plain(&task).await? {
            Some(batches) => batches,
            // Built only for a file that needs it: building one reads the CPU count from the
            // OS (its cgroup files) each time.
            None => self
                .table
                .reader_builder()
                .with_batch_size(self.batch_size)
                .build()
                .read(futures::stream::iter([Ok(task)]).boxed())?
                .stream(),
        };
        let output = self.output.clone();
        Ok(batches.map(move |batch| shaped(batch?, &output)).boxed())
    }

    /// `task`'s file through the Parquet reader, if it is plain; `None` if it is not.
    async fn plain(&self, task: &FileScanTask) -> iceberg::Result<Option<Batches>> {
        let whole = whole_file(task)
            && task.deletes.is_empty()
            && task.predicate.is_none()
            && task.data_file_format == DataFileFormat::Parquet;
        let identity = task.partition_spec.as_ref().is_some_and(|spec| {
            spec.fields()
                .iter()
                .any(|f| f.transform == Transform::Identity && self.columns.iter().any(|(id, _)| *id == f.source_id))
        });
        if !whole || identity {
            return Ok(None);
        }
        let input = self.table.file_io().new_input(&task.data_file_path)?;
        let mut reader = ArrowFileReader::new(
            FileMetadata {
                size: task.file_size_in_bytes,
            },
            input.reader().await?,
        );
        let metadata = ArrowReaderMetadata::load_async(&mut reader, ArrowReaderOptions::new())
            .await
            .map_err(parquet_error)?;
        let Some(roots) = roots(metadata.schema(), &self.columns) else {
            return Ok(None);
        };
        let options =
            ArrowReaderOptions::new().with_schema(Arc::new(as_read(metadata.schema(), &roots, &self.columns)));
        let metadata = ArrowReaderMetadata::try_new(metadata.metadata().clone(), options).map_err(parquet_error)?;
        let builder = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, metadata);
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots.iter().copied());
        let stream = builder
            .with_projection(mask)
            .with_batch_size(self.batch_size)
            .build()
            .map_err(parquet_error)?;
        let from = in_output_order(&roots);
        Ok(Some(
            stream
                .map(move |batch| batch.and_then(|b| b.project(&from).map_err(Into::into)))
                .map_err(parquet_error)
                .boxed(),
        ))
    }
}

/// The top-level position in `file` of each column (by field id, with the table's type,
/// strings as any string type), or `None` if one is missing or differs.
fn roots(file: &Schema, columns: &[(i32, Field)]) -> Option<Vec<usize>> {
    columns
        .iter()
        .map(|(id, wanted)| {
            let position = file.fields().iter().position(|f| {
                f.metadata()
                    .get(PARQUET_FIELD_ID_META_KEY)
                    .is_some_and(|v| v.parse::<i32>().ok() == Some(*id))
            })?;
            same_type(file.field(position).data_type(), wanted.data_type()).then_some(position)
        })
        .collect()
}

/// Where each output column is in a batch the reader gives: it gives the columns `roots`
/// names in the file's order, the output wants them in `roots`' order.
fn in_output_order(roots: &[usize]) -> Vec<usize> {
    roots
        .iter()
        .map(|root| roots.iter().filter(|other| *other < root).count())
        .collect()
}

fn same_type(file: &DataType, wanted: &DataType) -> bool {
    match (file, wanted) {
        (DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View, DataType::Utf8View) => true,
        (DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View, wanted) => *wanted == string_dictionary(),
        _ => file == wanted,
    }
}

/// A string column read as the Parquet dictionary's keys and values (see `grouping.rs`).
pub fn string_dictionary() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// Whether `task` reads its whole file (iceberg plans a file from 0 to its size), not a split.
pub fn whole_file(task: &FileScanTask) -> bool {
    task.start == 0 && task.length == task.file_size_in_bytes
}

/// `field`, a string as a string view.
pub fn as_string_view(field: &Field) -> Field {
    match field.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 => field.clone().with_data_type(DataType::Utf8View),
        _ => field.clone(),
    }
}

/// The `file`'s schema as the Parquet reader is asked to give it: its top-level strings as
/// string views, or as a dictionary where the column read at that root asks for one.
fn as_read(file: &Schema, roots: &[usize], columns: &[(i32, Field)]) -> Schema {
    let fields = file.fields().iter().enumerate().map(|(position, f)| {
        let wanted = roots.iter().zip(columns).find(|(root, _)| **root == position);
        match wanted {
            Some((_, (_, w))) if *w.data_type() == string_dictionary() => {
                f.as_ref().clone().with_data_type(string_dictionary())
            }
            _ => as_string_view(f),
        }
    });
    Schema::new_with_metadata(fields.collect::<Vec<_>>(), file.metadata().clone())
}

/// A batch under the output's schema: strings from iceberg's reader become views; when only
/// rows are counted, the batch keeps its row count and no column.
fn shaped(batch: RecordBatch, output: &SchemaRef) -> iceberg::Result<RecordBatch> {
    if output.fields().is_empty() {
        let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
        return Ok(RecordBatch::try_new_with_options(output.clone(), vec![], &options)?);
    }
    let columns = batch
        .columns()
        .iter()
        .zip(output.fields())
        .map(|(column, field)| match column.data_type() == field.data_type() {
            true => Ok(column.clone()),
            false => arrow_cast::cast(column, field.data_type()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(output.clone(), columns)?)
}

fn parquet_error(e: parquet::errors::ParquetError) -> iceberg::Error {
    iceberg::Error::new(iceberg::ErrorKind::DataInvalid, "reading a Parquet data file").with_source(e)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn with_id(name: &str, data_type: DataType, id: i32) -> Field {
        Field::new(name, data_type, true)
            .with_metadata(HashMap::from([(PARQUET_FIELD_ID_META_KEY.to_owned(), id.to_string())]))
    }

    #[test]
    fn columns_are_found_by_field_id_not_by_name_or_place() {
        let file = Schema::new(vec![
            with_id("renamed_city", DataType::Utf8, 1),
            with_id("temperature", DataType::Float64, 2),
            with_id(
                "ts",
                DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, Some("+00:00".into())),
                3,
            ),
        ]);
        let wanted = |id: i32, data_type: DataType| (id, Field::new("x", data_type, true));
        assert_eq!(
            roots(&file, &[wanted(2, DataType::Float64), wanted(1, DataType::Utf8View)]),
            Some(vec![1, 0])
        );
        // A column added after the file was written, or promoted since: iceberg's reader.
        assert_eq!(roots(&file, &[wanted(4, DataType::Utf8View)]), None);
        assert_eq!(roots(&file, &[wanted(2, DataType::Float32)]), None);
        // A file without field ids needs iceberg's name mapping or its fallback ids.
        let bare = Schema::new(vec![Field::new("temperature", DataType::Float64, true)]);
        assert_eq!(roots(&bare, &[wanted(2, DataType::Float64)]), None);
    }

    #[test]
    fn columns_come_back_in_the_order_the_scan_asked_for() {
        // Asked for the file's columns 2, 0 and 1: the reader gives 0, 1, 2.
        assert_eq!(in_output_order(&[2, 0, 1]), vec![2, 0, 1]);
        assert_eq!(in_output_order(&[1, 3]), vec![0, 1]);
        assert_eq!(in_output_order(&[3, 1]), vec![1, 0]);
    }

    #[test]
    fn strings_are_read_as_views_or_dictionaries_and_the_rest_as_the_file_has_it() {
        let file = Schema::new(vec![
            with_id("city", DataType::Utf8, 1),
            with_id("temperature", DataType::Float64, 2),
            with_id("station", DataType::Utf8, 3),
        ]);
        let column = |id: i32, data_type: DataType| (id, Field::new("x", data_type, true));
        let views = [column(1, DataType::Utf8View), column(2, DataType::Float64)];
        let read = as_read(&file, &[0, 1], &views);
        assert_eq!(read.field(0).data_type(), &DataType::Utf8View);
        assert_eq!(read.field(0).metadata(), file.field(0).metadata(), "the field id stays");
        assert_eq!(read.field(1), file.field(1));
        // The station, asked for as a dictionary, in second place.
        let dictionary = [column(1, DataType::Utf8View), column(3, string_dictionary())];
        let read = as_read(&file, &[0, 2], &dictionary);
        assert_eq!(read.field(0).data_type(), &DataType::Utf8View);
        assert_eq!(read.field(2).data_type(), &string_dictionary());
        assert_eq!(read.field(2).metadata(), file.field(2).metadata());
        assert_eq!(
            roots(&file, &dictionary),
            Some(vec![0, 2]),
            "a string column may be read as a dictionary"
        );
    }
}
