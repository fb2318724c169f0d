"""Runs the plan's Trino statements through the `trino` Python client (DBAPI) against a server
speaking Trino's protocol, and checks every answer against PyIceberg reading the same table.

usage: trino_check.py SERVER_URL CATALOG_URL S3_ENDPOINT DAY HOUR

DAY (YYYY-MM-DD) and HOUR name the hour the range and hour(ts) queries ask for. Prints what it
compared as JSON; exits 1 with the first difference.
"""

import json
import math
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone

import pyarrow.compute as pc
import trino
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan


def fail(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(1)


def same(what: str, ours, theirs) -> None:
    if ours != theirs:
        fail(f"{what}: query-server says {ours!r}, PyIceberg {theirs!r}")


def main() -> None:
    server, catalog_url, endpoint, day, hour = sys.argv[1:6]
    hour = int(hour)
    catalog = SqlCatalog(
        "weather",
        uri="postgresql+psycopg2://" + catalog_url[len("postgresql://"):],
        **{
            "s3.endpoint": endpoint,
            "s3.access-key-id": "test",
            "s3.secret-access-key": "test",
            "s3.region": "us-east-1",
        },
    )
    table = catalog.load_table("default.weather")
    data = table.scan().to_arrow()
    rows = sorted(zip(data["city"].to_pylist(), data["temperature"].to_pylist(), data["ts"].to_pylist()))

    connection = trino.dbapi.connect(host=server, user="trino-check", source="trino_check.py")
    cursor = connection.cursor()

    def run(sql: str) -> list:
        cursor.execute(sql)
        return cursor.fetchall()

    report = {}
    same("SHOW CATALOGS", ["iceberg"] in run("SHOW CATALOGS"), True)
    same("SHOW SCHEMAS FROM iceberg", run("SHOW SCHEMAS FROM iceberg"), [["default"], ["information_schema"]])
    same("SHOW TABLES FROM iceberg.default", run("SHOW TABLES FROM iceberg.default"), [["weather"]])
    described = [r[:2] for r in run("DESCRIBE iceberg.default.weather")]
    same(
        "DESCRIBE",
        described,
        [["city", "varchar"], ["temperature", "double"], ["ts", "timestamp(6) with time zone"]],
    )

    # What SQLAlchemy and BI tools read to list tables and columns.
    same(
        "information_schema.tables",
        run("SELECT table_name FROM iceberg.information_schema.tables WHERE table_schema = 'default'"),
        [["weather"]],
    )
    same(
        "information_schema.columns",
        run(
            "SELECT column_name FROM iceberg.information_schema.columns "
            "WHERE table_schema = 'default' AND table_name = 'weather' ORDER BY ordinal_position"
        ),
        [["city"], ["temperature"], ["ts"]],
    )

    # Every row, through pages of the server's --page-rows.
    everything = run("SELECT * FROM iceberg.default.weather")
    same("SELECT * column names", [d[0] for d in cursor.description], ["city", "temperature", "ts"])
    same("SELECT * rows", sorted(tuple(r) for r in everything), rows)
    report["rows"] = len(everything)

    # hour(ts) is the hour of the day, on every day.
    at_hour = run(f"SELECT * FROM iceberg.default.weather WHERE hour(ts) = {hour}")
    same(
        f"hour(ts) = {hour}",
        sorted(tuple(r) for r in at_hour),
        sorted(r for r in rows if r[2].hour == hour),
    )
    report["hour_rows"] = len(at_hour)

    averages = run(
        "SELECT city, AVG(CAST(temperature AS DOUBLE)) as avg_temp FROM iceberg.default.weather GROUP BY city"
    )
    same("per-city average column names", [d[0] for d in cursor.description], ["city", "avg_temp"])
    grouped = data.group_by("city").aggregate([("temperature", "mean")])
    theirs = dict(zip(grouped["city"].to_pylist(), grouped["temperature_mean"].to_pylist()))
    ours = dict((city, avg) for city, avg in averages)
    same("per-city average cities", sorted(ours), sorted(theirs))
    for city, avg in ours.items():
        if not math.isclose(avg, theirs[city], rel_tol=1e-12, abs_tol=1e-9):
            fail(f"average of {city}: query-server says {avg}, PyIceberg {theirs[city]}")
    report["cities"] = len(ours)
    plan = run(
        "EXPLAIN SELECT city, AVG(CAST(temperature AS DOUBLE)) FROM iceberg.default.weather GROUP BY city"
    )[0][0]
    report["grouped_plan"] = [line.strip() for line in plan.splitlines() if "Aggregate" in line]

    # Grouped with a filter between the grouping and the scan.
    warm_sql = "SELECT city, count(*), max(temperature) FROM iceberg.default.weather WHERE temperature > 15 GROUP BY city"
    warm = run(warm_sql)
    plan = run("EXPLAIN " + warm_sql)[0][0]
    report["filtered_grouped_plan"] = [line.strip() for line in plan.splitlines() if "DictionaryAggregate" in line]
    grouped = data.filter(pc.greater(data["temperature"], 15)).group_by("city").aggregate(
        [("temperature", "count"), ("temperature", "max")]
    )
    theirs = zip(grouped["city"].to_pylist(), grouped["temperature_count"].to_pylist(), grouped["temperature_max"].to_pylist())
    same("per-city count and max above 15", sorted(tuple(r) for r in warm), sorted(theirs))

    start = datetime.fromisoformat(f"{day}T{hour:02d}:00:00").replace(tzinfo=timezone.utc)
    end = start + timedelta(hours=1)
    literal = lambda t: t.strftime("%Y-%m-%d %H:%M:%S")
    range_sql = (
        f"SELECT * FROM iceberg.default.weather WHERE ts >= TIMESTAMP '{literal(start)}' "
        f"AND ts < TIMESTAMP '{literal(end)}'"
    )
    in_range = run(range_sql)
    filtered = table.scan(
        row_filter=And(GreaterThanOrEqual("ts", start.isoformat()), LessThan("ts", end.isoformat()))
    ).to_arrow()
    same(
        "time range",
        sorted(tuple(r) for r in in_range),
        sorted(zip(filtered["city"].to_pylist(), filtered["temperature"].to_pylist(), filtered["ts"].to_pylist())),
    )
    report["range_rows"] = len(in_range)
    plan = run("EXPLAIN " + range_sql)[0][0]
    report["range_plan"] = [line.strip() for line in plan.splitlines() if "IcebergScan" in line]

    snapshots = run('SELECT snapshot_id, operation FROM iceberg.default."weather$snapshots"')
    same(
        "weather$snapshots",
        sorted(s[0] for s in snapshots),
        sorted(s.snapshot_id for s in table.snapshots()),
    )
    files = run('SELECT file_path, record_count, partition FROM iceberg.default."weather$files"')
    their_files = table.inspect.files().to_pylist()
    same("weather$files paths", sorted(f[0] for f in files), sorted(f["file_path"] for f in their_files))
    same("weather$files records", sum(f[1] for f in files), data.num_rows)
    report["files"] = len(files)
    report["partitions"] = sorted(Counter(f[2][0] for f in files).items())

    # What a Trino user gets wrong gets Trino's error names.
    errors = {}
    for sql in [
        "SELECT nosuch FROM iceberg.default.weather",
        "SELECT * FROM iceberg.default.nosuch",
        "SELEC * FROM iceberg.default.weather",
        "DROP TABLE iceberg.default.weather",
        "INSERT INTO iceberg.default.weather VALUES ('x', 1.0, TIMESTAMP '2026-01-01 00:00:00')",
        "CREATE TABLE t AS SELECT 1",
    ]:
        try:
            run(sql)
            fail(f"{sql!r} did not fail")
        except trino.exceptions.TrinoUserError as e:
            errors[sql] = e.error_name
    report["errors"] = errors

    # USE sets the session's schema, as Trino's client keeps it.
    run("USE iceberg.default")
    same("count after USE", run("SELECT count(*) FROM weather"), [[data.num_rows]])

    print(json.dumps(report))


if __name__ == "__main__":
    main()
