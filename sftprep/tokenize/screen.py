"""Decontamination of tokenized samples: a sample whose text shares a word n-gram with a benchmark item
(`read.contamination.Benchmark`) is dropped as `contaminated`.

    Encoded batch --each token's text (a table made once from the decoder), joined--> each sample's text
                  --split, Benchmark.find_words--> contaminated samples --> rejects; the rest go on

It runs on samples, not records, so it is the same for samples tokenized now and samples read back from the
sample cache (whose entries therefore do not depend on the benchmark), and it runs as batches arrive, beside
the tokenizer. The text matched is the whole sample's, template included (a benchmark n-gram never holds the
template's markers, so only the records' own words can match).
"""

from __future__ import annotations

import re

import numpy as np

from ..read.contamination import Benchmark
from .encode import Encoded


_NOT_WORD = re.compile(r"\W")  # what `\w+` does not take into a word: a space in a piece


class Screen:
    """Drops contaminated samples from encoded batches (`__call__`)."""

    def __init__(self, benchmark: Benchmark, backend) -> None:
        self.benchmark = benchmark
        self.pieces = _pieces(backend)

    def __call__(self, enc: Encoded) -> Encoded:
        if not len(enc.lengths):
            return enc
        ends = np.cumsum(enc.lengths).tolist()
        pieces = self.pieces[enc.ids].tolist()
        hits = self.benchmark.find_words(["".join(pieces[a:b]).split() for a, b in zip([0, *ends[:-1]], ends)])
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


def _pieces(backend) -> np.ndarray:
    """Each token id's text as it reads inside a text (decoded after another token, so a word's leading space
    is kept), lower-cased, with every character that is not a letter or digit made a space (the words
    `contamination.words` finds); special tokens read as a space. A sample's words are its pieces joined and
    split: no decode and no regex per sample (a token that is part of a character reads as a space)."""
    size = backend.get_vocab_size(with_added_tokens=True)
    special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    tokens = [backend.id_to_token(i) or "" for i in range(size)]
    decoder = backend.decoder
    anchor = backend.id_to_token(backend.token_to_id("a")) if backend.token_to_id("a") is not None else "a"
    lead = decoder.decode([anchor]) if decoder is not None else anchor
    out = np.empty(size, object)
    for i, t in enumerate(tokens):
        if i in special:
            out[i] = " "
        elif decoder is None:
            out[i] = t.lower()
        else:
            text = decoder.decode([anchor, t])
            out[i] = (text[len(lead):] if text.startswith(lead) else text).lower()
        out[i] = _NOT_WORD.sub(" ", out[i])
    return out
