"""Trained token ranges from token byte lengths (`sftprep.tokenize.boundaries`) equal the offsets rule.

Byte-level tokenizers are labelled from ids alone (`encode_batch_fast`); every sample must get
exactly the labels that `labels_from_spans` gives from a full offsets encoding, and a sample the
byte lengths cannot vouch for must be handed back (`redo`), never guessed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from sftprep.tokenize.boundaries import ByteBoundaries
from sftprep.config import config_from_dict
from sftprep.tokenize.labels import labels_from_spans, token_ranges
from sftprep.scale.pipeline import encoder_for
from sftprep.read import Record
from sftprep.tokenizer import load_fast
from tests.conftest import FIXTURES, MISTRAL

DEEPSEEK = FIXTURES / "tokenizers" / "deepseek-v4"
BACKEND = Tokenizer.from_file(str(DEEPSEEK / "tokenizer.json"))
BYTES = ByteBoundaries.of(BACKEND)
# byte-level BPE, and SentencePiece-style BPE (Metaspace, byte fallback) without and with added tokens
BACKENDS = {name: Tokenizer.from_file(str(FIXTURES / "tokenizers" / name / "tokenizer.json"))
            for name in ("deepseek-v4", "mistral", "mistral-chatml")}
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

EOS = "<｜end▁of▁sentence｜>"
# whitespace runs that merge across a span boundary, CJK, emoji split across tokens, digits, specials
PIECE = st.sampled_from(["Hello", " world", "\n", "\n\n", "  ", "\t", " ", "你好", "世界", "👍🏽", "🙂", "123", "4567",
                         "e\u0301", "ñ", ".", "!?", "<think>", EOS, "<｜User｜>", "<｜Assistant｜>", "ab c", "\r\n",
                         "<|im_start|>", "<|im_end|>", "</s>", "▁", "▁x", "鑫", "1", "𝔘"])
TEXT = st.lists(PIECE, min_size=1, max_size=12).map("".join)


def _reference(backend: Tokenizer, text: str, spans: list[tuple[int, int]]) -> list[bool]:
    """Trained tokens by the offsets rule, first token included (with a BOS in front it is trained);
    `test_properties.py` checks `token_ranges` against `labels_from_spans`."""
    enc = backend.encode(text, add_special_tokens=False)
    trained = np.zeros(len(enc.ids), dtype=bool)
    for a, b in token_ranges(enc, text, spans, len(enc.ids)):
        trained[a:b] = True
    return trained.tolist()


def _labels(ids: np.ndarray, k: np.ndarray, i: np.ndarray, j: np.ndarray, sample: int, start: int, n: int) -> list[bool]:
    trained = np.zeros(n, dtype=bool)
    for a, b in zip(i[k == sample], j[k == sample]):
        trained[a:b] = True
    return trained.tolist()


def _segments_to_spans(segments: list[tuple[str, bool]]) -> tuple[str, list[tuple[int, int]]]:
    spans, pos = [], 0
    for t, trained in segments:
        if trained and t:
            spans.append((pos, pos + len(t)))
        pos += len(t)
    return "".join(t for t, _ in segments), spans


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKENDS)
@SETTINGS
@given(batch=st.lists(st.lists(st.tuples(TEXT, st.booleans()), min_size=1, max_size=5), min_size=1, max_size=4))
def test_byte_lengths_give_the_offsets_rule_or_hand_the_sample_back(name, batch):
    backend = BACKENDS[name]
    bounds = ByteBoundaries.of(backend)
    texts, spans = zip(*(_segments_to_spans(s) for s in batch))
    encs = backend.encode_batch_fast(list(texts), add_special_tokens=False)
    n_tok = [len(e) for e in encs]
    ids = np.asarray([t for e in encs for t in e.ids], dtype=np.int32)
    k, i, j, redo = bounds.ranges(ids, n_tok, texts, spans)
    start = 0
    for s, (text, sp) in enumerate(zip(texts, spans)):
        if s not in redo and sp:
            assert _labels(ids, k, i, j, s, start, n_tok[s]) == _reference(backend, text, sp), (text, sp)
        start += n_tok[s]


@pytest.mark.parametrize("name", BACKENDS)
def test_most_samples_are_labelled_from_byte_lengths(name):
    """The byte path is the rule, offsets the exception: ordinary chat text needs no offsets."""
    backend = BACKENDS[name]
    texts = ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n",
             "Summarize: the cat sat on the mat.\nThe cat sat.", "把这句话翻译成英文：你好，世界！\nHello, world!",
             " A leading space, then 👍🏽 and tabs\tand digits 12345."]
    starts = ["It is", "The cat", "Hello", " then"]  # spans that start where a word does
    spans = [[(t.index(w), len(t))] for t, w in zip(texts, starts)]
    encs = backend.encode_batch_fast(texts, add_special_tokens=False)
    ids = np.asarray([t for e in encs for t in e.ids], dtype=np.int32)
    *_, redo = ByteBoundaries.of(backend).ranges(ids, [len(e) for e in encs], texts, spans)
    assert redo == []


@pytest.mark.parametrize("text, spans", [
    ("Question:\n\n\nAnswer", [(10, 18)]),  # ":\n\n\n" is one token; the span starts after its first newline
    ("[INST] Hi [/INST] It is 4.</s>", [(18, 30)]),  # " It": the template's space, then the trained text
    ("a\n\n\n\nb", [(2, 4)]),  # a token all of white space, cut by both boundaries
    ("x 你好 y", [(2, 6)]),  # non-ASCII after the space
])
def test_a_token_straddling_a_span_boundary_is_read_from_the_text(text, spans):
    """A token merged across a span boundary gets the offsets rule from the characters around the boundary,
    without an offsets encoding (the sample is not handed back)."""
    other, other_spans = "Hi there", [(2, 8)]
    encs = BACKEND.encode_batch_fast([other, text], add_special_tokens=False)
    ids = np.asarray([t for e in encs for t in e.ids], dtype=np.int32)
    k, i, j, redo = BYTES.ranges(ids, [len(e) for e in encs], [other, text], [other_spans, spans])
    assert redo == []
    assert _labels(ids, k, i, j, 0, 0, len(encs[0])) == _reference(BACKEND, other, other_spans)
    assert _labels(ids, k, i, j, 1, 0, len(encs[1])) == _reference(BACKEND, text, spans)


def test_a_token_beginning_inside_a_character_at_a_boundary_sends_its_sample_to_offsets():
    from sftprep.tokenize.boundaries import _straddled

    text = "é x"  # a token holding the second byte of é and the space: its bytes are no whole characters
    assert _straddled(text, 2, 2, 1) is None
    assert _straddled("a\n\nb", 2, 1, 1) == 1 and _straddled("a \nb", 2, 1, 2) == 0


def test_the_encoder_labels_byte_level_and_offsets_samples_alike():
    """A batch mixing samples labelled from byte lengths and from offsets (a boundary inside a
    merged token) gives the reference labels for each."""
    tok = load_fast(DEEPSEEK)
    cfg = config_from_dict({"inputs": ["x.jsonl"], "tokenizer": str(DEEPSEEK), "out": "unused", "max_length": 4096})
    encoder = encoder_for(cfg, tok)
    assert encoder.boundaries is not None
    records = [{"prompt": "Say hi.\n", "completion": "\n\nHi 👍🏽 你好!"}, {"prompt": "2+2=", "completion": " 4"},
               {"prompt": "Q: e\u0301?", "completion": " A: ñ"}]
    out = encoder([(n, Record(r, f"mem:{n}")) for n, r in enumerate(records)])
    assert not out.rejects
    for n in range(len(records)):
        rendered = encoder.render([(n, Record(records[n], "mem"))])
        text, spans = rendered.texts[0], rendered.spans[0]
        enc = BACKEND.encode(text, add_special_tokens=False)
        ref = labels_from_spans(enc.ids, enc.offsets, text, spans).tolist()
        assert rendered.heads == [0]  # this tokenizer puts no BOS in front
        ids, labels = out.sample(n)
        assert ids.tolist() == enc.ids
        assert labels.tolist() == ref


def _variant(tmp_path, name: str, change) -> Tokenizer:
    data = json.loads((DEEPSEEK / "tokenizer.json").read_text(encoding="utf-8"))
    change(data)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return Tokenizer.from_file(str(path))


def test_an_nfc_tokenizer_uses_byte_lengths_only_on_text_already_in_nfc(tmp_path):
    backend = _variant(tmp_path, "nfc", lambda d: d.update(normalizer={"type": "NFC"}))
    nfc = ByteBoundaries.of(backend)
    assert nfc is not None and nfc.nfc
    # NFC rewrites the second text without changing its byte count (U+1F71 loses a byte, U+FA6C gains
    # one), so only the NFC check can tell that its bytes are not the tokens'
    texts = ["Caf\u00e9 ok", "\u1f71ok\ufa6c"]
    spans = [[(4, 7)], [(3, 4)]]
    encs = backend.encode_batch_fast(texts, add_special_tokens=False)
    ids = np.asarray([t for e in encs for t in e.ids], dtype=np.int32)
    k, i, j, redo = nfc.ranges(ids, [len(e) for e in encs], texts, spans)
    assert redo == [1]
    assert _labels(ids, k, i, j, 0, 0, len(encs[0])) == _reference(backend, texts[0], spans[0])


@pytest.mark.parametrize("name, change", [
    ("lowercase", lambda d: d.update(normalizer={"type": "Lowercase"})),
    ("trimmed offsets", lambda d: d["post_processor"].update(trim_offsets=True)),
    ("prefix space", lambda d: d["pre_tokenizer"]["pretokenizers"][-1].update(add_prefix_space=True)),
    ("removed splits", lambda d: d["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed")),
])
def test_tokenizers_whose_bytes_do_not_fix_offsets_always_use_offsets(tmp_path, name, change):
    assert ByteBoundaries.of(_variant(tmp_path, name.replace(" ", "_"), change)) is None


def test_metaspace_before_every_section_uses_offsets(tmp_path):
    data = json.loads((FIXTURES / "tokenizers" / "mistral" / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"]["prepend_scheme"] = "always"
    path = tmp_path / "always.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    assert ByteBoundaries.of(Tokenizer.from_file(str(path))) is None
    assert ByteBoundaries.of(Tokenizer.from_file(f"{MISTRAL}/tokenizer.json")).lead  # Mistral's own: "first"


def test_metaspace_text_holding_the_space_mark_uses_offsets():
    backend = BACKENDS["mistral"]
    texts = ["a ▁b c", "a b c"]
    encs = backend.encode_batch_fast(texts, add_special_tokens=False)
    ids = np.asarray([t for e in encs for t in e.ids], dtype=np.int32)
    *_, redo = ByteBoundaries.of(backend).ranges(ids, [len(e) for e in encs], texts, [[(4, 6)], [(3, 5)]])
    assert redo == [0]
