"""Tokenized samples between tokenize and pack, spilled to disk so memory stays flat.

    Encoded batches --add--> OUT/tokens.spill.{ids,labels}.tmp (int32, end to end)
    seal() --> memory maps --rows_batch(rows of pieces)--> one Arrow record batch of shard rows

Best-fit-decreasing needs every sample's length before the first row can be written. Rather than
holding every token in memory, each encoded batch is appended to two flat int32 files in the output
folder (ids, labels); writing then copies rows out of their memory maps. Only a few numbers per
sample (offset, length, id, provenance) stay in memory.
"""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np

import pyarrow as pa

from .encode import Encoded
from .labels import IGNORE_INDEX, mask_sample_starts
from .packing import Piece
from .shards import rows_batch


class SampleStore:
    """Append batches while encoding (`add`), then `seal` and copy rows out (`rows_batch`)."""

    def __init__(self, folder: Path, stem: str) -> None:
        self.paths = (folder / f"{stem}.ids.tmp", folder / f"{stem}.labels.tmp")
        self._files = [open(p, "wb") for p in self.paths]
        self.lengths = array("q")
        self.sample_ids = array("q")
        self.num_trained = array("q")
        self.truncated = array("b")
        self.sources: list[str] = []
        self.total = 0
        self._ids = self._labels = None
        self.starts: list[int] = []
        self._buffers = (np.empty(0, np.int32), np.empty(0, np.int32))  # reused from batch to batch

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, enc: Encoded) -> None:
        self._files[0].write(np.ascontiguousarray(enc.ids, dtype=np.int32).tobytes())
        self._files[1].write(np.ascontiguousarray(enc.labels, dtype=np.int32).tobytes())
        self.total += len(enc.ids)
        self.lengths.extend(enc.lengths.tolist())
        self.num_trained.extend(enc.num_trained.tolist())
        self.sample_ids.extend(enc.sample_ids)
        self.truncated.extend(enc.truncated)
        self.sources += enc.sources

    def seal(self) -> None:
        """Finish the files and map them back; after this, `gather` works."""
        for f in self._files:
            f.close()
        if self.total:
            # plain ndarray views of the maps: slicing a np.memmap costs microseconds each
            self._ids = np.asarray(np.memmap(self.paths[0], dtype=np.int32, mode="r", shape=(self.total,)))
            self._labels = np.asarray(np.memmap(self.paths[1], dtype=np.int32, mode="r", shape=(self.total,)))
        lengths = np.frombuffer(self.lengths, dtype=np.int64)
        self.starts = (np.cumsum(lengths) - lengths).tolist()

    def rows_batch(self, rows: list[list[Piece]], width: int | None, pad: int) -> pa.RecordBatch:
        """Shard rows (`shards.SCHEMA`) holding `rows` (lists of pieces, `packing.pack`), each padded
        with `pad` (label -100) to `width` tokens (None: as long as its pieces). Tokens are copied out
        of the spill files into two buffers reused from call to call: write the batch before the next."""
        copies, gaps, seq_lens, sids, row_off, seq_off = [], [], [], [], [0], [0]
        sample_ids = self.sample_ids
        for row in rows:
            dest = row_off[-1]
            for i, a, b in row:
                copies.append((i, a, b, dest))
                dest += b - a
                seq_lens.append(b - a)
                sids.append(sample_ids[i])
            row_off.append(row_off[-1] + width if width else dest)
            seq_off.append(len(seq_lens))
            if dest < row_off[-1]:
                gaps.append((dest, row_off[-1]))
        n = row_off[-1]
        if n > len(self._buffers[0]):
            self._buffers = (np.empty(n, np.int32), np.empty(n, np.int32))
        ids, labels = self._buffers[0][:n], self._buffers[1][:n]
        row_off, seq_lens, seq_off = np.asarray(row_off), np.asarray(seq_lens), np.asarray(seq_off)
        if self._gather(copies, gaps, ids, labels, pad):
            mask_sample_starts(labels, seq_lens, row_off, seq_off)
        return rows_batch(ids, labels, row_off, seq_lens, seq_off, np.asarray(sids))

    def _gather(self, pieces: list[tuple[int, int, int, int]], gaps: list[tuple[int, int]], ids: np.ndarray,
                labels: np.ndarray, pad: int) -> bool:
        """Copy pieces `(sample, start, stop, dest)`, token range `[start, stop)` of a sample, into
        `ids`/`labels` at `dest`; fill `gaps` (`[begin, end)` ranges) with `pad` and label -100.
        Pieces and gaps together must cover the output. Returns whether a piece begins past its
        sample's first token: it starts a sample in its row (wrapped packing), so the caller masks
        sample starts again (whole samples had theirs masked when labelled).
        """
        for begin, end in gaps:
            ids[begin:end] = pad
            labels[begin:end] = IGNORE_INDEX
        src_ids, src_labels, starts = self._ids, self._labels, self.starts
        cut = False
        for i, a, b, d in pieces:
            s = starts[i]
            ids[d:d + b - a] = src_ids[s + a:s + b]
            labels[d:d + b - a] = src_labels[s + a:s + b]
            cut = cut or a > 0
        return cut

    def remove(self) -> None:
        for f in self._files:
            f.close()
        self._ids = self._labels = None
        for p in self.paths:
            p.unlink(missing_ok=True)
