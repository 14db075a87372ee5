"""A record far beyond max_length is cut to a window of text before tokenizing, and the sample is
exactly what tokenize-then-truncate gives (ids, labels, lengths, trained counts, truncated flag)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sftprep.tokenize.window
from sftprep.config import config_from_dict
from sftprep.tokenize.encode import Encoder
from sftprep.scale.pipeline import encoder_for
from sftprep.read import Record
from sftprep.tokenizer import load_fast
from tests.conftest import CHATML_TOK, MISTRAL

TOKS = {"mistral": load_fast(MISTRAL), "chatml": load_fast(CHATML_TOK)}  # BOS added / BOS written by chatml?

# runs of one character (BPE regroups them by parity from where they start), spaces, special tokens
# written in the text, CJK, emoji, combining marks
PIECES = st.sampled_from(["a", "b", "ab", " ", "  ", "    ", "=", "==", "\n", "\t", ".", "the", " cat", "你", "好",
                          "👍🏽", "e\u0301", "ß", "<s>", "</s>", "<|im_end|>", "1", "23", "é",
                          "=" * 37, "a" * 23, " " * 19, "ab" * 11])
LONG = st.lists(PIECES, min_size=60, max_size=600).map("".join)

# (CHARS_PER_TOKEN, MARGIN, SAVING): tiny windows make wrong cuts likely, so the check must catch them
AGGRESSIVE = st.sampled_from([(1, 1, 2), (1, 4, 2), (2, 8, 2), (1, 0, 2)])


def _encoders(tok: str, template: str | None, keep: str, max_length: int) -> tuple[Encoder, Encoder]:
    cfg = {"inputs": ["x.jsonl"], "tokenizer": MISTRAL if tok == "mistral" else CHATML_TOK, "out": "unused",
           "max_length": max_length, "truncation": keep, "packing": "none"}
    if template:
        cfg["template"] = template
    windowed = encoder_for(config_from_dict(cfg), TOKS[tok])
    full = encoder_for(config_from_dict(cfg), TOKS[tok])
    full.window = None  # tokenize the whole text, then truncate: the reference
    return windowed, full


def _same(a, b) -> None:
    assert a.ids.tolist() == b.ids.tolist()
    assert a.labels.tolist() == b.labels.tolist()
    assert a.lengths.tolist() == b.lengths.tolist()
    assert a.num_trained.tolist() == b.num_trained.tolist()
    assert a.truncated == b.truncated
    assert [r["reason"] for r in a.rejects] == [r["reason"] for r in b.rejects]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=LONG, completion=LONG, tok=st.sampled_from(["mistral", "chatml"]),
       template=st.sampled_from([None, "chatml", "alpaca"]), keep=st.sampled_from(["keep_start", "keep_end"]),
       max_length=st.integers(40, 72), knobs=AGGRESSIVE)
def test_window_equals_tokenize_then_truncate(prompt, completion, tok, template, keep, max_length, knobs):
    if not completion.strip():
        completion = "x" + completion
    windowed, full = _encoders(tok, template, keep, max_length)
    batch = [(0, Record({"prompt": prompt, "completion": completion}, "mem:1")),
             (1, Record({"text": prompt + completion}, "mem:2"))] if template is None else \
        [(0, Record({"prompt": prompt, "completion": completion}, "mem:1"))]
    saved = sftprep.tokenize.window.CHARS_PER_TOKEN, sftprep.tokenize.window.MARGIN, sftprep.tokenize.window.SAVING
    sftprep.tokenize.window.CHARS_PER_TOKEN, sftprep.tokenize.window.MARGIN, sftprep.tokenize.window.SAVING = knobs
    try:
        got = windowed(batch)
    finally:
        sftprep.tokenize.window.CHARS_PER_TOKEN, sftprep.tokenize.window.MARGIN, sftprep.tokenize.window.SAVING = saved
    _same(got, full(batch))


class Counting:
    """A tokenizer backend that counts the characters it is asked to tokenize."""

    def __init__(self, backend) -> None:
        self.backend, self.chars = backend, 0

    def encode(self, text, **kw):
        self.chars += len(text)
        return self.backend.encode(text, **kw)

    def encode_batch(self, texts, **kw):
        self.chars += sum(map(len, texts))
        return self.backend.encode_batch(texts, **kw)

    def encode_batch_fast(self, texts, **kw):
        self.chars += sum(map(len, texts))
        return self.backend.encode_batch_fast(texts, **kw)


@pytest.mark.parametrize("keep", ["keep_start", "keep_end"])
@pytest.mark.parametrize("tok, template", [("mistral", "alpaca"), ("chatml", "chatml")])
def test_huge_record_tokenizes_a_bounded_window(keep, tok, template):
    """A 1 MB answer with max_length 64: well under 1% of it reaches the tokenizer, same sample."""
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "==", "你好", "naïve", "\n", "42"]
    answer = " ".join(rng.choice(words, 200_000))
    batch = [(0, Record({"prompt": "Summarize.", "completion": answer}, "big.jsonl:1"))]
    windowed, full = _encoders(tok, template, keep, 64)
    counting = windowed.backend = Counting(windowed.backend)
    got = windowed(batch)
    assert counting.chars < len(answer) / 100
    assert got.truncated == [True] and got.lengths.tolist() == [64]
    _same(got, full(batch))
