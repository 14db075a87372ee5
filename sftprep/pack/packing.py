"""Packing: sample lengths -> rows. Pure functions: no files, no tokenizer.

A packed row of `max_length` = 12 holding samples 7 (5 tokens) and 3 (4 tokens):

    input_ids   <s> Q  :  A  </s> <s> Q  A  </s> pad pad pad
    labels      -   -  -  A  </s> -   -  A  </s> -   -   -      (- = -100)
    positions   0   1  2  3  4    0   1  2  3    .   .   .
    seq_lens    [5, 4]        sample_ids [7, 3]     real tokens = sum(seq_lens) = 9

Positions restart at 0 for every sample and attention stays inside a sample (the trainer derives
both from `seq_lens`). The first token of every sample has label -100.

Modes are objects (`MODES`, by name; `mode(name)`): each says how rows are formed and what a reader
of its rows must know (whether rows are padded to `max_length`, whether a sample may be split across
rows). Nothing else in sftprep or sfttrain tests a mode's name, so a new strategy is one `PackingMode`
entry here. Every mode returns the same row shape: a row is a list of pieces `(sample_index, start,
stop)`, the token range of a sample it holds:
- `bfd`: best-fit-decreasing over the whole dataset; a sample is never split (every piece is a whole
  sample); rows are shuffled (seeded), so a row's place in the shards says nothing of its fill.
- `wrapped`: samples laid end to end and cut every `max_length` tokens (pre-training style);
  a piece of a sample that starts a row counts as its own sample in `seq_lens`.
- `none`: one sample per row, no padding.
"""

from __future__ import annotations

import bisect
import random
from array import array
from dataclasses import dataclass
from itertools import islice
from typing import Callable, NamedTuple, Sequence

import numpy as np

Piece = tuple[int, int, int]
"""`(sample_index, start, stop)`: tokens `[start, stop)` of one sample, placed in a row."""

CHUNK = 1 << 16  # samples handed from numpy to the Python loop of BFD at a time (its only Python objects)


class Rows(Sequence[list[Piece]]):
    """Rows of pieces held in flat integer arrays, a few bytes per piece whatever the number of samples
    (a list of tuples costs ~100 bytes a piece). Bin `b` holds pieces `offsets[b]:offsets[b + 1]`; piece
    `k` is tokens `[start[k], stop[k])` of sample `sample[k]` (`start` None: whole samples, 0 to their
    `lengths`). Row `r` is bin `order[r]` (`order` None: bin `r`). Indexing and slicing give rows as lists
    of `Piece`s, built on demand (a shard writer asks for a batch of rows at a time)."""

    def __init__(self, offsets: np.ndarray, sample: np.ndarray, lengths: np.ndarray, *,
                 order: np.ndarray | None = None, start: np.ndarray | None = None,
                 stop: np.ndarray | None = None) -> None:
        self.offsets, self.sample, self.lengths = offsets, sample, lengths
        self.order, self.start, self.stop = order, start, stop

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            lo, hi, step = k.indices(len(self))
            if step != 1:
                return [self[r] for r in range(lo, hi, step)]
            return self._rows(lo, max(lo, hi))
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self._rows(k, k + 1)[0]

    def _rows(self, lo: int, hi: int) -> list[list[Piece]]:
        sample, start, stop, sizes = self.pieces(lo, hi)
        pieces = iter(zip(sample.tolist(), start.tolist(), stop.tolist()))
        return [list(islice(pieces, n)) for n in sizes.tolist()]

    def pieces(self, lo: int, hi: int) -> PieceArrays:
        """Rows `[lo, hi)` as flat arrays (`PieceArrays`), no Python object per piece."""
        bins = np.arange(lo, hi) if self.order is None else self.order[lo:hi].astype(np.int64)
        first, sizes = self.offsets[bins], self.offsets[bins + 1] - self.offsets[bins]
        k = np.repeat(first - np.cumsum(sizes) + sizes, sizes) + np.arange(int(sizes.sum()))  # the rows' pieces
        sample = self.sample[k].astype(np.int64)
        if self.start is None:
            return PieceArrays(sample, np.zeros(len(k), np.int64), self.lengths[sample].astype(np.int64), sizes)
        return PieceArrays(sample, self.start[k].astype(np.int64), self.stop[k].astype(np.int64), sizes)


