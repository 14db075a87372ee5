"""Decontamination reads a tokenized sample's words from its tokens (`tokenize.screen`), without decoding it:
the words it hashes must be the decoded text's words, as `read.contamination` finds them in a benchmark item,
or a leaked item is missed (or a clean sample dropped). Real tokenizers: SentencePiece with byte fallback
(Mistral) and byte-level BPE (DeepSeek-V4), on English, Chinese and the characters that are hard to cut."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from sftprep.read.contamination import Benchmark, word_hashes, words
from sftprep.tokenize.screen import Screen

from ..conftest import DATA, FIXTURES

HARD = [
    "ΟΔΥΣΣΕΥΣ and Οδυσσευς are one word; so are STRASSE and Straße.",  # case folding: final sigma, sharp s
    "don't stop-gap 3.14 x_y __init__ e-mail@host.org   tabs\there\nnew\r\nlines",
    "emoji 🤗🤗 inside wo🤗rds and 𝒮𝒸𝓇𝒾𝓅𝓉 letters, ﬁ ligature, Ǆ title case, İstanbul",
    "   ",
    "",
    "a",
    "日本語のテキストと한국어 텍스트, mixed with English words and ١٢٣ Arabic-Indic digits.",
]


def texts() -> list[str]:
    en = json.loads((DATA / "alpaca_en.json").read_text())[:150]
    zh = [json.loads(x) for x in (DATA / "alpaca_zh.jsonl").read_text().splitlines()[:150]]
    return [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in en + zh] + HARD


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Benchmark:
    path = tmp_path_factory.mktemp("bench") / "items.jsonl"
    path.write_text(json.dumps({"text": " ".join(["word"] * 20)}) + "\n")
    return Benchmark((str(path),), 13)


@pytest.mark.parametrize("tokenizer", ["mistral", "deepseek-v4"])
def test_the_words_hashed_from_tokens_are_the_decoded_texts_words(benchmark, tokenizer):
    backend = Tokenizer.from_file(str(FIXTURES / "tokenizers" / tokenizer / "tokenizer.json"))
    screen = Screen(benchmark, backend)
    samples = [e.ids for e in backend.encode_batch(texts(), add_special_tokens=True)]
    ids = np.array([i for s in samples for i in s], np.int64)
    lengths = np.array([len(s) for s in samples], np.int64)
    flat, counts = screen.word_hashes(ids, lengths)
    ends = np.cumsum(counts)
    for k, s in enumerate(samples):
        expected = words(backend.decode(s, skip_special_tokens=True))
        assert screen.words(np.array(s, np.int64)) == expected, texts()[k][:60]
        assert flat[ends[k] - counts[k]:ends[k]].tolist() == word_hashes(expected).tolist(), texts()[k][:60]
