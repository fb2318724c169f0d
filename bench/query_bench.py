"""Times the plan's per-city average and a one-hour range query, through the `trino` client
against the query-server and in PyIceberg + PyArrow, on the same table, and checks that both
give the same answers. Then times the statements of the comparison with DuckDB (count(*), the
per-city average, `SELECT *` of `hour(ts) = HOUR`, a `TIMESTAMP` range outside the data) on the
query-server and in DuckDB's `iceberg_scan` of the same current metadata file (directory
warehouses only), checking that both count alike.

usage: query_bench.py SERVER_URL CATALOG_URL DAY HOUR RUNS

Prints JSON: the median of RUNS of each, in seconds, and the rows each query returns.
"""

import json
import math
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone

import pyarrow.compute as pc
import trino
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan


def timed(runs, f):
    times, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = f()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def duckdb_connection():
    """DuckDB with the Iceberg extension the duckdb-ext-* wheels ship (nothing is downloaded)."""
    import os

    import duckdb
    import duckdb_ext

    return duckdb.connect(config={
        "extension_directory": os.path.join(list(duckdb_ext.__path__)[0], "extensions"),
        "autoinstall_known_extensions": False,
    })


def duckdb_of(catalog):
    """DuckDB ready to scan the table's current metadata file, and that file's path."""
    location = catalog.load_table("default.weather").metadata_location
    assert location.startswith("file://"), location
    con = duckdb_connection()
    con.execute("LOAD iceberg")
    # hour(ts) of a timestamptz in UTC, as the query-server (and Trino with a UTC session) reads it.
    con.execute("SET TimeZone = 'UTC'")
    return con, location[len("file://"):]


def against_duckdb(sql, con, location, hour, runs):
    """Median seconds of each comparison statement on the query-server and in DuckDB, and the
    row count each gives (which must agree)."""
    scan = f"iceberg_scan('{location}')"
    table = "iceberg.default.weather"
    statements = {
        "count": (f"SELECT count(*) FROM {table}", f"SELECT count(*) FROM {scan}"),
        "average": (
            f"SELECT city, AVG(CAST(temperature AS DOUBLE)) FROM {table} GROUP BY city",
            f"SELECT city, AVG(CAST(temperature AS DOUBLE)) FROM {scan} GROUP BY city",
        ),
        "hour": (f"SELECT * FROM {table} WHERE hour(ts) = {int(hour)}", f"SELECT * FROM {scan} WHERE hour(ts) = {int(hour)}"),
        "pruned": (
            f"SELECT * FROM {table} WHERE ts >= TIMESTAMP '2030-01-01 00:00:00' AND ts < TIMESTAMP '2030-01-01 01:00:00'",
            f"SELECT * FROM {scan} WHERE ts >= TIMESTAMPTZ '2030-01-01 00:00:00+00' AND ts < TIMESTAMPTZ '2030-01-01 01:00:00+00'",
        ),
    }
    found = {}
    for name, (ours, theirs) in statements.items():
        server_s, server_rows = timed(runs, lambda: sql(ours))
        duck_s, duck_rows = timed(runs, lambda: con.execute(theirs).fetchall())
        if name == "count":
            server_rows, duck_rows = server_rows[0][0], duck_rows[0][0]
        else:
            server_rows, duck_rows = len(server_rows), len(duck_rows)
        if server_rows != duck_rows:
            sys.exit(f"{name}: the query-server gives {server_rows} rows, DuckDB {duck_rows}")
        found[name] = {"server_s": server_s, "duckdb_s": duck_s, "rows": server_rows}
    return found


