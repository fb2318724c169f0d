"""Independent reader: opens the table the sink wrote through PyIceberg's SqlCatalog (the same
catalog tables Trino's JDBC catalog uses) and prints what it finds as JSON.

usage: pyiceberg_check.py CATALOG_URL CATALOG_NAME S3_ENDPOINT NAMESPACE.TABLE [--readings]
                          [--credentials FILE] [--duckdb] [--windows SECONDS]

With --readings the output also lists every row as [city, temperature], for exactly-once checks.
With --windows the output also lists the tumbling windows of that many seconds per city, aligned
to the Unix epoch, as [city, start in epoch milliseconds, readings, temperature sum].
With --duckdb, DuckDB's iceberg_scan reads the same metadata file as a third reader (directory
warehouses only) and its counts are under "duckdb".
S3 keys come from FILE (AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines, the
iceberg-sink's credentials file) or are moto's "test".
"""

import json
import sys

import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyiceberg.catalog.sql import SqlCatalog


MOTO_KEYS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}


def open_catalog(url: str, name: str, endpoint: str, keys: dict = MOTO_KEYS) -> SqlCatalog:
    """The sink's SQL catalog, with S3 at `endpoint` (none: a directory warehouse)."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    return SqlCatalog(
        name,
        uri=url,
        **{} if not endpoint else {
            "s3.endpoint": endpoint,
            "s3.access-key-id": keys["AWS_ACCESS_KEY_ID"],
            "s3.secret-access-key": keys["AWS_SECRET_ACCESS_KEY"],
            "s3.region": "us-east-1",
        },
    )


def duckdb_counts(metadata_location: str) -> dict:
    """Rows, distinct timestamps and rows per city as DuckDB's Iceberg extension reads them, from
    the extensions the duckdb-ext-* wheels ship (nothing is downloaded)."""
    import os

    import duckdb
    import duckdb_ext

    config = {
        "extension_directory": os.path.join(list(duckdb_ext.__path__)[0], "extensions"),
        "autoinstall_known_extensions": False,
    }
    con = duckdb.connect(config=config)
    con.execute("LOAD iceberg")
    scan = "iceberg_scan(?)"
    rows, distinct_ts = con.execute(f"SELECT count(*), count(DISTINCT ts) FROM {scan}", [metadata_location]).fetchone()
    per_city = dict(con.execute(f"SELECT city, count(*) FROM {scan} GROUP BY city", [metadata_location]).fetchall())
    return {"rows": rows, "distinct_ts": distinct_ts, "per_city": per_city}


def windows(data, size_ms: int) -> list:
    """[city, start_ms, count, sum] per window, computed here from the rows alone."""
    import math

    import pyarrow as pa

    micros = pc.cast(data["ts"], pa.int64()).to_pylist()
    sums = {}
    for city, temperature, us in zip(data["city"].to_pylist(), data["temperature"].to_pylist(), micros):
        start = (us // 1000) // size_ms * size_ms
        sums.setdefault((city, start), []).append(temperature)
    return [[city, start, len(t), math.fsum(t)] for (city, start), t in sorted(sums.items())]


def main() -> None:
    url, name, endpoint, table_name = sys.argv[1:5]
    options = sys.argv[5:]
    with_readings = "--readings" in options
    keys = dict(MOTO_KEYS)
    if "--credentials" in options:
        with open(options[options.index("--credentials") + 1]) as f:
            keys.update(line.strip().split("=", 1) for line in f if "=" in line)
    table = open_catalog(url, name, endpoint, keys).load_table(table_name)
    data = table.scan().to_arrow()
    files = table.inspect.files().to_pylist()
    compressions = set()
    for f in files:
        with table.io.new_input(f["file_path"]).open() as stream:
            metadata = pq.ParquetFile(stream).metadata
            for g in range(metadata.num_row_groups):
                for c in range(metadata.num_columns):
                    compressions.add(metadata.row_group(g).column(c).compression)
    # One grouping for both columns: two group_by calls may list the groups in different orders.
    per_city = data.group_by("city").aggregate([("city", "count")])
    snapshot = table.current_snapshot()
    found = {
        "rows": data.num_rows,
        "distinct_ts": len(pc.unique(data["ts"])),
        "temperature_sum": pc.sum(data["temperature"]).as_py() if data.num_rows else 0,
        "per_city": dict(zip(per_city["city"].to_pylist(), per_city["city_count"].to_pylist())),
        "format_version": table.format_version,
        "partition_fields": [f"{f.transform}({table.schema().find_field(f.source_id).name})" for f in table.spec().fields],
        "partition_hours": sorted({f["partition"]["ts_hour"] for f in files}),
        "compressions": sorted(compressions),
        "files": len(files),
        "snapshot_summary": dict(snapshot.summary.additional_properties) if snapshot else {},
    }
    if "--duckdb" in options:
        found["duckdb"] = duckdb_counts(table.metadata_location)
    if "--windows" in options:
        found["windows"] = windows(data, int(float(options[options.index("--windows") + 1]) * 1000))
    if with_readings:
        found["readings"] = [list(r) for r in zip(data["city"].to_pylist(), data["temperature"].to_pylist())]
    print(json.dumps(found))


if __name__ == "__main__":
    main()
