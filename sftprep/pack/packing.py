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
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

Piece = tuple[int, int, int]
"""`(sample_index, start, stop)`: tokens `[start, stop)` of one sample, placed in a row."""


@dataclass(frozen=True)
class PackingMode:
    """How a packing strategy forms rows, and what a reader of its rows must know."""

    name: str
    rows: Callable[[Sequence[int], int, int], list[list[Piece]]]
    """`rows(lengths, max_length, seed)`: every sample's tokens, placed as pieces in rows."""
    padded: bool
    """Rows are padded to `max_length` (else each row is as long as what it holds)."""
    shared: bool
    """A row may hold several samples (so attention must be kept inside each: sfttrain proves it does)."""
    splits: bool
    """A sample may be cut across rows: samples are not truncated to fit, a row's first piece may be the
    rest of the previous row's last sample, and a build of it cannot be rebuilt from parts."""
    help: str


def _bfd_rows(lengths: Sequence[int], max_length: int, seed: int) -> list[list[Piece]]:
    rows = pack_bfd(lengths, max_length)
    random.Random(seed).shuffle(order := list(range(len(rows))))
    return [[(i, 0, lengths[i]) for i in rows[k]] for k in order]


def _one_per_row(lengths: Sequence[int], max_length: int, seed: int) -> list[list[Piece]]:
    return [[(i, 0, n)] for i, n in enumerate(lengths)]


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


def pack(lengths: Sequence[int], max_length: int, mode_name: str, seed: int = 0) -> list[list[Piece]]:
    """Rows of pieces for the packing mode called `mode_name`; see the module docstring."""
    return mode(mode_name).rows(lengths, max_length, seed)


def pack_bfd(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bins of sample indices; each bin's lengths sum to at most `max_length`.

    Samples are placed longest first, each into the fullest row it still fits in (ties broken by
    the lower index, so the result is deterministic). O(n log n): rows are kept in buckets by
    remaining capacity, and the distinct capacities in a sorted list.
    """
    # longest first, ties by index (a stable sort); numpy: no key tuple per sample
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist()
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # remaining capacity -> bins with it (a stack)
    rooms: list[int] = []  # sorted distinct capacities present in by_room
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens, more than max_length={max_length}")
        k = bisect.bisect_left(rooms, n)
        if k == len(rooms):
            b, room = len(bins), max_length
            bins.append([])
        else:
            room = rooms[k]
            stack = by_room[room]
            b = stack.pop()
            if not stack:
                del by_room[room]
                rooms.pop(k)
        bins[b].append(i)
        left = room - n
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(b)
    return bins


def pack_wrapped(lengths: Sequence[int], max_length: int) -> list[list[Piece]]:
    """Constant-length chunks across sample boundaries.

    Returns rows of pieces `(sample_index, start, stop)` (token range within the sample); every row
    but the last holds exactly `max_length` tokens.
    """
    rows: list[list[Piece]] = []
    row: list[Piece] = []
    room = max_length
    for i, n in enumerate(lengths):
        start = 0
        while start < n:
            take = min(room, n - start)
            row.append((i, start, start + take))
            start += take
            room -= take
            if room == 0:
                rows.append(row)
                row, room = [], max_length
    if row:
        rows.append(row)
    return rows


def fill_ratio(total_tokens: int, rows: int, max_length: int) -> float:
    """Real tokens / row capacity (1.0 = no padding)."""
    return total_tokens / (rows * max_length) if rows else 0.0
