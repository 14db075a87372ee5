"""Decontamination of tokenized samples: a sample whose text shares a word n-gram with a benchmark item
(`read.contamination.Benchmark`) is dropped as `contaminated`.

    Encoded batch --each token's pieces of words (a table made once from the decoder)--> each sample's
                  word hashes, joined from the pieces in numpy --Benchmark.find--> contaminated samples
                  --> rejects; the rest go on

It runs on samples, not records, so it is the same for samples tokenized now and samples read back from the
sample cache (whose entries therefore do not depend on the benchmark), and it runs as batches arrive, beside
the tokenizer: numpy over the batch's tokens, no string per word. The text matched is the whole sample's,
template included (a benchmark n-gram never holds the template's markers, so only the records' own words
can match).

A token's text (as it reads inside a text, case-folded, every character that is not a letter or digit made a
space; a special token is a space) is cut at its spaces into pieces: a token without a space continues the
word being read; one with spaces ends it (with its first piece), holds whole words, and begins the next (its
last piece). Tokens that each hold a part of a character (byte fallbacks, byte-level tokens cut inside a
character) are read as one: the run of them, decoded together. So a sample's words are those of its decoded
text, as `contamination.words` finds them in a benchmark item.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..read.contamination import Benchmark, join_hashes, mixed, string_hashes
from .encode import Encoded


_NOT_WORD = re.compile(r"\W")  # what `\w+` does not take into a word: a space in a piece
_NOT_WORD_BUT_NUL = re.compile(r"[^\w\0]")


class Screen:
    """Drops contaminated samples from encoded batches (`__call__`)."""

    def __init__(self, benchmark: Benchmark, backend) -> None:
        self.benchmark, self.backend = benchmark, backend
        self.anchor = backend.token_to_id("a")
        self.anchor = 0 if self.anchor is None else self.anchor
        self.lead = backend.decode([self.anchor], skip_special_tokens=False)
        self.texts, self.partial, self.special, self.nul = _texts(backend, self.anchor, self.lead)
        self.pieces = _Pieces.of(self.texts.tolist())

    def __call__(self, enc: Encoded) -> Encoded:
        if not len(enc.lengths):
            return enc
        flat, lengths = self.word_hashes(enc.ids, enc.lengths)
        ends = np.cumsum(enc.lengths)
        hits = self.benchmark.find(flat, lengths, lambda k: self.words(enc.ids[ends[k] - enc.lengths[k]:ends[k]]))
        if not hits:
            return enc
        keep = np.ones(len(enc.lengths), bool)
        keep[list(hits)] = False
        tokens = np.repeat(keep, enc.lengths)
        rejects = enc.rejects + [{"sample_id": enc.sample_ids[k], "source": enc.sources[k], "reason": "contaminated",
                                  "message": hits[k]} for k in sorted(hits)]
        rejects.sort(key=lambda r: r["sample_id"])
        return Encoded(enc.ids[tokens], enc.labels[tokens], enc.lengths[keep], enc.num_trained[keep],
                       [s for s, k in zip(enc.sample_ids, keep) if k], [s for s, k in zip(enc.sources, keep) if k],
                       [t for t, k in zip(enc.truncated, keep) if k], rejects)

    def word_hashes(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The words of samples (their tokens end to end, `lengths` tokens each) as hashes end to end
        (`contamination.word_hashes` of each word), and how many words each sample has."""
        pieces = self.pieces
        if self.partial[ids].any():
            ids, lengths, runs = self._joined(ids, lengths)
            pieces = pieces.plus(_Pieces.of_runs(runs))
        count = pieces.count[ids]
        total = np.cumsum(count)
        at = np.repeat(pieces.start[ids] - (total - count), count) + np.arange(int(total[-1]))  # each piece's entry
        ends = pieces.ends[at]
        bounds = total[np.cumsum(lengths) - 1]  # where each sample's pieces end
        ends[bounds - 1] = True  # a sample's end ends its last word
        last = np.flatnonzero(ends)
        starts = np.append(0, last[:-1] + 1)  # a run of pieces up to one that ends a word
        length = pieces.length[at]
        word = np.add.reduceat(length, starts) > 0  # a run of empty pieces (between two spaces) is no word
        hashes = mixed(join_hashes(pieces.hash[at], length, starts)[word])
        sample = np.searchsorted(bounds, last[word], side="right")  # each word's sample
        return hashes, np.bincount(sample, minlength=len(lengths))

    def words(self, ids: np.ndarray) -> list[str]:
        """A sample's words, as text (those `word_hashes` hashes)."""
        joined: list[str] = []
        if self.partial[ids].any():
            ids, _, runs = self._joined(ids, np.array([len(ids)]))
            joined = runs.split("\0")[1:]
        size = len(self.texts)
        return "".join(joined[i - size] if i >= size else self.texts[i] for i in ids.tolist()).split()

    def _joined(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
        """Each run of tokens that hold parts of characters made one token (numbered after the vocabulary),
        within a sample: the ids, the samples' lengths in tokens after, and the runs' texts (as `_texts`),
        each after a "\\0"."""
        pos = np.flatnonzero(self.partial[ids])
        sample = np.searchsorted(np.cumsum(lengths), pos, side="right")
        first = np.ones(len(pos), bool)
        first[1:] = (np.diff(pos) != 1) | (np.diff(sample) != 0)
        keep = np.ones(len(ids), bool)
        keep[pos[~first]] = False
        out = ids.astype(np.int64)
        out[pos[first]] = len(self.texts) + np.arange(int(first.sum()))
        return out[keep], lengths - np.bincount(sample[~first], minlength=len(lengths)), self._decoded(ids[pos], first)

    def _decoded(self, ids: np.ndarray, first: np.ndarray) -> str:
        """The texts (as `_texts`) of runs of tokens laid end to end, each beginning where `first` is set, each
        after a "\\0": in one decode, the runs parted by a token that reads "\\0" where the vocabulary has
        one (and no run reads one)."""
        starts = np.flatnonzero(first)
        if self.nul is not None:
            shift = np.cumsum(first)
            seq = np.full(len(ids) + len(starts), self.nul, np.int64)
            seq[np.arange(len(ids)) + shift] = ids
            text = self.backend.decode([self.anchor, *seq.tolist()], skip_special_tokens=False)
            text = _NOT_WORD_BUT_NUL.sub(" ", _after(text, self.lead).casefold())
            if text.count("\0") == len(starts) and text.startswith("\0"):
                return text
        decoded = self.backend.decode_batch([[self.anchor, *r.tolist()] for r in np.split(ids, starts[1:])],
                                            skip_special_tokens=False)
        return "".join("\0" + _NOT_WORD.sub(" ", _after(t, self.lead).casefold()) for t in decoded)


@dataclass
class _Pieces:
    """Tokens' texts cut at their spaces: token i's pieces are entries start[i] .. start[i] + count[i] - 1,
    each with its polynomial hash and length; a piece ends a word unless it is its token's last."""

    count: np.ndarray
    start: np.ndarray
    hash: np.ndarray
    length: np.ndarray
    ends: np.ndarray

    @classmethod
    def of(cls, texts: list[str]) -> _Pieces:
        parts = [t.split(" ") for t in texts]
        # [the whole text] without a space, else [first, inner words..., last]
        pieces = [p if len(p) == 1 else [p[0], *filter(None, p[1:-1]), p[-1]] for p in parts]
        count = np.fromiter(map(len, pieces), np.int64, len(pieces))
        start = np.cumsum(count) - count
        flat = [x for p in pieces for x in p]
        ends = np.ones(len(flat), bool)
        ends[start + count - 1] = False
        return cls(count, start, string_hashes(flat), np.fromiter(map(len, flat), np.int64, len(flat)), ends)

    @classmethod
    def of_runs(cls, runs: str) -> _Pieces:
        """Texts given as one string, each after a "\\0", as tokens of one piece per character: a space is an
        empty piece that ends a word, the "\\0" an empty one that does not (so no text is without a piece)."""
        codes = np.frombuffer(runs.encode("utf-32-le"), np.uint32).astype(np.uint64)
        space, nul = codes == ord(" "), codes == 0
        starts = np.flatnonzero(nul)
        return cls(np.diff(np.append(starts, len(codes))), starts, np.where(space, 0, codes),
                   (~(space | nul)).astype(np.int64), space)

    def plus(self, more: _Pieces) -> _Pieces:
        """These tokens, then `more`'s."""
        return _Pieces(np.concatenate([self.count, more.count]),
                       np.concatenate([self.start, more.start + len(self.hash)]),
                       np.concatenate([self.hash, more.hash]), np.concatenate([self.length, more.length]),
                       np.concatenate([self.ends, more.ends]))


def _texts(backend, anchor: int, lead: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
    """Each token id's text as it reads inside a text (decoded after `anchor`, whose text `lead` is then cut,
    so a word's leading space is kept), case-folded (as `contamination.words`), with every character that is
    not a letter or digit made a space; special tokens read as a space. And which tokens hold a part of a
    character (a byte fallback, or a byte-level token cut inside one), which are special, and a token that
    reads "\\0" (or None)."""
    size = backend.get_vocab_size(with_added_tokens=True)
    special = np.zeros(size, bool)
    special[[i for i, t in backend.get_added_tokens_decoder().items() if t.special and i < size]] = True
    decoded = backend.decode_batch([[anchor, i] for i in range(size)], skip_special_tokens=False)
    out, partial, nul = np.empty(size, object), np.zeros(size, bool), None
    for i, t in enumerate(decoded):
        if special[i]:
            out[i] = " "
            continue
        t = _after(t, lead)
        partial[i] = "\ufffd" in t
        if t == "\0" and nul is None:
            nul = i
        out[i] = _NOT_WORD.sub(" ", t.casefold())
    return out, partial, special, nul


def _after(text: str, lead: str) -> str:
    return text[len(lead):] if text.startswith(lead) else text
