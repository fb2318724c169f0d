"""Another engine on the sink's table: PyIceberg, through the same SQL catalog, doing what
other engines' users do to a shared table.

usage: pyiceberg_writer.py CATALOG_URL CATALOG_NAME S3_ENDPOINT NAMESPACE.TABLE OPERATION...

Operations, run in order, each its own commit:
  append:N:CITY     appends N rows of CITY (temperature 1.5, ts now)
  expire-all        expires every snapshot but the current one (older than now)

Prints the current snapshot id afterwards as JSON. S3 keys are moto's "test". PyArrow's
multipart uploads, which every PyIceberg write uses, fail against moto ("error embedded in a 200
OK response"): tests that write with it keep the warehouse in a directory.
"""

import json
import sys

from datetime import datetime, timezone

import pyarrow as pa
from pyiceberg_check import open_catalog


def main() -> None:
    url, name, endpoint, table_name = sys.argv[1:5]
    catalog = open_catalog(url, name, endpoint)
    table = catalog.load_table(table_name)
    for operation in sys.argv[5:]:
        kind, *rest = operation.split(":")
        if kind == "append":
            count, city = int(rest[0]), rest[1]
            now = datetime.now(timezone.utc)
            rows = pa.Table.from_pylist(
                [{"city": city, "temperature": 1.5, "ts": now} for _ in range(count)],
                schema=table.schema().as_arrow(),
            )
            table.append(rows)
        elif kind == "expire-all":
            table.maintenance.expire_snapshots().older_than(datetime.now(timezone.utc)).commit()
        else:
            sys.exit(f"unknown operation {operation!r}")
        table = catalog.load_table(table_name)
    snapshot = table.current_snapshot()
    print(json.dumps({"snapshot": snapshot.snapshot_id if snapshot else None, "snapshots": len(table.snapshots())}))


if __name__ == "__main__":
    main()
