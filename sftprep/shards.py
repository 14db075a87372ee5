"""Shard files: Arrow IPC *file* format, written to a temporary name and renamed.

Columns (one row = one training sequence): `input_ids`, `labels` (list<int32>, `max_length` long
when packed), `seq_lens` (list<int32>, lengths of the samples in the row), `sample_ids`
(list<int64>, their indices in the input). Any Arrow reader opens them: `pandas.read_feather`,
`pyarrow.ipc.open_file(pyarrow.memory_map(path))`, polars, DuckDB.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("seq_lens", pa.list_(pa.int32())),
    ("sample_ids", pa.list_(pa.int64())),
])


@contextmanager
def names_path(path: Path) -> Iterator[None]:
    """Re-raise a failed write (disk full, file-size limit, I/O error) as an `OSError` naming `path`:
    the OS reports `No space left on device` without saying where, and `shutil` names the source."""
    try:
        yield
    except OSError as e:
        if e.errno is None or isinstance(e, (FileNotFoundError, PermissionError, NotADirectoryError)):
            raise
        raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from None


def shard_name(i: int) -> str:
    return f"shard-train-{i:05d}.arrow"


def _numpy(values: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """A zero-copy Arrow view of a contiguous numpy array (and no pandas import, which
    `pa.array(ndarray)` costs on first use)."""
    values = np.ascontiguousarray(values, dtype=dtype.to_pandas_dtype())
    return pa.Array.from_buffers(dtype, len(values), [None, pa.py_buffer(values)])


def _list_array(values: np.ndarray, offsets: np.ndarray, dtype: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(_numpy(offsets, pa.int32()), _numpy(values, dtype))


class _HashingFile:
    """A binary file that hashes what is written to it (no second read of a shard)."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")
        self.sha = hashlib.sha256()
        self.closed = False

    def write(self, data) -> int:
        self.sha.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.closed = True


class _AtomicIPC:
    """An Arrow IPC file written to `path.tmp`, hashed while written, fsynced, then renamed to
    `path`; on error the temporary file is removed and `path` is left untouched."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.sink = _HashingFile(self.tmp)
        with names_path(self.path):
            self.writer = pa.ipc.new_file(pa.PythonFile(self.sink, mode="w"), schema)
        self.rows = 0
        self.sha256 = ""

    def __enter__(self) -> "_AtomicIPC":
        return self

    def write(self, batch: pa.RecordBatch | pa.Table, max_chunksize: int = 1024) -> None:
        with names_path(self.path):
            if isinstance(batch, pa.Table):
                self.writer.write_table(batch, max_chunksize=max_chunksize)
            else:
                self.writer.write_batch(batch)
        self.rows += batch.num_rows

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close (footer, fsync) and rename; on any error, here or in the block, remove the temporary file."""
        if exc_type is not None:
            self._discard()
            return
        try:
            with names_path(self.path):
                try:
                    self.writer.close()
                finally:
                    self.sink.close()
        except BaseException:
            self._discard()
            raise
        os.replace(self.tmp, self.path)
        self.sha256 = self.sink.sha.hexdigest()

    def _discard(self) -> None:
        try:
            self.sink.file.close()  # buffered bytes may fail again: the first error is the one to report
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


def write_table(path: Path, table: pa.Table, batch_rows: int = 1024) -> str:
    """Write `table` atomically to `path` as an Arrow IPC file; returns its sha256."""
    with _AtomicIPC(path, table.schema) as f:
        f.write(table, batch_rows)
    return f.sha256


def shard_writer(path: Path) -> _AtomicIPC:
    """A shard written batch by batch (`.write(rows_batch(...))`), atomically; `.sha256` after."""
    return _AtomicIPC(path, SCHEMA)


def rows_batch(ids: np.ndarray, labels: np.ndarray, row_offsets: np.ndarray, seq_lens: np.ndarray,
               seq_offsets: np.ndarray, sample_ids: np.ndarray) -> pa.RecordBatch:
    """Shard rows from flat arrays (zero-copy): `row_offsets` cut ids/labels into rows,
    `seq_offsets` cut seq_lens/sample_ids into rows."""
    return pa.RecordBatch.from_arrays([
        _list_array(ids, row_offsets, pa.int32()),
        _list_array(labels, row_offsets, pa.int32()),
        _list_array(seq_lens, seq_offsets, pa.int32()),
        _list_array(sample_ids, seq_offsets, pa.int64()),
    ], schema=SCHEMA)


def open_shard(path: str | Path) -> pa.Table:
    """A shard as a memory-mapped table (zero-copy; pages are read on demand)."""
    # The map is not closed here: the table's buffers keep it alive and unmap it when freed.
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
