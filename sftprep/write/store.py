"""Tokenized samples between tokenize and pack, spilled to disk so memory stays flat.

    Encoded batches --add--> OUT/tokens.spill.{ids,labels}.tmp (int32, end to end)
    seal() --> memory maps --rows_batch(rows of pieces)--> one Arrow record batch of shard rows

Best-fit-decreasing needs every sample's length before the first row can be written. Rather than
holding every token in memory, each encoded batch is appended to two flat int32 files in the output
folder (ids, labels); writing then copies rows out of their memory maps. Only a few numbers per
sample (offset, length, id, provenance) stay in memory.

`Samples` is what packing, the shard writer and `output.write_samples` read: per-sample numbers, and
`rows_batch`. `SampleStore` fills it from the encoder; `sftprep.scale.merge.MergedSamples` from the shards of
a build's parts.
"""

from __future__ import annotations

import hashlib
import mmap
from array import array
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..pack.packing import Piece
from ..tokenize.encode import Encoded
from ..tokenize.labels import IGNORE_INDEX, mask_sample_starts
from .files import claim, names_path
from .shards import rows_batch, string_array

RELEASE_PIECES = 256  # samples copied out of the spill between two releases of its pages: each page
# fault maps up to 64 KiB around it (fault-around), so this bounds the spill pages mapped to ~32 MiB