class PieceArrays(NamedTuple):
    """Some rows' pieces laid end to end: piece `k` is tokens `[start[k], stop[k])` of sample `sample[k]`,
    and each row holds the next `sizes[r]` pieces (int64 arrays)."""

    sample: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    sizes: np.ndarray


def piece_arrays(rows: Sequence[list[Piece]], lo: int, hi: int) -> PieceArrays:
    """Rows `[lo, hi)` of a packing (`Rows`, or lists of `Piece`s) as `PieceArrays`."""
    if isinstance(rows, Rows):
        return rows.pieces(lo, hi)
    chosen = rows[lo:hi]
    flat = np.asarray([p for row in chosen for p in row], np.int64).reshape(-1, 3)
    return PieceArrays(flat[:, 0], flat[:, 1], flat[:, 2], np.asarray([len(r) for r in chosen], np.int64))


def index_array(n: int) -> np.dtype:
    """The smallest signed integer type that indexes `n` items (int32 below 2**31)."""
    return np.dtype(np.int32 if n < 2**31 else np.int64)


@dataclass(frozen=True)
class PackingMode:
    """How a packing strategy forms rows, and what a reader of its rows must know."""

    name: str
    rows: Callable[[np.ndarray, int, int], Sequence[list[Piece]]]
    """`rows(lengths, max_length, seed)`: every sample's tokens, placed as pieces in rows (a list of lists, or
    `Rows`: the same held in flat arrays, for millions of samples). `lengths` is a numpy integer array, compact
    in a build (uint16 when every sample is under 65,536 tokens): take `.tolist()` or `.astype(np.int64)`
    before arithmetic that may leave its range (`-lengths[i]`, a sum of two lengths)."""
    padded: bool
    """Rows are padded to `max_length` (else each row is as long as what it holds)."""
    shared: bool
    """A row may hold several samples (so attention must be kept inside each: sfttrain proves it does)."""
    splits: bool
    """A sample may be cut across rows: samples are not truncated to fit, a row's first piece may be the
    rest of the previous row's last sample, and a build of it cannot be rebuilt from parts."""
    help: str


def _bfd_rows(lengths: Sequence[int], max_length: int, seed: int) -> Rows:
    lengths = np.asarray(lengths)
    offsets, members = bfd_bins(lengths, max_length)
    # rows shuffled as random.shuffle shuffles a list, in an array (8 bytes a row, not a Python int each)
    random.Random(seed).shuffle(order := array("q", range(len(offsets) - 1)))
    return Rows(offsets, members, lengths, order=np.frombuffer(order, np.int64))


def _one_per_row(lengths: Sequence[int], max_length: int, seed: int) -> Rows:
    n = len(lengths)
    return Rows(np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=index_array(n)), np.asarray(lengths))


MODES: dict[str, PackingMode] = {m.name: m for m in (
    PackingMode("bfd", _bfd_rows, padded=True, shared=True, splits=False,
                help="best-fit-decreasing over the whole dataset, samples never split"),
    PackingMode("wrapped", lambda lengths, max_length, seed: pack_wrapped(lengths, max_length), padded=True,
                shared=True, splits=True, help="samples end to end, cut every max_length tokens (pre-training style)"),
    PackingMode("none", _one_per_row, padded=False, shared=False, splits=False, help="one sample per row, no padding"),
)}


def mode(name: str | None) -> PackingMode:
    """The packing mode called `name` (a build's `packing`; builds that name none were `bfd`)."""
    try:
        return MODES[name or "bfd"]
    except KeyError:
        raise ValueError(f"unknown packing mode {name!r}; known: {', '.join(MODES)}") from None


def pack(lengths: Sequence[int], max_length: int, mode_name: str, seed: int = 0) -> Sequence[list[Piece]]:
    """Rows of pieces for the packing mode called `mode_name` (the built-in modes: `Rows`); see the module
    docstring."""
    return mode(mode_name).rows(lengths, max_length, seed)


