"""Shard files: Arrow IPC *file* format, written to a temporary name and renamed; read back
memory-mapped. Both sides of the shard contract live here (writers for the build, `open_shard` and
`load` for everyone who reads).

    rows_batch(...) --> ShardSetWriter --> OUT/shard-train-00000.arrow.tmp --rename--> shard-train-00000.arrow
                        (a new shard every shard_size rows)   entries for the manifest: file, rows, tokens, sha256
    OUT/manifest.json --load()--> one memory-mapped pyarrow.Table of every shard

Columns (one row = one training sequence): `input_ids`, `labels` (list<int32>, `max_length` long
when packed), `seq_lens` (list<int32>, lengths of the samples in the row), `sample_ids`
(list<int64>, their indices in the input). Any Arrow reader opens them: `pandas.read_feather`,
`pyarrow.ipc.open_file(pyarrow.memory_map(path))`, polars, DuckDB.
"""

from __future__ import annotations

import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa

from ..errors import InputError
from ..pack.packing import mode
from ..tokenize.arrow import as_numpy, numpy_array
from ..tokenize.labels import IGNORE_INDEX, sample_starts
from .files import claim, names_path
from .manifest import read_manifest, shard_path

WRITE_ROWS = 1024  # rows per record batch in a shard (and in the side tables)

SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("seq_lens", pa.list_(pa.int32())),
    ("sample_ids", pa.list_(pa.int64())),
])


COLUMNS = tuple(SCHEMA.names)
TRAINED_COLUMNS = ("input_ids", "labels", "seq_lens")
"""What a trainer reads of a row (`sample_ids` only trace a sample back)."""


# -- reading rows back: the one place that says what `seq_lens` means ------------------------------
#
# A row holds samples laid end to end (`seq_lens`, in order; with a mode that splits samples, pieces of
# them), then padding: positions restart at 0 at each sample, `cu_seqlens` is the running sum, and
# every sample's first token has label -100 (`labels.mask_sample_starts`).

