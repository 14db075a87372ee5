"""Decontamination: the word n-grams of benchmark items, and which texts share one.

    benchmark files --items--> words (case-folded, punctuation and white space dropped: `\\w+`)
                    --hashed (numpy)--> word hashes end to end --n-grams--> sorted 64-bit keys, a bitmap of them
    texts, as word hashes end to end (`tokenize.screen` makes them from tokens, without making the words)
                    --n-grams (numpy, at once)--> bitmap --> searchsorted --> confirmed word by word, as text

A word's hash is a polynomial over its characters (modulo 2^64), then mixed: `join_hashes` makes it from
the hashes of any pieces of the word (its characters, or the parts of it that tokens hold), so the words of a
tokenized sample are hashed from a table of its tokens' pieces, in numpy, without a string per word. A match
of keys is confirmed on the words themselves (the item's, kept as one string; the text's, from
`Benchmark.find`'s caller), so a hash collision can cost time, never a sample.

Memory is the benchmark's: its words (one string, and a hash each), one key per n-gram and an 8 MiB bitmap;
nothing of the training data is kept. An item's strings are read as one text (an n-gram may run from one field
into the next).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from ..errors import InputError
from . import expand_inputs, reader_for

if TYPE_CHECKING:
    from ..config import ReadConfig

_WORD = re.compile(r"\w+")
_BASE = np.uint64(0x100000001B3)  # the n-gram hash's multiplier (odd: wraps modulo 2^64 without losing bits)
_CHAR_BASE = np.uint64(0x9E3779B97F4A7C15)  # the word hash's multiplier, per character (odd)
_BITMAP_BITS = 23  # the bitmap's size: 2^23 flags (8 MiB); at 150k n-grams (10k items) 98% of a text's stop there
_powers = np.ones(1, np.uint64)  # _CHAR_BASE ** k modulo 2^64, grown as needed


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
    """A record's words: every string in it, case-folded (lower case, and one form of a letter where a language
    has several: 'ς' is 'σ', 'ß' is 'ss'), split on what is not a letter or digit."""
    return _WORD.findall("\n".join(texts(fields)).casefold())


def string_hashes(strings: list[str]) -> np.ndarray:
    """The polynomial hash of each string (unmixed: `join_hashes` of its characters); "" hashes to 0."""
    lengths = np.fromiter(map(len, strings), np.int64, len(strings))
    codes = np.frombuffer("".join(strings).encode("utf-32-le"), np.uint32).astype(np.uint64)
    out = np.zeros(len(strings), np.uint64)
    some = lengths > 0
    if some.any():
        out[some] = join_hashes(codes, np.ones(len(codes), np.int64), (np.cumsum(lengths) - lengths)[some])
    return out


def join_hashes(hashes: np.ndarray, lengths: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The hash of each string made by joining runs of pieces: pieces (their polynomial `hashes`, their
    `lengths` in characters) laid end to end, a run from each of `starts` (ascending, the first 0, none
    empty) to the next. H(ab) = H(a) * B^len(b) + H(b), modulo 2^64."""
    global _powers
    ends = np.cumsum(lengths)
    last = np.append(starts[1:], len(hashes)) - 1  # each run's last piece
    after = np.repeat(ends[last], np.diff(np.append(starts, len(hashes)))) - ends  # characters after each piece
    need = int(after.max(initial=0)) + 1
    if need > len(_powers):
        grown = np.full(max(need, 2 * len(_powers)), _CHAR_BASE, np.uint64)
        grown[0] = 1
        _powers = np.cumprod(grown)  # wraps modulo 2^64
    return np.add.reduceat(hashes * _powers[after], starts)


