"""Tokenized samples between tokenize and pack, spilled to disk so memory stays flat.

    Encoded batches --add--> OUT/tokens.spill.{ids,labels}.tmp (int32, end to end)
                             OUT/tokens.spill.samples.tmp (the samples table, an Arrow stream, batch by batch)
                             OUT/tokens.spill.rejects.tmp (the rejected records: `rejects.Rejects`)
    seal() --> the files read back --rows_batch(rows of pieces)--> one Arrow record batch of shard rows

Best-fit-decreasing needs every sample's length before the first row can be written. Rather than
holding every token in memory, each encoded batch is appended to two flat int32 files in the output
folder (ids, labels), and its samples' id, source, length, trained count and truncation flag to a third;
writing then reads each row's samples from them straight into the row's buffers (a recipe's content hashes
read them through memory maps). What stays in memory is independent of the number of samples but for one
compact array read back by `seal`: each sample's length (2 bytes below 65,536 tokens). Where a sample's tokens
start is the running sum of the lengths, kept for one sample in STARTS_EVERY; sample ids are held as runs of
consecutive ids (`IdRuns`).

`Samples` is what packing, the shard writer and `output.write_samples` read: per-sample arrays, the samples
table batch by batch, and `rows_batch`. `SampleStore` fills it from the encoder; `sftprep.scale.merge.MergedSamples`
from the shards of a build's parts.
"""

from __future__ import annotations

import hashlib
import mmap
from itertools import repeat
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from ..pack.packing import CHUNK, PieceArrays, index_array
from ..tokenize.arrow import as_numpy, numpy_array, string_array
from ..tokenize.encode import Encoded
from ..tokenize.labels import IGNORE_INDEX, mask_sample_starts
from .files import claim, names_path
from .rejects import Rejects
from .shards import rows_batch

STARTS_EVERY = 32  # a sample's first token is kept for one sample in STARTS_EVERY (8 bytes); the others' are summed
# from the lengths when asked (`SampleStore.starts_of`)
RELEASE_PIECES = 256  # samples read from a memory map between two releases of its pages: each page
# fault maps up to 64 KiB around it (fault-around), so this bounds the pages mapped to ~32 MiB

SAMPLE_SCHEMA = pa.schema([("sample_id", pa.int64()), ("source", pa.string()), ("num_tokens", pa.int32()),
                           ("num_trained", pa.int32()), ("truncated", pa.bool_())])
"""samples.feather: per kept sample, its id, source (file:line), tokens, trained tokens and truncation flag."""


class IdRuns:
    """Increasing sample ids held as runs of consecutive ids (a run's first position and first id): a build
    that rejects few records holds a few numbers, not one per sample. Indexed like the int64 array it stands
    for (`ids[k]`, `np.asarray(ids)`)."""

    def __init__(self, starts: np.ndarray, firsts: np.ndarray, n: int) -> None:
        self.starts, self.firsts, self.n = starts, firsts, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k):
        k = np.asarray(k, np.int64)
        run = np.searchsorted(self.starts, k, side="right") - 1
        return self.firsts[run] + (k - self.starts[run])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        ids = self[np.arange(self.n)]
        return ids if dtype is None else ids.astype(dtype)