class Samples:
    """Kept samples in input order: `lengths`, `sample_ids`, `num_trained`, `truncated` (int64 / int8
    arrays), `sources` (Arrow strings), and shard rows copied out of their tokens (`rows_batch`).
    Subclasses say where the tokens are (`_copy`)."""

    def __init__(self) -> None:
        self.lengths = array("q")
        self.sample_ids = array("q")
        self.num_trained = array("q")
        self.truncated = array("b")
        self._buffers = (np.empty(0, np.int32), np.empty(0, np.int32))  # reused from batch to batch
        self._maps: list[mmap.mmap] = []  # the memory maps tokens are read from (`_release`)

    def __len__(self) -> int:
        return len(self.lengths)

    def rows_batch(self, rows: list[list[Piece]], width: int | None, pad: int) -> pa.RecordBatch:
        """Shard rows (`shards.SCHEMA`) holding `rows` (lists of pieces, `packing.pack`), each padded
        with `pad` (label -100) to `width` tokens (None: as long as its pieces). Tokens are copied (`_copy`)
        into two buffers reused from call to call: write the batch before the next."""
        copies, gaps, seq_lens, sids, row_off, seq_off = [], [], [], [], [0], [0]
        sample_ids = self.sample_ids
        cut = False
        for row in rows:
            dest = row_off[-1]
            for i, a, b in row:
                copies.append((i, a, b, dest))
                dest += b - a
                seq_lens.append(b - a)
                sids.append(sample_ids[i])
                cut = cut or a > 0
            row_off.append(row_off[-1] + width if width else dest)
            seq_off.append(len(seq_lens))
            if dest < row_off[-1]:
                gaps.append((dest, row_off[-1]))
        n = row_off[-1]
        if n > len(self._buffers[0]):
            self._buffers = (np.empty(n, np.int32), np.empty(n, np.int32))
        ids, labels = self._buffers[0][:n], self._buffers[1][:n]
        row_off, seq_lens, seq_off = np.asarray(row_off), np.asarray(seq_lens), np.asarray(seq_off)
        for begin, end in gaps:
            ids[begin:end] = pad
            labels[begin:end] = IGNORE_INDEX
        self._copy(copies, ids, labels)
        if cut:  # a piece past its sample's first token starts a sample in its row (wrapped packing):
            # mask sample starts again (whole samples had theirs masked when labelled)
            mask_sample_starts(labels, seq_lens, row_off, seq_off)
        return rows_batch(ids, labels, row_off, seq_lens, seq_off, np.asarray(sids))

    def _copy(self, pieces: list[tuple[int, int, int, int]], ids: np.ndarray, labels: np.ndarray) -> None:
        """Copy pieces `(sample, start, stop, dest)`, token range `[start, stop)` of a sample, into
        `ids`/`labels` at `dest`, releasing the mapped pages read every RELEASE_PIECES pieces."""
        for k, (i, a, b, d) in enumerate(pieces, 1):
            if k % RELEASE_PIECES == 0:
                self._release()
            src_ids, src_labels, s = self._tokens(i)
            ids[d:d + b - a] = src_ids[s + a:s + b]
            labels[d:d + b - a] = src_labels[s + a:s + b]
        self._release()

    def _tokens(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The token arrays sample `i` lies in, and where it starts in them."""
        raise NotImplementedError

    def hashes(self) -> tuple[np.ndarray, np.ndarray]:
        """Per sample, two 64-bit content hashes (blake2b): of its token ids (`key`: what a recipe splits and
        orders by) and of its ids and labels (`exact`: what makes two samples duplicates)."""
        n = len(self)
        key, exact = np.empty(n, np.uint64), np.empty(n, np.uint64)
        for i, length in enumerate(self.lengths):
            if i % RELEASE_PIECES == 0:
                self._release()
            ids, labels, start = self._tokens(i)
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
    """Some samples of another `Samples`, in the order given (a recipe's train or validation split): each
    copy of a repeated sample is a sample of its own, with its own id (the sample's id + copy x `stride`, the
    records read, so ids stay unique) and the same tokens and provenance."""

    def __init__(self, base: Samples, take: np.ndarray, copy: np.ndarray, stride: int) -> None:
        super().__init__()
        self.base, self.take, self.copy = base, np.asarray(take, np.int64), np.asarray(copy, np.int64)
        for name, dtype in (("lengths", np.int64), ("num_trained", np.int64), ("truncated", np.int8)):
            values = np.frombuffer(getattr(base, name), dtype)[self.take]
            setattr(self, name, array("q" if dtype is np.int64 else "b", values.tobytes()))
        ids = np.frombuffer(base.sample_ids, np.int64)[self.take] + self.copy * stride
        self.sample_ids = array("q", ids.tobytes())
        self.sources = base.sources.take(pa.array(self.take, pa.int64()))
        self._maps = base._maps

    def _tokens(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        return self.base._tokens(int(self.take[i]))


class SampleStore(Samples):
    """Append batches while encoding (`add`), then `seal` and copy rows out (`rows_batch`)."""

    def __init__(self, folder: Path, stem: str) -> None:
        super().__init__()
        self.paths = (folder / f"{stem}.ids.tmp", folder / f"{stem}.labels.tmp")
        claim(*self.paths)
        self._files = [open(p, "wb") for p in self.paths]
        self._sources: list[pa.Array] = []  # one string array per batch
        self.total = 0
        self.max_id = -1  # the largest token id stored (the manifest's max_token_id bounds it)
        self._ids = self._labels = None
        self.starts: list[int] = []

    def add(self, enc: Encoded) -> None:
        with names_path(self.paths[0]):
            self._files[0].write(np.ascontiguousarray(enc.ids, dtype=np.int32).tobytes())
        with names_path(self.paths[1]):
            self._files[1].write(np.ascontiguousarray(enc.labels, dtype=np.int32).tobytes())
        self.total += len(enc.ids)
        if len(enc.ids):
            self.max_id = max(self.max_id, int(enc.ids.max()))
        self.lengths.extend(enc.lengths.tolist())
        self.num_trained.extend(enc.num_trained.tolist())
        self.sample_ids.extend(enc.sample_ids)
        self.truncated.extend(enc.truncated)
        self._sources.append(string_array(enc.sources))

    @property
    def sources(self) -> pa.Array:
        """Every kept sample's source (file:line), in order."""
        return pa.concat_arrays(self._sources) if self._sources else string_array([])

    def seal(self) -> None:
        """Finish the files and map them back; after this, `rows_batch` works."""
        for f, p in zip(self._files, self.paths):
            with names_path(p):
                f.close()
        if self.total:
            # plain ndarray views of the maps: slicing a np.memmap costs microseconds each
            maps = [np.memmap(p, dtype=np.int32, mode="r", shape=(self.total,)) for p in self.paths]
            self._maps = [m._mmap for m in maps if getattr(m, "_mmap", None) is not None]
            self._ids, self._labels = np.asarray(maps[0]), np.asarray(maps[1])
        lengths = np.frombuffer(self.lengths, dtype=np.int64)
        self.starts = (np.cumsum(lengths) - lengths).tolist()

    def _tokens(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        return self._ids, self._labels, self.starts[i]

    def remove(self) -> None:
        for f in self._files:
            try:
                f.close()
            except OSError:  # buffered bytes that cannot be written (disk full): the files go anyway
                pass
        self._ids = self._labels = None
        self._maps = []
        for p in self.paths:
            p.unlink(missing_ok=True)
