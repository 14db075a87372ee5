"""`sftprep diff A B` through the CLI: a template change, a labelling-policy change, a tokenizer
change and no change at all, each reviewed as a person would read it."""

from __future__ import annotations

import pytest

from tests.conftest import CHATML_TOK, DATA, MISTRAL, write_jsonl, sftprep_cli

CHAT = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]


run = sftprep_cli


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diff")
    chat = write_jsonl(tmp / "chat.jsonl", CHAT)
    alpaca = ["-i", DATA / "alpaca_en.json", "--max-length", 512, "-q"]
    for name, args in {
        "alpaca": [*alpaca, "-n", 8, "-t", CHATML_TOK, "--template", "alpaca"],
        "alpaca-again": [*alpaca, "-n", 8, "-t", CHATML_TOK, "--template", "alpaca"],
        "chatml": [*alpaca, "-n", 8, "-t", CHATML_TOK, "--template", "chatml"],
        "mistral-10": [*alpaca, "-n", 10, "-t", MISTRAL, "--template", "alpaca"],
        "all-turns": ["-i", chat, "-t", CHATML_TOK, "--template", "chatml", "--train-on", "assistant", "-q"],
        "last-turn": ["-i", chat, "-t", CHATML_TOK, "--template", "chatml", "--train-on", "last", "-q"],
    }.items():
        r = run("build", *args, "-o", tmp / name)
        assert r.exit_code == 0, r.output
    return tmp


@pytest.mark.slow
def test_template_change_reads_like_a_code_review(builds):
    r = run("diff", builds / "alpaca", builds / "chatml")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[:5] == [f"--- A {builds / 'alpaca'}", f"+++ B {builds / 'chatml'}", "config:",
                         "  template.name: 'alpaca' -> 'chatml'", "inputs: same content"]
    assert lines[5].startswith("tokenizer: same (mistral-chatml, vocab 32,002, hash ")
    assert "samples: 8 in both, 0 only in A, 0 only in B; 8 differ in tokens, 0 in labels only" in lines
    assert "first 3 changed sample(s), trained text inside ⟦…⟧:" in lines
    src = DATA / "alpaca_en.json"
    i = lines.index(f"--- A sample 1 ({src}[1])")
    assert lines[i + 1] == f"+++ B sample 1 ({src}[1]) [tokens differ]"
    hunk = lines[i + 2:lines.index(f"--- A sample 2 ({src}[2])")]
    # the prompt lines are replaced; the trained answer keeps its text, with the new end-of-turn token
    assert "-### Response:" in hunk and "+<|im_start|>assistant" in hunk
    assert "-⟦The car accelerated rapidly.</s>⟧" in hunk
    assert "+⟦The car accelerated rapidly.<|im_end|>⟧" in hunk


def test_totals_show_old_new_and_delta(builds):
    from sftprep import read_manifest

    a, b = (read_manifest(builds / n)["totals"] for n in ("alpaca", "chatml"))
    out = run("diff", builds / "alpaca", builds / "chatml", "--show", 1).output
    delta = b["tokens"] - a["tokens"]
    assert f"  tokens: {a['tokens']:,} -> {b['tokens']:,} ({delta:+,})" in out.splitlines()
    assert "samples_kept" not in out  # unchanged totals are not listed
    assert out.count("--- A sample") == 1


def test_label_policy_change_shows_moved_markers(builds):
    r = run("diff", builds / "all-turns", builds / "last-turn")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "  tokenize.train_on: 'assistant' -> 'last'" in lines
    assert "samples: 2 in both, 0 only in A, 0 only in B; 0 differ in tokens, 1 in labels only" in lines
    header = lines.index(f"--- A sample 0 ({builds / 'chat.jsonl'}:1)")
    assert lines[header + 1].endswith("[labels only differ]")
    # the first answer is no longer trained; the last one still is (so it is no changed line)
    assert "-⟦Hello!<|im_end|>⟧" in lines and "+Hello!<|im_end|>" in lines
    assert not [line for line in lines if "Goodbye" in line and line[0] in "+-"]


def test_tokenizer_change_and_samples_on_one_side(builds):
    r = run("diff", builds / "alpaca", builds / "mistral-10")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "tokenizer: CHANGED (token ids of A and B are not comparable)" in lines
    assert "  vocab_size: 32002 -> 32000" in lines
    assert "  read.num_samples: 8 -> 10" in lines
    assert "  only in B: 8, 9" in lines
    assert "samples: 8 in both, 0 only in A, 2 only in B;" in r.output


def test_same_build_twice_has_no_differences(builds):
    r = run("diff", builds / "alpaca", builds / "alpaca-again")
    assert r.exit_code == 0
    assert r.output.splitlines()[2] == "no differences: same settings, tokenizer, totals and samples"


def test_missing_build_is_a_one_line_error(builds, tmp_path):
    r = run("diff", builds / "alpaca", tmp_path / "nope")
    assert r.exit_code == 2
    assert r.output == (f"Error: {tmp_path / 'nope'} does not exist "
                        "(expected a folder written by `sftprep build`)\n")
