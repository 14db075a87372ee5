"""Property-based tests (hypothesis) of the core invariants: packing and labels."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftprep.config import config_from_dict
from sftprep.scale.pipeline import encoder_for
from sftprep.tokenize.labels import IGNORE_INDEX, labels_from_spans, mask_sample_starts, token_ranges
from sftprep.pack.packing import pack_bfd, pack_wrapped
from sftprep.read import Record
from sftprep.tokenizer import load_tokenizer
from tests.conftest import CHATML_TOK

TOK = load_tokenizer(CHATML_TOK)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that stresses tokenizers: CJK, emoji (with ZWJ and skin tones), combining marks, \r\n, tabs.
ALPHABET = st.sampled_from(list("abc xyz.,!?") + ["\r\n", "\n", "\t", "  ", "你", "好", "世界", "👍🏽",
                                                  "👨\u200d👩\u200d👧", "e\u0301", "ñ", "ß", "🙂", "١٢", "ÿ"])
TEXT = st.lists(ALPHABET, min_size=1, max_size=30).map("".join)


@SETTINGS
@given(st.lists(st.integers(1, 64), max_size=200), st.integers(64, 256))
def test_bfd_never_loses_duplicates_or_overflows(lengths, max_length):
    bins = pack_bfd(lengths, max_length)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= max_length for b in bins)
    # best fit: no two rows could have been merged into one
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > max_length


@SETTINGS
@given(st.lists(st.integers(0, 300), max_size=50), st.integers(1, 128))
def test_wrapped_keeps_every_token_once_in_order(lengths, max_length):
    rows = pack_wrapped(lengths, max_length)
    pieces = [p for r in rows for p in r]
    assert all(sum(b - a for _, a, b in r) == max_length for r in rows[:-1])
    for i, n in enumerate(lengths):
        mine = [(a, b) for j, a, b in pieces if j == i]
        assert sum(b - a for a, b in mine) == n
        assert all(mine[k][1] == mine[k + 1][0] for k in range(len(mine) - 1))


@SETTINGS
@given(st.lists(st.tuples(TEXT, st.booleans()), min_size=1, max_size=6))
def test_fast_labels_equal_the_reference_rule(segments):
    """token_ranges (boundary look-ups) and labels_from_spans (every offset) agree everywhere."""
    text = "".join(t for t, _ in segments)
    spans, pos = [], 0
    for t, trained in segments:
        if trained:
            spans.append((pos, pos + len(t)))
        pos += len(t)
    enc = TOK.backend_tokenizer.encode(text, add_special_tokens=False)
    ref = labels_from_spans(enc.ids, enc.offsets, text, spans)
    fast = np.full(len(enc.ids), IGNORE_INDEX, dtype=np.int32)
    for i, j in token_ranges(enc, text, spans, len(enc.ids)):
        fast[i:j] = np.asarray(enc.ids[i:j])
    mask_sample_starts(fast, [len(fast)])
    assert fast.tolist() == ref.tolist()
    assert all(lab == IGNORE_INDEX or lab == i for lab, i in zip(ref.tolist(), enc.ids))


ENCODER = encoder_for(config_from_dict({"inputs": ["x.jsonl"], "tokenizer": CHATML_TOK, "out": "unused",
                                        "template": "chatml", "max_length": 4096}), TOK)


@SETTINGS
@given(TEXT, TEXT.filter(lambda s: s.strip() and not s[0].isspace()))
def test_trained_span_decodes_back_to_the_completion(prompt, completion):
    rec = Record({"prompt": prompt, "completion": completion}, "mem:1")
    out = ENCODER([(0, rec)])
    assert not out.rejects, out.rejects
    ids, labels = out.sample(0)
    trained = [int(x) for x in labels if x != IGNORE_INDEX]
    assert TOK.decode(trained) == completion + "<|im_end|>"
    # and nothing in the prompt is trained: every trained position is after the assistant header
    first = int(np.argmax(labels != IGNORE_INDEX))
    header_end = TOK.decode(ids[:first].tolist())
    assert header_end.endswith("<|im_start|>assistant\n")