def pack_bfd(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bins of sample indices, as lists (`bfd_bins` is the compact form)."""
    offsets, members = bfd_bins(lengths, max_length)
    members = members.tolist()
    return [members[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def bfd_bins(lengths: Sequence[int], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing bins of sample indices, each bin's lengths summing to at most `max_length`:
    `(offsets, members)`, bin `b` holding samples `members[offsets[b]:offsets[b + 1]]` in the order they
    were placed.

    Samples are placed longest first, each into the fullest row it still fits in (ties broken by
    the lower index, so the result is deterministic). O(n log n): rows are kept in buckets by
    remaining capacity, and the distinct capacities in a sorted list. Memory: a few bytes per sample
    (numpy arrays; Python objects only for the rows with room left and CHUNK samples at a time).
    """
    lengths = np.asarray(lengths)
    n = len(lengths)
    if n and int(lengths.max()) > max_length:
        i = int(np.argmax(lengths))  # the first sample placed of those too long
        raise ValueError(f"sample {i} has {int(lengths[i])} tokens, more than max_length={max_length}")
    # longest first, ties by index
    order = stable_order(np.subtract(max_length, lengths, dtype=np.int32, casting="unsafe"), max_length + 1)
    bin_of = np.empty(n, np.int32 if n < 2**31 else np.int64)  # the bin of each sample, in placement order
    fullest = 0  # bins made so far
    by_room: dict[int, list[int]] = {}  # remaining capacity -> bins with it (a stack)
    rooms: list[int] = []  # sorted distinct capacities present in by_room
    for lo in range(0, n, CHUNK):
        placed = []
        for size in lengths[order[lo:lo + CHUNK]].tolist():
            k = bisect.bisect_left(rooms, size)
            if k == len(rooms):
                b, room = fullest, max_length
                fullest += 1
            else:
                room = rooms[k]
                stack = by_room[room]
                b = stack.pop()
                if not stack:
                    del by_room[room]
                    rooms.pop(k)
            placed.append(b)
            left = room - size
            if left > 0:
                if left not in by_room:
                    by_room[left] = []
                    bisect.insort(rooms, left)
                by_room[left].append(b)
        bin_of[lo:lo + len(placed)] = placed
    members = stable_order(bin_of, fullest, order)
    offsets = np.zeros(fullest + 1, np.int64)
    for lo in range(0, n, CHUNK):
        offsets[1:] += np.bincount(bin_of[lo:lo + CHUNK], minlength=fullest)
    return np.cumsum(offsets), members


def stable_order(keys: np.ndarray, num_keys: int, values: np.ndarray | None = None) -> np.ndarray:
    """`values[np.argsort(keys, kind="stable")]` for integer `keys` in `[0, num_keys)` (`values` None: the
    indices, as int32 below 2**31), without argsort's int64 array over every item: a counting sort, CHUNK
    keys at a time."""
    n = len(keys)
    out = np.empty(n, index_array(n) if values is None else values.dtype)
    start = np.zeros(num_keys, np.int64)  # where the next item of each key goes
    for lo in range(0, n, CHUNK):
        start[1:] += np.bincount(keys[lo:lo + CHUNK], minlength=num_keys)[:-1]
    start = np.cumsum(start)
    for lo in range(0, n, CHUNK):
        chunk = keys[lo:lo + CHUNK]
        local = np.argsort(chunk, kind="stable")
        ranked = chunk[local]
        count = np.bincount(ranked, minlength=num_keys)
        first = np.cumsum(count) - count  # where each key's items start in `ranked`
        at = start[ranked] + np.arange(len(ranked)) - first[ranked]
        out[at] = local + lo if values is None else values[lo + local]
        start += count
    return out


def pack_wrapped(lengths: Sequence[int], max_length: int) -> Rows:
    """Constant-length chunks across sample boundaries.

    Rows of pieces `(sample_index, start, stop)` (token range within the sample); every row but the last
    holds exactly `max_length` tokens. A piece starts at each sample's start and at each multiple of
    `max_length` in the samples laid end to end.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    starts = ends - lengths
    cuts = np.union1d(starts[lengths > 0], np.arange(0, total, max_length, dtype=np.int64))
    sample = np.searchsorted(ends, cuts, side="right")
    first = starts[sample]
    rows = -(-total // max_length)
    offsets = np.searchsorted(cuts, np.arange(rows + 1, dtype=np.int64) * max_length).astype(np.int64)
    return Rows(offsets, sample.astype(index_array(len(lengths))), lengths,
                start=cuts - first, stop=np.append(cuts[1:], total) - first)


def fill_ratio(total_tokens: int, rows: int, max_length: int) -> float:
    """Real tokens / row capacity (1.0 = no padding)."""
    return total_tokens / (rows * max_length) if rows else 0.0
