//! Writing the table's Parquet data files: the sink's readings, and the rows of files being
//! compacted (this sink's or another engine's), into `hour(ts)` partitions.

use std::{collections::BTreeMap, sync::Arc};

use anyhow::Context;
use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use iceberg::{
    spec::{DataFile, DataFileFormat, Literal, PartitionKey, Struct},
    table::Table,
    writer::{
        base_writer::data_file_writer::DataFileWriterBuilder,
        file_writer::{
            ParquetWriterBuilder,
            location_generator::{DefaultFileNameGenerator, DefaultLocationGenerator},
            rolling_writer::RollingFileWriterBuilder,
        },
        partitioning::{PartitioningWriter, fanout_writer::FanoutWriter},
    },
};
use parquet::{
    basic::{Compression, ZstdLevel},
    file::properties::WriterProperties,
};
use weather_common::WeatherReading;

/// Parquet with ZSTD: the table property names it for other engines; this writer must be told
/// itself.
fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build()
}

/// A writer of Parquet data files into `table`'s partitions, rolled at `target_file_size`.
fn data_writer(table: &Table, target_file_size: usize) -> anyhow::Result<impl PartitioningWriter> {
    let metadata = table.metadata();
    let parquet = ParquetWriterBuilder::new(writer_properties(), metadata.current_schema().clone());
    let rolling = RollingFileWriterBuilder::new(
        parquet,
        target_file_size,
        table.file_io().clone(),
        DefaultLocationGenerator::new(metadata)?,
        DefaultFileNameGenerator::new(uuid::Uuid::new_v4().to_string(), None, DataFileFormat::Parquet),
    );
    Ok(FanoutWriter::new(DataFileWriterBuilder::new(rolling)))
}

/// The partition key of `hour` (hours since the epoch) in `table`'s `hour(ts)` spec.
fn hour_key(table: &Table, hour: i32) -> PartitionKey {
    let metadata = table.metadata();
    PartitionKey::new(
        metadata.default_partition_spec().as_ref().clone(),
        metadata.current_schema().clone(),
        Struct::from_iter([Some(Literal::int(hour))]),
    )
}

/// Reads the data files `paths` of partition `hour` one at a time and writes their rows again
/// as files near `target_file_size`: the new files, not yet committed. Holds one file's rows
/// at a time, whatever the partition's size.
pub async fn rewrite_partition(
    table: &Table,
    hour: i32,
    paths: &[String],
    target_file_size: usize,
) -> anyhow::Result<Vec<DataFile>> {
    let arrow_schema = Arc::new(iceberg::arrow::schema_to_arrow_schema(
        table.metadata().current_schema(),
    )?);
    let mut writer = data_writer(table, target_file_size)?;
    let key = hour_key(table, hour);
    for path in paths {
        let bytes = table.file_io().new_input(path)?.read().await?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
        for batch in reader {
            let batch = conform(&batch?, &arrow_schema).with_context(|| format!("compacting {path}"))?;
            writer.write(key.clone(), batch).await?;
        }
    }
    Ok(writer.close().await?)
}

/// `batch`, read from a data file that this sink or another engine wrote, in the table's
/// `schema`: each column found by its Iceberg field id (by name in files without ids), then cast
/// where the writer chose another Arrow type for the same Iceberg type (PyIceberg writes
/// `timestamptz` as `Timestamp(µs, "UTC")`, this sink as `Timestamp(µs, "+00:00")`).
fn conform(batch: &RecordBatch, schema: &arrow_schema::SchemaRef) -> anyhow::Result<RecordBatch> {
    const FIELD_ID: &str = "PARQUET:field_id";
    let source = batch.schema();
    let columns = schema
        .fields()
        .iter()
        .map(|field| {
            let id = field.metadata().get(FIELD_ID);
            let found = source
                .fields()
                .iter()
                .position(|f| id.is_some() && f.metadata().get(FIELD_ID) == id)
                .or_else(|| source.index_of(field.name()).ok())
                .with_context(|| format!("the file has no column {}", field.name()))?;
            let column = batch.column(found);
            Ok(if column.data_type() == field.data_type() {
                column.clone()
            } else {
                arrow_cast::cast(column, field.data_type())?
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// Writes `readings` into `table`'s hour partitions as Parquet files rolled at
/// `target_file_size`: the new files, not yet committed.
pub async fn write(
    table: &Table,
    readings: &[WeatherReading],
    target_file_size: usize,
) -> anyhow::Result<Vec<DataFile>> {
    let metadata = table.metadata();
    let arrow_schema = Arc::new(iceberg::arrow::schema_to_arrow_schema(metadata.current_schema())?);
    let mut writer = data_writer(table, target_file_size)?;

    let mut by_hour: BTreeMap<i64, Vec<&WeatherReading>> = BTreeMap::new();
    for reading in readings {
        by_hour
            .entry(reading.ts.timestamp().div_euclid(3600))
            .or_default()
            .push(reading);
    }
    let ts_type = arrow_schema.field(2).data_type().clone();
    for (hour, rows) in by_hour {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.city.as_str()))),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.temperature))),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.ts.timestamp_micros()))
                    .with_data_type(ts_type.clone()),
            ),
        ];
        let batch = RecordBatch::try_new(arrow_schema.clone(), columns)?;
        writer.write(hour_key(table, i32::try_from(hour)?), batch).await?;
    }
    Ok(writer.close().await?)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use arrow_schema::{DataType, Field, Schema as ArrowSchema, TimeUnit};

    use super::*;

    fn field(name: &str, id: &str, data_type: DataType) -> Field {
        Field::new(name, data_type, false).with_metadata(HashMap::from([("PARQUET:field_id".into(), id.into())]))
    }

    /// Another engine's file: the columns in another order, one renamed since (found by its
    /// id), `ts` in PyIceberg's Arrow type.
    #[test]
    fn another_engines_file_is_read_in_the_tables_schema() {
        let table = Arc::new(
            iceberg::arrow::schema_to_arrow_schema(&crate::table::schema().expect("schema")).expect("arrow schema"),
        );
        let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let theirs = Arc::new(ArrowSchema::new(vec![
            field("ts", "3", utc.clone()),
            field("town", "1", DataType::Utf8),
            field("temperature", "2", DataType::Float64),
        ]));
        let batch = RecordBatch::try_new(
            theirs,
            vec![
                Arc::new(TimestampMicrosecondArray::from(vec![7]).with_timezone("UTC")) as ArrayRef,
                Arc::new(StringArray::from(vec!["Oslo"])),
                Arc::new(Float64Array::from(vec![1.5])),
            ],
        )
        .expect("batch");
        let ours = conform(&batch, &table).expect("conform");
        assert_eq!(ours.schema(), table);
        let city = ours.column(0).as_any().downcast_ref::<StringArray>().expect("city");
        assert_eq!(city.value(0), "Oslo");
        let ts = ours
            .column(2)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .expect("ts");
        assert_eq!(ts.value(0), 7);

        let without_ts = RecordBatch::try_new(
            Arc::new(ArrowSchema::new(vec![field("city", "1", DataType::Utf8)])),
            vec![Arc::new(StringArray::from(vec!["Oslo"])) as ArrayRef],
        )
        .expect("batch");
        let error = conform(&without_ts, &table).expect_err("a column is missing");
        assert!(error.to_string().contains("no column temperature"), "{error}");
    }
}