def row_positions(seq_lens: np.ndarray | list[int], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Position ids (restarting at 0 per sample) and segment ids (sample index, -1 for padding)
    of one row of `length` tokens whose samples have lengths `seq_lens`."""
    lens = np.asarray(seq_lens, dtype=np.int64)
    used = int(lens.sum())
    if used > length:
        raise ValueError(f"seq_lens sum to {used} tokens but the row holds {length}")
    starts = sample_starts(lens)
    segments = np.full(length, -1, dtype=np.int64)
    segments[:used] = np.repeat(np.arange(len(lens)), lens)
    positions = np.arange(length, dtype=np.int64)
    positions[:used] -= np.repeat(starts, lens)
    positions[used:] -= used  # padding counts as one more sequence
    return positions, segments


def cu_seqlens(seq_lens: np.ndarray | list[int]) -> np.ndarray:
    """Sample boundaries in a row (or rows laid end to end without padding): 0, then the running sum."""
    return np.concatenate([[0], np.cumsum(np.asarray(seq_lens, dtype=np.int64))])


def list_parts(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (flat values, zero-based offsets with one entry per row plus one)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = as_numpy(arr.offsets).astype(np.int64)
    return as_numpy(arr.flatten()), offsets - offsets[0]


@dataclass(slots=True)
class Flat:
    """A shard table as flat numpy arrays plus the pieces (samples or wrapped parts) in it.

    `ids`/`labels` are cut into rows by `row_off`; piece `j` sits in row `piece_row[j]` at flat
    positions `[piece_start[j], piece_start[j] + seq_lens[j])`.
    """

    ids: np.ndarray
    labels: np.ndarray
    row_off: np.ndarray
    seq_lens: np.ndarray
    seq_off: np.ndarray
    sample_ids: np.ndarray
    piece_row: np.ndarray
    piece_start: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.row_off) - 1

    @property
    def row_lens(self) -> np.ndarray:
        return np.diff(self.row_off)

    @property
    def real_tokens(self) -> np.ndarray:
        """Per row: the sum of its `seq_lens` (tokens that are not padding)."""
        return _row_sums(self.seq_lens, self.seq_off)


def _row_sums(seq_lens: np.ndarray, seq_off: np.ndarray) -> np.ndarray:
    """Per row: the sum of its `seq_lens` (flat, cut into rows by `seq_off`)."""
    cs = np.concatenate([[0], np.cumsum(seq_lens, dtype=np.int64)])
    return cs[seq_off[1:]] - cs[seq_off[:-1]]


def flatten(table: pa.Table | pa.RecordBatch) -> Flat:
    """Flatten a shard table (or `sftprep.load()`'s table of all shards, or one record batch)."""
    ids, row_off = list_parts(table.column("input_ids"))
    labels, _ = list_parts(table.column("labels"))
    seq_lens, seq_off = list_parts(table.column("seq_lens"))
    sample_ids, _ = list_parts(table.column("sample_ids"))
    piece_row = np.repeat(np.arange(len(seq_off) - 1), np.diff(seq_off))
    return Flat(ids, labels, row_off, seq_lens.astype(np.int64), seq_off, sample_ids.astype(np.int64),
                piece_row, sample_starts(seq_lens, row_off, seq_off))


def row_problem(ids: np.ndarray, labels: np.ndarray, seq_lens: np.ndarray, num_sample_ids: int,
                manifest: dict[str, Any]) -> str | None:
    """The first broken promise of the shard contract in one row, None when it holds: the row checks of
    `sftprep verify` (lengths, seq_lens, row length, padding, first tokens, trained labels) in O(row),
    for a reader that checks each row as it reads it (`sfttrain`); no checksum, no cross-row check."""
    n, used, max_length = len(ids), int(np.sum(seq_lens)), manifest["max_length"]
    if len(labels) != n:
        return f"{n} input_ids but {len(labels)} labels"
    if len(seq_lens) != num_sample_ids:
        return f"{len(seq_lens)} seq_lens but {num_sample_ids} sample_ids"
    if len(seq_lens) and np.min(seq_lens) <= 0:
        return f"seq_lens {np.asarray(seq_lens).tolist()} holds a length <= 0"
    padded = mode(manifest.get("packing")).padded
    if used > n or (n != max_length if padded else n != used or n > max_length):
        what = "padded rows are max_length long" if padded else "a row holds its samples, unpadded"
        return f"row length {n} with sum(seq_lens) = {used}, max_length {max_length}: {what}"
    pad_id = manifest["tokenizer"].get("pad_id")
    trained = labels != IGNORE_INDEX
    starts = sample_starts(seq_lens)
    if (i := _first(trained[used:], used)) is not None:
        return f"padding at position {i} has label {labels[i]}, not -100"
    if (i := _first(ids[used:] != pad_id, used)) is not None:
        return f"padding at position {i} has id {ids[i]}, not pad_id {pad_id}"
    if (j := _first(trained[starts])) is not None:
        return f"the first token of its sample {j} (position {starts[j]}) has label {labels[starts[j]]}, not -100"
    if (i := _first(trained & (labels != ids))) is not None:
        return f"the label at position {i} is {labels[i]}, not its input id {ids[i]}"
    return None


def _first(mask: np.ndarray, offset: int = 0) -> int | None:
    return offset + int(np.argmax(mask)) if mask.any() else None


def shard_name(i: int, split: str = "train") -> str:
    """`shard-train-00000.arrow`, `shard-validation-00000.arrow`: `datasets.load_dataset("arrow",
    data_dir=OUT)` reads the split from the name."""
    return f"shard-{split}-{i:05d}.arrow"


def _list_array(values: np.ndarray, offsets: np.ndarray, dtype: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(numpy_array(offsets, pa.int32()), numpy_array(values, dtype))


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
        claim(self.path, self.tmp)
        self.sink = _HashingFile(self.tmp)
        with names_path(self.path):
            self.writer = pa.ipc.new_file(pa.PythonFile(self.sink, mode="w"), schema)
        self.rows = 0
        self.sha256 = ""

    def __enter__(self) -> "_AtomicIPC":
        return self

    def write(self, batch: pa.RecordBatch) -> None:
        with names_path(self.path):
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


def write_table(path: Path, table: pa.Table, batch_rows: int = WRITE_ROWS) -> str:
    """Write `table` atomically to `path` as an Arrow IPC file; returns its sha256."""
    return write_batches(path, table.schema, table.to_batches(), batch_rows)


def write_batches(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch],
                  batch_rows: int = WRITE_ROWS) -> str:
    """Write a table that arrives in `batches` of any size atomically to `path`, as an Arrow IPC file of
    `batch_rows` rows per record batch (the file `write_table` makes of the whole table); returns its sha256.
    At most about `2 * batch_rows` rows are held at a time."""
    with _AtomicIPC(path, schema) as f:
        held: list[pa.RecordBatch] = []
        count = 0
        for batch in batches:
            held.append(batch)
            count += batch.num_rows
            if count < batch_rows:
                continue
            table = pa.Table.from_batches(held, schema)
            whole = count - count % batch_rows
            for lo in range(0, whole, batch_rows):
                f.write(table.slice(lo, batch_rows).combine_chunks().to_batches()[0])
            held, count = table.slice(whole).to_batches(), count - whole
        if count:
            f.write(pa.Table.from_batches(held, schema).combine_chunks().to_batches()[0])
    return f.sha256


def shard_writer(path: Path) -> _AtomicIPC:
    """A shard written batch by batch (`.write(rows_batch(...))`), atomically; `.sha256` after."""
    return _AtomicIPC(path, SCHEMA)


class ShardSetWriter:
    """Rows -> `shard-train-NNNNN.arrow` files of at most `shard_size` rows each, `batch_rows` rows per
    record batch; each shard is written to a temporary name, hashed as written and renamed (`shard_writer`).

    `write(num_rows, batch)` asks `batch(lo, hi)` for the record batch of rows `[lo, hi)` (it never spans
    two shards) and returns one manifest entry per shard: file, rows, tokens (not padding),
    trained_tokens and sha256. A batch is written (hashed, copied to the file) in a second thread while
    `batch` makes the next one, which must therefore not reuse its memory (`Samples.rows_batch` takes two
    pairs of buffers in turn).
    """

    def __init__(self, out: Path, shard_size: int, batch_rows: int = WRITE_ROWS, split: str = "train") -> None:
        self.out, self.shard_size, self.batch_rows, self.split = Path(out), shard_size, batch_rows, split

    def write(self, num_rows: int, batch: Callable[[int, int], pa.RecordBatch]) -> list[dict[str, Any]]:
        entries = []
        for k, first in enumerate(range(0, num_rows, self.shard_size)):
            last = min(first + self.shard_size, num_rows)
            name, tokens, trained = shard_name(k, self.split), 0, 0
            # the pool exits first (waiting for the last write), then the shard is closed (or discarded)
            with shard_writer(self.out / name) as writer, ThreadPoolExecutor(1, "sftprep-shard") as pool:
                written = None
                for lo in range(first, last, self.batch_rows):
                    b = batch(lo, min(lo + self.batch_rows, last))
                    tokens += int(as_numpy(b.column("seq_lens").values).sum(dtype=np.int64))
                    trained += int(np.count_nonzero(as_numpy(b.column("labels").values) != IGNORE_INDEX))
                    if written is not None:
                        written.result()  # in order, and at most one batch held beside the one being made
                    written = pool.submit(writer.write, b)
                if written is not None:
                    written.result()
            entries.append({"file": name, "rows": writer.rows, "tokens": tokens, "trained_tokens": trained,
                            "sha256": writer.sha256})
        return entries


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


def open_table(path: str | Path) -> pa.Table:
    """An Arrow IPC file of a build (a shard, samples.feather) as a memory-mapped table (zero-copy; pages
    are read on demand), its footer checked: a truncated or overwritten file is a one-line InputError, and
    a FIFO or device is never opened."""
    path = Path(path)
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise InputError(f"{path} is not a regular file (a FIFO, device or folder): sftprep does not open it")
    try:
        # The map is not closed here: the table's buffers keep it alive and unmap it when freed.
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except pa.ArrowInvalid as e:
        raise InputError(f"{path} is not a complete Arrow file ({e}): it was truncated or overwritten; rebuild "
                         "with `sftprep build --overwrite` (or copy the file again)") from None


def open_shard(path: str | Path) -> pa.Table:
    """A shard (`open_table`) whose columns and types are the contract's (`SCHEMA`)."""
    table = open_table(path)
    if not table.schema.equals(SCHEMA):
        got = ", ".join(f"{n} {t}" for n, t in zip(table.schema.names, table.schema.types))
        want = ", ".join(f"{n} {t}" for n, t in zip(SCHEMA.names, SCHEMA.types))
        raise InputError(f"{path} has the columns {got}; a shard has {want}: it was not written by sftprep "
                         "build, or was changed after; rebuild with `sftprep build --overwrite`")
    return table


def row_sizes(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Per row: its real tokens (the sum of its `seq_lens`) and how many samples it holds, from `seq_lens`
    alone (no token is read)."""
    lens, seq_off = list_parts(table.column("seq_lens"))
    return _row_sums(lens, seq_off), np.diff(seq_off)


def check_rows(table: pa.Table, name: str) -> None:
    """The row invariants every reader relies on, checked from the list offsets and `seq_lens` alone
    (no token is read): every sample length positive, their sum within the row, labels as long as ids.

    Raises:
        InputError: naming `name` (the shard) and the row.
    """
    flat_lens, seq_off = list_parts(table.column("seq_lens"))
    _, row_off = list_parts(table.column("input_ids"))
    _, label_off = list_parts(table.column("labels"))
    bad = np.flatnonzero(flat_lens <= 0)
    if len(bad):
        row = int(np.searchsorted(seq_off, bad[0], side="right") - 1)
        raise InputError(f"{name} row {row}: seq_lens holds {int(flat_lens[bad[0]])} (every sample length is > 0): "
                         "the shard was changed after the build; rebuild with `sftprep build --overwrite`")
    sums = _row_sums(flat_lens, seq_off)  # the seq_lens read above: not flattened a second time
    over = np.flatnonzero((sums > np.diff(row_off)) | (np.diff(label_off) != np.diff(row_off)))
    if len(over):
        r = int(over[0])
        raise InputError(f"{name} row {r}: seq_lens sum to {int(sums[r])} but the row holds {int(np.diff(row_off)[r])} "
                         f"ids and {int(np.diff(label_off)[r])} labels: the shard was changed after the build; rebuild "
                         "with `sftprep build --overwrite`")


def check_ids(ids: np.ndarray, vocab_size: int | None, where: str) -> None:
    """Token ids a reader is about to decode are ids of the build's tokenizer (InputError naming `where`)."""
    if vocab_size and len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.min() if ids.min() < 0 else ids.max())
        raise InputError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size}): the shard was changed "
                         "after the build; check it with `sftprep verify`")


