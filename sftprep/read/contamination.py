"""Decontamination: the word n-grams of benchmark items, and which texts share one.

    benchmark files --items--> words (lower-cased, punctuation and white space dropped: `\\w+`)
                    --n-grams--> sorted 64-bit keys (+ the item and word each starts at), a bitmap of them
    a batch of texts, as word lists (`tokenize.screen`: samples) --> 64-bit word hashes, end to end
                    --n-grams (numpy, at once)--> bitmap --> searchsorted --> confirmed word by word

Memory is the benchmark's: its items' word hashes, one key per n-gram and an 8 MiB bitmap; nothing of the training
data is kept. A text costs a hash per word in Python; its n-grams are hashed and looked up with numpy over the
whole batch. Words are hashed with Python's `hash` (the same in the process that builds the index and the one
that checks a text: each worker builds its own). An item's strings are read as one text (an n-gram may run
from one field into the next).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ..errors import InputError
from . import expand_inputs, reader_for

if TYPE_CHECKING:
    from ..config import ReadConfig

_WORD = re.compile(r"\w+")
_BASE = np.uint64(0x100000001B3)  # the n-gram hash's multiplier (odd: wraps modulo 2^64 without losing bits)
_BITMAP_BITS = 23  # the bitmap's size: 2^23 flags (8 MiB); at 150k n-grams (10k items) 98% of a text's stop there


def texts(value: Any) -> Iterator[str]:
    """Every string in a record's fields (nested lists and mappings included; keys are not text)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from texts(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from texts(v)


def words(fields: Any) -> list[str]:
    """A record's words: every string in it, lower-cased, split on what is not a letter or digit."""
    return _WORD.findall("\n".join(texts(fields)).lower())


def _hashes(ws: list[str]) -> np.ndarray:
    return np.fromiter(map(hash, ws), np.int64, len(ws)).view(np.uint64)


class Benchmark:
    """The n-grams of benchmark files; `find_words(texts)` names the first one each text shares."""

    def __init__(self, patterns: tuple[str, ...], n: int, limits: ReadConfig | None = None) -> None:
        self.n = n
        self.where: list[str] = []  # each item's file:line
        self.short = 0  # items of fewer than n words: no n-gram to match
        lists = []
        for path in expand_inputs(patterns):
            for source, fields in _items(path, limits):
                ws = words(fields)
                if len(ws) < n:
                    self.short += 1
                    continue
                lists.append(ws)
                self.where.append(source)
        if not self.where:
            raise InputError(f"--decontaminate {', '.join(patterns)}: no item has {n} words or more "
                             f"(decontaminate_ngram={n}); nothing could be matched")
        self.flat, keys, at, self.first = _stream(lists, n)  # every item's word hashes end to end
        order = np.argsort(keys, kind="stable")
        self.keys, self.at = keys[order], at[order]  # sorted keys; where each n-gram starts in `flat`
        self.owners = np.searchsorted(self.first, self.at, side="right") - 1  # the item of each key
        self.bitmap = np.zeros(1 << _BITMAP_BITS, bool)
        self.bitmap[self.keys >> np.uint64(64 - _BITMAP_BITS)] = True

    def find_words(self, lists: list[list[str]]) -> dict[int, str]:
        """Text index -> why it is contaminated (the first n-gram it shares with an item, and the item), for
        the texts, given as normalized words (`words`: lower-cased runs of letters and digits), that share one."""
        n = self.n
        flat, keys, at, first = _stream(lists, n)
        maybe = np.flatnonzero(self.bitmap[keys >> np.uint64(64 - _BITMAP_BITS)])
        where = np.minimum(np.searchsorted(self.keys, keys[maybe]), len(self.keys) - 1)
        same = self.keys[where] == keys[maybe]
        found: dict[int, str] = {}
        for j, i in zip(maybe[same].tolist(), where[same].tolist()):
            start = int(at[j])
            k = int(np.searchsorted(first, start, side="right") - 1)
            while k not in found and i < len(self.keys) and self.keys[i] == keys[j]:  # word by word: no collision
                if np.array_equal(self.flat[self.at[i]:self.at[i] + n], flat[start:start + n]):
                    gram = " ".join(lists[k][start - int(first[k]):][:n])
                    found[k] = (f"shares the {n}-gram \"{gram}\" with the benchmark item "
                                f"{self.where[int(self.owners[i])]} (--decontaminate)")
                i += 1
        return found


def _stream(lists: list[list[str]], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Word lists hashed end to end: (the hashes, the key of every n-gram inside one list, where each
    starts, where each list starts)."""
    lengths = np.fromiter(map(len, lists), np.int64, len(lists))
    first = np.cumsum(lengths) - lengths
    flat = _hashes([w for ws in lists for w in ws])
    keys = _grams(flat, n)
    owner = np.repeat(np.arange(len(lists)), lengths)
    at = np.flatnonzero(owner[:len(keys)] == owner[n - 1:]) if len(keys) else np.zeros(0, np.int64)
    return flat, keys[at], at, first


def _grams(hashes: np.ndarray, n: int) -> np.ndarray:
    """The key of every n-gram of a word-hash sequence (a polynomial hash, modulo 2^64), by start."""
    if len(hashes) < n:
        return np.zeros(0, np.uint64)
    with np.errstate(over="ignore"):
        keys = hashes[:len(hashes) - n + 1].copy()
        for k in range(1, n):  # Horner's rule over the window, vectorized over every start
            keys *= _BASE
            keys += hashes[k:len(hashes) - n + 1 + k]
    return keys


def _items(path: Path, limits: ReadConfig | None) -> Iterator[tuple[str, Any]]:
    """(file:line, fields) of every item of a benchmark file: a record of any format the build reads, or a
    line of a plain `.txt` file."""
    if path.suffix.lower() == ".txt":
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}:{n}", line
        return
    for record in reader_for(path, limits)(path):
        if record.fields is None:
            raise InputError(f"--decontaminate {record.source}: {record.error}")
        yield record.source, record.fields
