"""The results schema as `cluster/results.py` documents it (the table in its docstring),
for tests that compare it with what is written."""

from __future__ import annotations

import re

import pyarrow as pa

import cluster.results

_ROW = re.compile(r"^\| (?P<names>[a-z_, ]+) \| (?P<type>[^|]+?) \| (?P<meaning>.+) \|$")


def documented_columns() -> list[tuple[str, str, str]]:
    """(column, type, meaning) per documented column, in the documented order."""
    found = []
    for line in (cluster.results.__doc__ or "").splitlines():
        m = _ROW.match(line.strip())
        if m and m["names"].strip() != "column":
            found += [(name.strip(), m["type"].strip(), m["meaning"].strip()) for name in m["names"].split(",")]
    return found


def type_name(t: pa.DataType) -> str:
    """An Arrow type as the documentation writes it (`float64`, `timestamp[us, UTC]`)."""
    named = re.sub(r" \('[^']*'\)", "", str(t))  # a map read back names its fields: map<string, double ('scores')>
    return named.replace("double", "float64").replace("tz=", "")
