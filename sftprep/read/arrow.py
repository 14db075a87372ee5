"""Arrow IPC files (Feather v2) and streams, read batch by batch from a memory map."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from . import Record
from ..errors import InputError


def iter_batches(path: Path):
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    except pa.ArrowInvalid:  # not the file format: try the stream format (`datasets` caches)
        source.seek(0)
        yield from pa.ipc.open_stream(source)


def read(path: Path) -> Iterator[Record]:
    import pyarrow as pa

    row = 0
    try:
        for batch in iter_batches(path):
            for rec in batch_rows(batch, path, row):
                yield Record(rec, f"{path}:row {row}")
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable Arrow file (after row {row}): {e}") from None


def batch_rows(batch, path: Path, first: int) -> list[dict]:
    """The batch's rows as dicts; a string column holding bytes that are not UTF-8 (Arrow does not check
    what a writer declared as text) is an `InputError` naming the row and column."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        pass
    for i in range(batch.num_rows):
        for name in batch.schema.names:
            try:
                batch.column(name)[i].as_py()
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:row {first + i}: column {name!r} holds bytes that are not UTF-8 "
                                 f"({e.reason} at byte {e.start}); re-encode the file's text as UTF-8") from None
    raise AssertionError("unreachable: a row failed to decode")
