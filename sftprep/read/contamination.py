"""Decontamination: drop training records that share a word n-gram with a benchmark item.

    benchmark files --items--> words (lower-cased, punctuation and white space dropped: `\\w+`)
                    --n-grams--> sorted 64-bit keys (+ which item each came from)
    a record's text (every string in it) --words--> ids in the benchmark's vocabulary (0: a word no item has)
                    --n-grams of known words--> keys --searchsorted--> the first shared n-gram, checked word by word

Memory is the benchmark's: its vocabulary, its items' word ids and one key per n-gram; nothing of the
training data is kept. A record's words are looked up once each; its n-gram keys are a polynomial hash over
word ids computed with numpy, so a record costs a dict lookup per word.
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


class Benchmark:
    """The n-grams of benchmark files; `find(fields)` names the first one a record shares."""

    def __init__(self, patterns: tuple[str, ...], n: int, limits: ReadConfig | None = None) -> None:
        self.n = n
        self.vocab: dict[str, int] = {}
        self.items: list[np.ndarray] = []  # each item's word ids (0 between two of its strings)
        self.where: list[str] = []  # each item's file:line
        self.short = 0  # items of fewer than n words: no n-gram to match
        keys, owners = [], []
        for path in expand_inputs(patterns):
            for source, fields in _items(path, limits):
                ids = self._ids(fields, grow=True)
                grams = _grams(ids, n)
                if not len(grams[0]):
                    self.short += 1
                    continue
                keys.append(grams[0])
                owners.append(np.full(len(grams[0]), len(self.items), np.int64))
                self.items.append(ids)
                self.where.append(source)
        if not self.items:
            raise InputError(f"--decontaminate {', '.join(patterns)}: no item has {n} words or more "
                             f"(decontaminate_ngram={n}); nothing could be matched")
        self.words = ["", *sorted(self.vocab, key=self.vocab.__getitem__)]  # id -> word
        keys_all, owners_all = np.concatenate(keys), np.concatenate(owners)
        order = np.argsort(keys_all, kind="stable")
        self.keys, self.owners = keys_all[order], owners_all[order]

    def _ids(self, fields: Any, grow: bool = False) -> np.ndarray:
        """The word ids of every string in `fields`, a 0 between strings (an n-gram never spans two)."""
        vocab, out = self.vocab, []
        for text in texts(fields):
            words = _WORD.findall(text.lower())
            if grow:
                out += [vocab.setdefault(w, len(vocab) + 1) for w in words]
            else:
                out += [vocab.get(w, 0) for w in words]
            out.append(0)
        return np.asarray(out, np.uint64)

    def find(self, fields: Any) -> str | None:
        """Why a record is contaminated (the shared n-gram and the benchmark item), or None."""
        ids = self._ids(fields)
        keys, starts = _grams(ids, self.n)
        if not len(keys):
            return None
        at = np.searchsorted(self.keys, keys)
        hit = np.flatnonzero((at < len(self.keys)) & (self.keys[np.minimum(at, len(self.keys) - 1)] == keys))
        for j in hit.tolist():  # confirmed word by word: a hash collision is never a reject
            gram = ids[starts[j]:starts[j] + self.n]
            k = int(at[j])
            while k < len(self.keys) and self.keys[k] == keys[j]:
                item = self.items[int(self.owners[k])]
                item_keys, item_starts = _grams(item, self.n)
                for s in item_starts[item_keys == keys[j]].tolist():
                    if np.array_equal(item[s:s + self.n], gram):
                        shown = " ".join(self.words[int(v)] for v in gram)
                        return (f"shares the {self.n}-gram \"{shown}\" with the benchmark item "
                                f"{self.where[int(self.owners[k])]} (--decontaminate)")
                k += 1
        return None


def _grams(ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys of the n-grams of `ids` made of known words (no 0 in them), and where each starts."""
    if len(ids) < n:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(ids, n)
    zeros = np.concatenate([[0], np.cumsum(ids == 0)])
    starts = np.flatnonzero(zeros[n:] - zeros[:-n] == 0)
    if not len(starts):
        return np.zeros(0, np.uint64), starts
    powers = _BASE ** np.arange(n - 1, -1, -1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        keys = (windows[starts] * powers).sum(axis=1, dtype=np.uint64)
    return keys, starts


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
