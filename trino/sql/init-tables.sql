-- The table iceberg-sink writes, with the same spec, for when Trino starts first.
CREATE SCHEMA IF NOT EXISTS iceberg."default";

CREATE TABLE IF NOT EXISTS iceberg."default".weather (
    city VARCHAR NOT NULL,
    temperature DOUBLE NOT NULL,
    ts TIMESTAMP(6) WITH TIME ZONE NOT NULL
)
WITH (
    format = 'PARQUET',
    format_version = 2,
    partitioning = ARRAY['hour(ts)']
);
