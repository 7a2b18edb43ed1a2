#!/usr/bin/env python3
"""Convert faq.jsonl into faq.parquet (reproducible build of the Parquet file).

Usage (needs pyarrow, e.g. `python3 -m venv /tmp/dsvenv && /tmp/dsvenv/bin/pip install pyarrow`):

    python make_parquet.py                      # faq.jsonl -> faq.parquet (next to this script)
    python make_parquet.py in.jsonl out.parquet  # any file with the same columns

Columns (all non-null UTF-8 strings, in this order): instruction, input, output, category.
`input` may be the empty string; the other columns must be non-empty.
"""
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = ["instruction", "input", "output", "category"]
SCHEMA = pa.schema([pa.field(c, pa.string(), nullable=False) for c in COLUMNS])


def load(path: Path) -> dict:
    cols = {c: [] for c in COLUMNS}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if set(row) != set(COLUMNS):
                raise ValueError(f"{path}:{n}: expected keys {COLUMNS}, got {sorted(row)}")
            for c in COLUMNS:
                v = row[c]
                if not isinstance(v, str):
                    raise ValueError(f"{path}:{n}: column {c!r} is not a string")
                if c != "input" and not v.strip():
                    raise ValueError(f"{path}:{n}: column {c!r} is empty")
                cols[c].append(v)
    return cols


def main() -> None:
    here = Path(__file__).resolve().parent
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else here / "faq.jsonl"
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_suffix(".parquet")
    table = pa.Table.from_pydict(load(src), schema=SCHEMA)
    # Plain, widely readable settings: one row group, Snappy (the Parquet default codec), no pandas metadata.
    pq.write_table(table, dst, compression="snappy", row_group_size=max(1, table.num_rows))
    print(f"wrote {dst} ({table.num_rows} rows, columns {table.column_names})")


if __name__ == "__main__":
    main()