def delivery(server, con, location, hour, runs):
    """Where the time of a large result goes: the trino client end to end; the same pages with
    plain HTTP and JSON (what the server and the protocol deliver); the client's conversion of
    those rows to Python objects alone; DuckDB's rows as Python objects and as Arrow; and the
    time to the first row of `SELECT *` of the whole table."""
    import requests
    from trino.mapper import RowMapperFactory

    statement = f"SELECT * FROM iceberg.default.weather WHERE hour(ts) = {int(hour)}"
    cursor = trino.dbapi.connect(host=server, user="bench").cursor()

    def client():
        cursor.execute(statement)
        return cursor.fetchall()

    session = requests.Session()
    headers = {"X-Trino-User": "bench"}

    def pages():
        page = session.post(f"{server}/v1/statement", data=statement, headers=headers).json()
        columns, rows = page.get("columns"), list(page.get("data", []))
        while "nextUri" in page:
            page = session.get(page["nextUri"], headers=headers).json()
            columns = columns or page.get("columns")
            rows.extend(page.get("data", []))
        if "error" in page:
            sys.exit(f"{statement}: {page['error']}")
        return columns, rows

    client_s, mapped = timed(runs, client)
    pages_s, (columns, raw) = timed(runs, pages)
    mapper = RowMapperFactory().create(columns=columns, legacy_primitive_types=False)
    mapping_s, _ = timed(runs, lambda: mapper.map(raw))
    theirs = f"SELECT * FROM iceberg_scan('{location}') WHERE hour(ts) = {int(hour)}"
    duckdb_s, duck_rows = timed(runs, lambda: con.execute(theirs).fetchall())
    duckdb_arrow_s, _ = timed(runs, lambda: con.execute(theirs).fetch_arrow_table())
    if not len(mapped) == len(raw) == len(duck_rows):
        sys.exit(f"{statement}: {len(mapped)} rows through the client, {len(raw)} in the pages, {len(duck_rows)} in DuckDB")

    def first_row():
        cursor.execute("SELECT * FROM iceberg.default.weather")
        row = cursor.fetchone()
        cursor.cancel()
        return row

    first_row_s, _ = timed(runs, first_row)
    return {
        "rows": len(raw),
        "client_s": client_s,
        "pages_s": pages_s,
        "mapping_s": mapping_s,
        "duckdb_s": duckdb_s,
        "duckdb_arrow_s": duckdb_arrow_s,
        "first_row_s": first_row_s,
    }


def main() -> None:
    server, catalog_url, day, hour, runs = sys.argv[1:6]
    runs = int(runs)
    start = datetime.fromisoformat(f"{day}T{int(hour):02d}:00:00").replace(tzinfo=timezone.utc)
    end = start + timedelta(hours=1)
    catalog = SqlCatalog("weather", uri="postgresql+psycopg2://" + catalog_url[len("postgresql://"):])
    cursor = trino.dbapi.connect(host=server, user="bench").cursor()

    def sql(statement):
        cursor.execute(statement)
        return cursor.fetchall()

    def pyiceberg_average():
        # A fresh load each time, as each query of the server loads the table from the catalog.
        data = catalog.load_table("default.weather").scan(selected_fields=("city", "temperature")).to_arrow()
        grouped = data.group_by("city").aggregate([("temperature", "mean")])
        return dict(zip(grouped["city"].to_pylist(), grouped["temperature_mean"].to_pylist()))

    def pyiceberg_range():
        table = catalog.load_table("default.weather")
        return table.scan(
            row_filter=And(GreaterThanOrEqual("ts", start.isoformat()), LessThan("ts", end.isoformat()))
        ).to_arrow().num_rows

    literal = lambda t: t.strftime("%Y-%m-%d %H:%M:%S")
    average_sql = (
        "SELECT city, AVG(CAST(temperature AS DOUBLE)) as avg_temp FROM iceberg.default.weather GROUP BY city"
    )
    range_sql = (
        f"SELECT * FROM iceberg.default.weather WHERE ts >= TIMESTAMP '{literal(start)}' "
        f"AND ts < TIMESTAMP '{literal(end)}'"
    )
    server_average, averages = timed(runs, lambda: dict(sql(average_sql)))
    their_average, theirs = timed(runs, pyiceberg_average)
    server_range, in_range = timed(runs, lambda: len(sql(range_sql)))
    their_range, their_rows = timed(runs, pyiceberg_range)
    # The same range counted where it is read: planning and scanning without sending rows.
    server_count, counted = timed(runs, lambda: sql(range_sql.replace("SELECT *", "SELECT count(*)"))[0][0])
    # PyIceberg's rows as Python objects, as the trino client hands them over.
    their_objects, _ = timed(runs, lambda: len(catalog.load_table("default.weather").scan(
        row_filter=And(GreaterThanOrEqual("ts", start.isoformat()), LessThan("ts", end.isoformat()))
    ).to_arrow().to_pylist()))
    total = sql("SELECT count(*) FROM iceberg.default.weather")[0][0]
    if sorted(averages) != sorted(theirs) or any(
        not math.isclose(averages[c], theirs[c], rel_tol=1e-9) for c in theirs
    ):
        sys.exit(f"the averages differ: {averages} against {theirs}")
    if in_range != their_rows or counted != their_rows:
        sys.exit(f"the range differs: {in_range} rows against {their_rows}")
    con, location = duckdb_of(catalog)
    print(json.dumps({
        "rows": total,
        "cities": len(averages),
        "range_rows": in_range,
        "server_average_s": server_average,
        "pyiceberg_average_s": their_average,
        "server_range_s": server_range,
        "pyiceberg_range_s": their_range,
        "server_range_count_s": server_count,
        "pyiceberg_range_pylist_s": their_objects,
        "duckdb": against_duckdb(sql, con, location, hour, runs),
        "delivery": delivery(server, con, location, hour, runs),
        "duckdb_version": __import__("duckdb").__version__,
    }))


if __name__ == "__main__":
    main()
