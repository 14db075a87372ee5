"""Packing: sample lengths -> rows. Pure functions: no files, no tokenizer.

A packed row of `max_length` = 12 holding samples 7 (5 tokens) and 3 (4 tokens):

    input_ids   <s> Q  :  A  </s> <s> Q  A  </s> pad pad pad
    labels      -   -  -  A  </s> -   -  A  </s> -   -   -      (- = -100)
    positions   0   1  2  3  4    0   1  2  3    .   .   .
    seq_lens    [5, 4]        sample_ids [7, 3]     real tokens = sum(seq_lens) = 9

Positions restart at 0 for every sample and attention stays inside a sample (the trainer derives
both from `seq_lens`). The first token of every sample has label -100.

Modes (`pack` returns the same row shape for all three: a row is a list of pieces
`(sample_index, start, stop)`, the token range of a sample it holds):
- `bfd`: best-fit-decreasing over the whole dataset; a sample is never split (every piece is a whole
  sample); rows are shuffled (seeded), so a row's place in the shards says nothing of its fill.
- `wrapped`: samples laid end to end and cut every `max_length` tokens (pre-training style);
  a piece of a sample that starts a row counts as its own sample in `seq_lens`.
- `none`: one sample per row, no padding.
"""

from __future__ import annotations

import bisect
import random
from typing import Sequence

import numpy as np

Piece = tuple[int, int, int]
"""`(sample_index, start, stop)`: tokens `[start, stop)` of one sample, placed in a row."""


def pack(lengths: Sequence[int], max_length: int, mode: str, seed: int = 0) -> list[list[Piece]]:
    """Rows of pieces for packing `mode` (bfd, wrapped, none); see the module docstring."""
    if mode == "wrapped":
        return pack_wrapped(lengths, max_length)
    if mode == "bfd":
        rows = pack_bfd(lengths, max_length)
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        rows = [rows[i] for i in order]
    else:
        rows = [[i] for i in range(len(lengths))]
    return [[(i, 0, lengths[i]) for i in row] for row in rows]


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
