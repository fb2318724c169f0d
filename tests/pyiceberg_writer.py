"""Another engine on the sink's table: PyIceberg, through the same SQL catalog, doing what
other engines' users do to a shared table.

usage: pyiceberg_writer.py CATALOG_URL CATALOG_NAME S3_ENDPOINT NAMESPACE.TABLE OPERATION...

Operations, run in order, each its own commit:
  append:N:CITY            appends N rows of CITY (temperature 1.5, ts now)
  overwrite:FROM:N:CITY    replaces the rows of city FROM with N rows of CITY
  delete:FILTER            deletes the rows FILTER matches (PyIceberg's row filter syntax, e.g.
                           city = 'Tokyo' AND ts < '2026-01-01T00:00:00+00:00'); copy-on-write
  expire-all               expires every snapshot but the current one (older than now)

A commit that loses the race with another writer (the sink) is tried again on the new table,
as engines do; so is one whose starting snapshot the sink's maintenance expired meanwhile
(PyIceberg's conflict check then cannot walk from it: "Cannot find starting snapshot"), and an
expiry some of whose snapshots the sink's maintenance expired first (PyIceberg's SQL catalog
applies the removal to the new table and raises ValueError "Snapshot with snapshot id ... does
not exist" instead of a commit conflict).

Prints the current snapshot id afterwards as JSON. S3 keys are moto's "test". PyArrow's
multipart uploads, which every PyIceberg write uses, fail against moto ("error embedded in a 200
OK response"): tests that write with it keep the warehouse in a directory.
"""

import json
import sys
import time

from datetime import datetime, timezone

import pyarrow as pa
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.expressions import EqualTo
from pyiceberg_check import open_catalog


def rows_of(table, count: int, city: str):
    now = datetime.now(timezone.utc)
    return pa.Table.from_pylist(
        [{"city": city, "temperature": 1.5, "ts": now} for _ in range(count)],
        schema=table.schema().as_arrow(),
    )


def run(table, operation: str) -> None:
    kind, _, rest = operation.partition(":")
    if kind == "append":
        count, city = rest.split(":")
        table.append(rows_of(table, int(count), city))
    elif kind == "overwrite":
        old, count, city = rest.split(":")
        table.overwrite(rows_of(table, int(count), city), overwrite_filter=EqualTo("city", old))
    elif kind == "delete":
        table.delete(delete_filter=rest)
    elif kind == "expire-all":
        table.maintenance.expire_snapshots().older_than(datetime.now(timezone.utc)).commit()
    else:
        sys.exit(f"unknown operation {operation!r}")


def main() -> None:
    url, name, endpoint, table_name = sys.argv[1:5]
    catalog = open_catalog(url, name, endpoint)
    table = catalog.load_table(table_name)
    for operation in sys.argv[5:]:
        for _ in range(50):
            try:
                run(table, operation)
                break
            except (CommitFailedException, ValidationException):
                pass
            except ValueError as error:
                if "does not exist" not in str(error):
                    raise
            time.sleep(0.05)
            table = catalog.load_table(table_name)
        else:
            sys.exit(f"{operation}: lost the commit race 50 times")
        table = catalog.load_table(table_name)
    snapshot = table.current_snapshot()
    print(json.dumps({"snapshot": snapshot.snapshot_id if snapshot else None, "snapshots": len(table.snapshots())}))


if __name__ == "__main__":
    main()