SPLITS = {"train": "shards", "validation": "validation_shards"}
"""A build's splits -> the manifest key listing their shards (`shard-train-*`, `shard-validation-*`)."""


def split_shards(manifest: dict[str, Any], split: str = "train") -> list[dict[str, Any]]:
    """The manifest's shard entries of `split` (InputError naming the fix when the build has no such split)."""
    if split not in SPLITS:
        raise InputError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if split != "train" and SPLITS[split] not in manifest:
        raise InputError(f"the build has no {split} split: build it with a held-out share (YAML `eval: {{fraction: "
                         "0.01}` or `{samples: 500}`, --eval-fraction / --eval-samples)")
    return manifest.get(SPLITS[split]) or []


def split_manifest(manifest: dict[str, Any], split: str) -> dict[str, Any]:
    """The manifest as a reader of one split sees it: its `shards` and `totals` are that split's (what a
    trainer evaluating on a build's validation split reads)."""
    shards = split_shards(manifest, split)
    if split == "train":
        return manifest
    totals = (manifest.get("totals") or {}).get(split) or {}
    return {**manifest, "shards": shards, "totals": {**totals, "samples_kept": totals.get("samples")}, "split": split}


def load(path: str | Path, split: str = "train") -> pa.Table:
    """All shards of a build's `split` (train, or validation when the build holds one out) as one
    memory-mapped `pyarrow.Table` (zero-copy); `.to_pandas()` away. Each shard is checked as it is opened
    (`open_shard`, `check_rows`): a damaged one is a one-line error."""
    manifest = read_manifest(path)
    tables = []
    for s in split_shards(manifest, split):
        file = shard_path(path, s["file"])
        table = open_shard(file)
        check_rows(table, str(file))
        tables.append(table)
    if not tables:
        return SCHEMA.empty_table()
    return pa.concat_tables(tables)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
