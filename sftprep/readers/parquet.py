"""Parquet, streamed by record batch."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from . import Record


def read(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            yield Record(rec, f"{path}:row {row}")
            row += 1