class Samples:
    """Kept samples in input order: `lengths` (a compact integer array), `sample_ids` (one, or `IdRuns`),
    `num_truncated`, the samples table (`SAMPLE_SCHEMA`) batch by batch (`table_batches`) and its sources array
    by array (`sources`), and shard rows copied out of their tokens (`rows_batch`). Subclasses say where the
    tokens are (`_tokens_of`)."""

    def __init__(self) -> None:
        self.lengths = np.zeros(0, np.int32)
        self.sample_ids = np.zeros(0, np.int32)
        self.num_truncated = 0
        self.table_file: Path | None = None  # the samples table once written (`output.write_samples`)
        self._buffers = [(np.empty(0, np.int32), np.empty(0, np.int32))] * 2  # ids, labels: taken in turn
        self._maps: list[mmap.mmap] = []  # the memory maps tokens are read from (`_release`)

    def __len__(self) -> int:
        return len(self.lengths)

    def table_batches(self) -> Iterator[pa.RecordBatch]:
        """The samples table (`SAMPLE_SCHEMA`), in input order, in batches of any size."""
        raise NotImplementedError

    @property
    def sources(self) -> Iterable[pa.Array]:
        """Every kept sample's source (file:line), in input order, one string array at a time."""
        return (batch.column(1) for batch in self.table_batches())

    def rows_batch(self, rows: PieceArrays, width: int | None, pad: int) -> pa.RecordBatch:
        """Shard rows (`shards.SCHEMA`) holding `rows` (their pieces: `packing.piece_arrays`), each padded
        with `pad` (label -100) to `width` tokens (None: as long as its pieces). Tokens are copied (`_copy`)
        into one of two pairs of buffers, taken in turn: write a batch before asking for the one after next
        (the shard writer writes one while the next is made)."""
        seq_lens = rows.stop - rows.start
        seq_off = np.concatenate([[0], np.cumsum(rows.sizes)])
        ends = np.concatenate([[0], np.cumsum(seq_lens)])
        used = ends[seq_off[1:]] - ends[seq_off[:-1]]  # each row's tokens
        row_off = np.concatenate([[0], np.cumsum(np.full(len(used), width) if width else used)])
        n = int(row_off[-1])
        self._buffers.reverse()
        if n > len(self._buffers[0][0]):
            self._buffers[0] = (np.empty(n, np.int32), np.empty(n, np.int32))
        ids, labels = self._buffers[0][0][:n], self._buffers[0][1][:n]
        for begin, end in zip((row_off[:-1] + used).tolist(), row_off[1:].tolist()):
            if begin < end:
                ids[begin:end] = pad
                labels[begin:end] = IGNORE_INDEX
        row = np.repeat(np.arange(len(used)), rows.sizes)
        dest = row_off[:-1][row] + ends[:-1] - ends[seq_off[:-1]][row]  # where each piece goes
        self._copy(rows.sample, rows.start, seq_lens, dest, ids, labels)
        if rows.start.any():  # a piece past its sample's first token starts a sample in its row (wrapped
            # packing): mask sample starts again (whole samples had theirs masked when labelled)
            mask_sample_starts(labels, seq_lens, row_off, seq_off)
        return rows_batch(ids, labels, row_off, seq_lens, seq_off, self.sample_ids[rows.sample].astype(np.int64))

    def _copy(self, samples: np.ndarray, start: np.ndarray, length: np.ndarray, dest: np.ndarray, ids: np.ndarray,
              labels: np.ndarray) -> None:
        """Copy `length[k]` tokens of sample `samples[k]` from its token `start[k]` into `ids`/`labels` at
        `dest[k]`, for every k. Samples laid in one pair of files (`_token_files`) are read straight into
        place, with no memory map: a row gathers samples from all over the files, and mapping their pages
        costs more than reading them (each page faulted in, then released). Otherwise they are copied from
        the arrays `_tokens_of` names, releasing the mapped pages read every RELEASE_PIECES pieces."""
        files = self._token_files()
        if files is not None:
            src_ids, src_labels, starts_of = files
            src = starts_of(samples) + start
            # pieces that continue each other in the files and in the rows (wrapped packing, or none) are read
            # as one
            heads = np.flatnonzero(np.concatenate([[True], (src[1:] != src[:-1] + length[:-1]) |
                                                   (dest[1:] != dest[:-1] + length[:-1])]))
            if len(heads) < len(src):
                src, dest, length = src[heads], dest[heads], np.add.reduceat(length, heads)
            dst_ids, dst_labels = memoryview(ids).cast("B"), memoryview(labels).cast("B")
            got = 0
            for s, b, d in zip((4 * src).tolist(), (4 * length).tolist(), (4 * dest).tolist()):
                src_ids.seek(s)
                got += src_ids.readinto(dst_ids[d:d + b])
                src_labels.seek(s)
                got += src_labels.readinto(dst_labels[d:d + b])
            if got != 8 * int(length.sum()):
                raise OSError(f"{src_ids.name} or {src_labels.name} was cut short while the build read it back")
            return
        where = self._tokens_of(samples)
        for k, (a, b, d, (src_ids, src_labels, s)) in enumerate(zip(start.tolist(), length.tolist(), dest.tolist(),
                                                                     where), 1):
            if k % RELEASE_PIECES == 0:
                self._release()
            ids[d:d + b] = src_ids[s + a:s + a + b]
            labels[d:d + b] = src_labels[s + a:s + a + b]
        self._release()

    def _tokens_of(self, samples: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """For each of `samples`: the token arrays it lies in, and where it starts in them."""
        raise NotImplementedError

    def _token_files(self) -> tuple[BinaryIO, BinaryIO, Callable[[np.ndarray], np.ndarray]] | None:
        """(ids file, labels file, where samples start in them, in tokens: a function of their indices) when every
        sample lies in one pair of unbuffered files of int32 tokens, else None (`_tokens_of` then says, sample by
        sample)."""
        return None

    def hashes(self) -> tuple[np.ndarray, np.ndarray]:
        """Per sample, two 64-bit content hashes (blake2b): of its token ids (`key`: what a recipe splits and
        orders by) and of its ids and labels (`exact`: what makes two samples duplicates)."""
        n = len(self)
        key, exact = np.empty(n, np.uint64), np.empty(n, np.uint64)
        where = self._tokens_of(np.arange(n))
        for i, (length, (ids, labels, start)) in enumerate(zip(self.lengths.tolist(), where)):
            if i % RELEASE_PIECES == 0:
                self._release()
            h = hashlib.blake2b(ids[start:start + length].tobytes(), digest_size=8)
            key[i] = int.from_bytes(h.digest(), "little")
            h.update(labels[start:start + length].tobytes())
            exact[i] = int.from_bytes(h.digest(), "little")
        self._release()
        return key, exact

    def _release(self) -> None:
        """Drop the mapped pages read so far from this process's resident memory (read-only file pages:
        the kernel reads them again, from its page cache, if they are touched again). Rows gather samples
        from all over their files, and each page fault maps up to 64 KiB around it: without this, whole
        files would become resident."""
        for m in self._maps:
            try:
                m.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):  # platforms without madvise: only RSS differs
                pass


