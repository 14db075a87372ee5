"""Parquet, streamed by record batch."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..errors import InputError
from . import Record
from .arrow import batch_rows


def read(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    import pyarrow as pa

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for rec in batch_rows(batch, path, row):  # a string column of bytes that are not UTF-8: named
                yield Record(rec, f"{path}:row {row}")
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file (after row {row}): {e}") from None