def mixed(h: np.ndarray) -> np.ndarray:
    """Word hashes from polynomial ones: every bit made to depend on every other (splitmix64's finalizer), so
    the n-gram key, another polynomial, is not a function of the characters' sums alone."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def word_hashes(ws: list[str]) -> np.ndarray:
    """Each word's hash (the same a tokenized text's words get from `tokenize.screen`)."""
    return mixed(string_hashes(ws))


class Benchmark:
    """The n-grams of benchmark files; `find` names the first one each text shares."""

    def __init__(self, patterns: tuple[str, ...], n: int, limits: ReadConfig | None = None) -> None:
        self.n = n
        self.where: list[str] = []  # each item's file:line
        self.short = 0  # items of fewer than n words: no n-gram to match
        every: list[str] = []
        lengths: list[int] = []
        for path in expand_inputs(patterns):
            for source, fields in _items(path, limits):
                ws = words(fields)
                if len(ws) < n:
                    self.short += 1
                    continue
                every += ws
                lengths.append(len(ws))
                self.where.append(source)
        if not self.where:
            raise InputError(f"--decontaminate {', '.join(patterns)}: no item has {n} words or more "
                             f"(decontaminate_ngram={n}); nothing could be matched")
        self.text = " ".join(every)  # the items' words, to confirm a match on
        self.word_at = np.cumsum([0] + [len(w) + 1 for w in every[:-1]])  # where each word starts in `text`
        self.flat = word_hashes(every)  # every item's word hashes end to end
        del every
        keys, at, self.first = _grams_of(self.flat, np.array(lengths, np.int64), n)
        order = np.argsort(keys, kind="stable")
        self.keys, self.at = keys[order], at[order]  # sorted keys; where each n-gram starts in `flat`
        self.owners = np.searchsorted(self.first, self.at, side="right") - 1  # the item of each key
        self.bitmap = np.zeros(1 << _BITMAP_BITS, bool)
        self.bitmap[self.keys >> np.uint64(64 - _BITMAP_BITS)] = True

    def find(self, flat: np.ndarray, lengths: np.ndarray, words_of: Callable[[int], list[str]]) -> dict[int, str]:
        """Text index -> why it is contaminated (the first n-gram it shares with an item, and the item), for the
        texts that share one: texts given as their word hashes end to end (`flat`, `word_hashes`) and how many
        words each has; `words_of(k)` gives text k's words, called only for a text whose keys match."""
        n = self.n
        keys, at, first = _grams_of(flat, lengths, n)
        maybe = np.flatnonzero(self.bitmap[keys >> np.uint64(64 - _BITMAP_BITS)])
        if not len(maybe):
            return {}
        where = np.minimum(np.searchsorted(self.keys, keys[maybe]), len(self.keys) - 1)
        same = self.keys[where] == keys[maybe]
        found: dict[int, str] = {}
        texts_seen: dict[int, list[str]] = {}
        for j, i in zip(maybe[same].tolist(), where[same].tolist()):
            start = int(at[j])
            k = int(np.searchsorted(first, start, side="right") - 1)
            while k not in found and i < len(self.keys) and self.keys[i] == keys[j]:
                a = int(self.at[i])
                if np.array_equal(self.flat[a:a + n], flat[start:start + n]):
                    gram = (texts_seen.get(k) or texts_seen.setdefault(k, words_of(k)))[start - int(first[k]):][:n]
                    if gram == self._item_words(a, n):  # word by word, as text: no collision drops a sample
                        found[k] = (f"shares the {n}-gram \"{' '.join(gram)}\" with the benchmark item "
                                    f"{self.where[int(self.owners[i])]} (--decontaminate)")
                i += 1
        return found

    def _item_words(self, a: int, n: int) -> list[str]:
        end = int(self.word_at[a + n]) - 1 if a + n < len(self.word_at) else len(self.text)
        return self.text[int(self.word_at[a]):end].split(" ")


def _grams_of(flat: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Texts' word hashes end to end (`lengths` words each): (the key of every n-gram inside one text, where
    each starts in `flat`, where each text starts)."""
    first = np.cumsum(lengths) - lengths
    keys = _grams(flat, n)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    at = np.flatnonzero(owner[:len(keys)] == owner[n - 1:]) if len(keys) else np.zeros(0, np.int64)
    return keys[at], at, first


def _grams(hashes: np.ndarray, n: int) -> np.ndarray:
    """The key of every n-gram of a word-hash sequence (a polynomial hash, modulo 2^64), by start: windows of
    1, 2, 4, ... words, each from two of the last, then n's from those its binary digits name (key(a + b) =
    key(a) * BASE^b + the key of the b words after)."""
    if len(hashes) < n:
        return np.zeros(0, np.uint64)
    size = len(hashes) - n + 1
    power, width = {1: hashes}, 1
    while 2 * width <= n:
        k = power[width]
        power[2 * width] = k[:-width] * np.uint64(pow(int(_BASE), width, 1 << 64)) + k[width:]
        width *= 2
    keys, done = None, 0
    for w in sorted(power, reverse=True):
        if n - done >= w:
            part = power[w][done:done + size]
            keys = part.copy() if keys is None else keys * np.uint64(pow(int(_BASE), w, 1 << 64)) + part
            done += w
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