class Selected(Samples):
    """Some samples of another `Samples`, in the order given (a recipe's train or validation split: runs of
    ascending indices, one run per copy): each copy of a repeated sample is a sample of its own, with its own
    id (the sample's id + copy x `stride`, the records read, so ids stay unique) and the same tokens and
    provenance. Its samples table is streamed from the other's, one pass a run."""

    def __init__(self, base: Samples, take: np.ndarray, copy: np.ndarray, stride: int) -> None:
        super().__init__()
        self.base, self.take, self.copy = base, np.asarray(take, np.int64), np.asarray(copy, np.int64)
        self.lengths = base.lengths[self.take]
        self.origin = base.sample_ids[self.take].astype(np.int64)  # the id of the sample each one copies
        self.sample_ids = self.origin + self.copy * stride
        self._maps = base._maps

    def table_batches(self) -> Iterator[pa.RecordBatch]:
        runs = np.flatnonzero(np.diff(self.take) < 0) + 1  # where a new ascending run starts
        for lo, hi in zip([0, *runs.tolist()], [*runs.tolist(), len(self.take)]):
            wanted, at = self.take[lo:hi], 0
            for batch in self.base.table_batches():
                a, b = np.searchsorted(wanted, [at, at + batch.num_rows])
                if b > a:
                    picked = batch.take(numpy_array(wanted[a:b] - at, pa.int64()))
                    ids = numpy_array(self.sample_ids[lo + a:lo + b], pa.int64())
                    yield pa.record_batch([ids, *picked.columns[1:]], schema=picked.schema)
                at += batch.num_rows

    def _tokens_of(self, samples: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        return self.base._tokens_of(self.take[samples])

    def _token_files(self) -> tuple[BinaryIO, BinaryIO, Callable[[np.ndarray], np.ndarray]] | None:
        files = self.base._token_files()
        return None if files is None else (files[0], files[1], lambda samples: files[2](self.take[samples]))


class SampleStore(Samples):
    """Append batches while encoding (`add`), then `seal` and copy rows out (`rows_batch`)."""

    def __init__(self, folder: Path, stem: str) -> None:
        super().__init__()
        self.paths = tuple(folder / f"{stem}.{part}.tmp" for part in ("ids", "labels", "samples"))
        claim(*self.paths)
        self._files = [open(p, "wb") for p in self.paths]
        self.rejects = Rejects(folder / f"{stem}.rejects.tmp")  # the records encoding dropped, spilled too
        with names_path(self.paths[2]):
            self._table = pa.ipc.new_stream(self._files[2], SAMPLE_SCHEMA)
        self.total = 0
        self.count = 0  # samples added
        self.max_id = -1  # the largest token id stored (the manifest's max_token_id bounds it)
        self.longest = 0  # the most tokens of a sample
        self._ids = self._labels = None
        self._readers: list[BinaryIO] = []  # the ids and labels files, read back by `_copy`
        self._last_id = -1
        self._every_start = np.zeros(1, np.int64)  # the first token of samples 0, STARTS_EVERY, 2 x STARTS_EVERY...

    def add(self, enc: Encoded) -> None:
        with names_path(self.paths[0]):
            self._files[0].write(np.ascontiguousarray(enc.ids, dtype=np.int32))
        with names_path(self.paths[1]):
            self._files[1].write(np.ascontiguousarray(enc.labels, dtype=np.int32))
        with names_path(self.paths[2]):
            self._table.write_batch(pa.record_batch([
                numpy_array(np.asarray(enc.sample_ids, np.int64), pa.int64()), string_array(enc.sources),
                numpy_array(enc.lengths, pa.int32()), numpy_array(enc.num_trained, pa.int32()),
                numpy_array(np.asarray(enc.truncated, bool), pa.bool_())], schema=SAMPLE_SCHEMA))
        self.rejects.add(enc.rejects)
        self.total += len(enc.ids)
        self.count += len(enc.lengths)
        self.num_truncated += int(np.count_nonzero(enc.truncated))
        if len(enc.ids):
            self.max_id = max(self.max_id, int(enc.ids.max()))
            self.longest = max(self.longest, int(enc.lengths.max()))
        if enc.sample_ids:
            self._last_id = enc.sample_ids[-1]

    def table_batches(self) -> Iterator[pa.RecordBatch]:
        if self.table_file is not None and self.table_file.exists():  # the spill may be gone by then
            with pa.OSFile(str(self.table_file)) as f:
                reader = pa.ipc.open_file(f)
                for k in range(reader.num_record_batches):
                    yield reader.get_batch(k)
            return
        with pa.OSFile(str(self.paths[2])) as f:
            yield from pa.ipc.open_stream(f)

    def seal(self) -> None:
        """Finish the files, map the tokens back and read the lengths and ids; after this, `rows_batch` works."""
        with names_path(self.paths[2]):
            self._table.close()
        for f, p in zip(self._files, self.paths):
            with names_path(p):
                f.close()
        if self.total:
            # plain ndarray views of the maps: slicing a np.memmap costs microseconds each
            maps = [np.memmap(p, dtype=np.int32, mode="r", shape=(self.total,)) for p in self.paths[:2]]
            self._maps = [m._mmap for m in maps if getattr(m, "_mmap", None) is not None]
            self._ids, self._labels = np.asarray(maps[0]), np.asarray(maps[1])
            self._readers = [open(p, "rb", buffering=0) for p in self.paths[:2]]
        # 2 bytes a sample below 65,536 tokens
        self.lengths = np.empty(self.count, np.uint16 if self.longest < 2**16 else np.int32)
        heads, firsts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]  # where runs of consecutive ids begin
        at, last = 0, -2
        for batch in self.table_batches():
            n = batch.num_rows
            self.lengths[at:at + n] = as_numpy(batch.column(2))
            if n:
                sid = as_numpy(batch.column(0))
                head = np.flatnonzero(np.diff(sid, prepend=last) != 1)
                heads.append(head + at)
                firsts.append(sid[head])
                last = int(sid[-1])
            at += n
        if self.count:
            blocks = np.add.reduceat(self.lengths, np.arange(0, self.count, STARTS_EVERY), dtype=np.int64)
            self._every_start = np.concatenate([[0], np.cumsum(blocks)])
        self.sample_ids = IdRuns(np.concatenate(heads).astype(np.int64), np.concatenate(firsts).astype(np.int64),
                                 self.count)
        if len(self.sample_ids.starts) > self.count // 4:  # ids that jump everywhere (a --part): one array is smaller
            self.sample_ids = np.asarray(self.sample_ids).astype(index_array(self._last_id + 1))

    def starts_of(self, samples: np.ndarray) -> np.ndarray:
        """Where each of `samples` (indices) starts in the token files: the kept start before it plus the lengths
        between (fewer than STARTS_EVERY), summed a column at a time."""
        samples = np.asarray(samples, np.int64)
        block, within = np.divmod(samples, STARTS_EVERY)
        out = self._every_start[block]
        for j in range(1, STARTS_EVERY):
            later = np.flatnonzero(within >= j)
            if not len(later):
                break
            out[later] += self.lengths[samples[later] - within[later] + j - 1]
        return out

    def _tokens_of(self, samples: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        for lo in range(0, len(samples), CHUNK):  # a Python int per sample, but only CHUNK at a time
            yield from zip(repeat(self._ids), repeat(self._labels), self.starts_of(samples[lo:lo + CHUNK]).tolist())

    def _token_files(self) -> tuple[BinaryIO, BinaryIO, Callable[[np.ndarray], np.ndarray]] | None:
        return (*self._readers, self.starts_of) if self._readers else None

    def remove(self) -> None:
        self.rejects.remove()
        for f in self._files:
            try:
                f.close()
            except OSError:  # buffered bytes that cannot be written (disk full): the files go anyway
                pass
        for f in self._readers:
            f.close()
        self._ids = self._labels = None
        self._maps, self._readers = [], []
        for p in self.paths:
            p.unlink(missing_ok=True)

