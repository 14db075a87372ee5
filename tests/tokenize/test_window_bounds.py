"""A record far beyond max_length costs a window's tokens under every truncation mode: `--truncation drop`
proves it too long from its first max_length + 1 tokens, `--truncation-unit turns` fits turns the same way;
neither tokenizes the whole record (here 40 MB, under a 1.5 GiB address-space limit)."""

from __future__ import annotations

import json

import pytest

from sftprep import load
from tests.conftest import CHATML_TOK, samples_of, write_jsonl
from tests.limited import sftprep_limited

BIG = 40 << 20  # characters of the long record


def rejects_of(tmp_path) -> list[tuple[str, str, str]]:
    lines = (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()
    return [(r["source"], r["reason"], r["message"]) for r in map(json.loads, lines)]


@pytest.mark.slow
def test_a_40_mb_record_under_truncation_drop_is_dropped_from_a_window(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "short one"}, {"text": "word " * (BIG // 5)}])
    r = sftprep_limited(tmp_path, "build", "-i", "d.jsonl", "-t", CHATML_TOK, "-o", "out", "--format", "text",
                        "--max-length", "64", "--truncation", "drop", "--max-reject-ratio", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    (source, reason, message), = rejects_of(tmp_path)
    assert (source, reason) == ("d.jsonl:2", "too_long")
    assert message.startswith("41,943,0")  # characters of the text rendered, with its EOS
    assert message.endswith(" characters, 65+ tokens > max_length 64 (--truncation drop)")


@pytest.mark.slow
def test_a_40_mb_turn_under_truncation_unit_turns_is_fitted_from_windows(tmp_path):
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "short"},
                         {"role": "user", "content": "again"}, {"role": "assistant", "content": "word " * (BIG // 5)}]}
    write_jsonl(tmp_path / "d.jsonl", [long])
    r = sftprep_limited(tmp_path, "build", "-i", "d.jsonl", "-t", CHATML_TOK, "-o", "out", "--max-length", "64",
                        "--truncation-unit", "turns")
    assert r.returncode == 0, r.stderr[-2000:]
    (ids, labels, _), = samples_of(load(tmp_path / "out"))
    assert 10 < len(ids) <= 64  # the first exchange alone
