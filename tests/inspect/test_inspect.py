"""`sftprep inspect` through the CLI, `sftprep.samples()`, and shards read by polars and DuckDB.

One small ChatML build serves the module: five records, one unreadable (dropped), one longer than
`max_length` (truncated), one multi-turn (two trained runs), packed into 64-token rows.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

import sftprep
from tests.conftest import CHATML_TOK, MISTRAL, build_records, sftprep_cli

RECORDS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "Name a primary colour."},
                  {"role": "assistant", "content": "Red."}]},
    {"oops": 1},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]},
    {"messages": [{"role": "user", "content": "Count."},
                  {"role": "assistant", "content": " ".join(str(i) for i in range(60))}]},
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inspect")
    _, table = build_records(tmp, RECORDS, tokenizer=CHATML_TOK, template="chatml", max_length=64)
    return tmp / "out", str(tmp / "out.jsonl"), table


run = sftprep_cli


def row_of(table, sample_id: int) -> int:
    return next(i for i, sids in enumerate(table.column("sample_ids").to_pylist()) if sample_id in sids)


@pytest.mark.slow
def test_sample_shows_trained_span_in_markers_with_its_source(built):
    out, data, table = built
    r = run("inspect", out, "--sample", 0)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == "trained tokens are shown as ⟦…⟧; everything else has label -100 (masked)"
    row = row_of(table, 0)
    assert lines[1].startswith(f"── sample 0 · {data}:1 · 22 tokens, 4 trained · row {row} "
                               f"(shard-train-00000.arrow row {row}), positions ")
    # the prompt is plain; the answer and its end-of-turn token are what the model learns to write;
    # the newline after <|im_end|> ends the sample, untrained
    assert "\n".join(lines[2:]) == ("<s><|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                    "<|im_start|>assistant\n⟦Paris.<|im_end|>⟧\n")


def test_row_shows_sample_boundaries_in_order_then_padding(built):
    out, data, table = built
    row = next(i for i, s in enumerate(table.column("seq_lens").to_pylist()) if len(s) == 2)
    sids, lens = table.column("sample_ids")[row].as_py(), table.column("seq_lens")[row].as_py()
    r = run("inspect", out, "--row", row)
    assert r.exit_code == 0, r.output
    rules = [line for line in r.output.splitlines() if line.startswith("── ")]
    assert rules[0].startswith(f"── row {row} of 3 · shard-train-00000.arrow row {row} · 2 sample(s), "
                               f"{sum(lens)} tokens + {64 - sum(lens)} padding")
    assert [rule.split(" · ")[0] for rule in rules[1:3]] == [f"── sample {s}" for s in sids]
    assert rules[3].startswith(f"── padding · {64 - sum(lens)} × </s> (id 2), label -100")
    # the multi-turn sample: both assistant turns trained, the user turn between them not
    assert ("<|im_start|>assistant\n⟦Hello!<|im_end|>⟧\n<|im_start|>user\nBye<|im_end|>\n"
            "<|im_start|>assistant\n⟦Goodbye.<|im_end|>⟧") in r.output
    assert r.output.split("\n", 1)[1].count("⟦") == 3  # Hello!, Goodbye., Paris. (after the legend)


def test_truncated_sample_is_flagged(built):
    out, data, _ = built
    r = run("inspect", out, "--sample", 4, "--plain")
    assert r.exit_code == 0, r.output
    assert f"── sample 4 · {data}:5 · truncated · 64 tokens, 52 trained" in r.output
    assert "⟦0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20⟧" in r.output


def test_tokens_table_lists_id_piece_and_label(built, mistral_chatml):
    out, _, _ = built
    r = run("inspect", out, "--sample", 0, "--tokens")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[2].split() == ["pos", "id", "piece", "label"]
    assert lines[3].split() == ["0", "1", "<s>", "-100"]  # the first token is never trained
    assert lines[4].split() == ["1", "32000", "<|im_start|>", "-100"]
    trained = [line.split() for line in lines[3:] if "⟦" in line]
    assert [t[2] for t in trained] == ["Par", "is", ".", "<|im_end|>"]
    assert mistral_chatml.decode([int(t[1]) for t in trained]) == "Paris.<|im_end|>"
    assert all(t[3] == f"⟦{t[1]}⟧" for t in trained)  # a trained label is the id itself
    assert lines[-1].split() == ["21", "13", "<0x0A>", "-100"]


def test_colour_marks_trained_text_without_brackets(built):
    out, _, _ = built
    r = run("inspect", out, "--sample", 0, "--color")
    assert r.exit_code == 0, r.output
    assert "⟦" not in r.output
    assert "\x1b[1;32mParis.<|im_end|>\x1b[0m" in r.output  # bold green
    assert "\x1b[2mWhat is the capital of France?" in r.output  # dim


@pytest.mark.parametrize("args, message", [
    (["--row", 99], "Error: --row 99 is out of range: this build has 3 rows (valid: 0-2)"),
    (["--sample", 77], "Error: sample 77 is not in this build: its sample ids run from 0 to 4 "
                       "(4 samples kept)"),
    (["--sample", 2], ":3) was dropped at build time: unknown_format: cannot tell the record's format"),
    (["--row", 0, "--sample", 0], "Error: give one of --row, --sample and --source"),
])
def test_user_errors_are_one_line_exit_2(built, args, message):
    out, _, _ = built
    r = run("inspect", out, *args)
    assert r.exit_code == 2
    assert message in r.output and r.output.count("\n") == 1 and "Traceback" not in r.output


@pytest.mark.slow
def test_missing_folder_and_tokenizer_override(built, tmp_path):
    r = run("inspect", tmp_path / "nope")
    assert r.exit_code == 2
    assert r.output == (f"Error: {tmp_path / 'nope'} does not exist "
                        "(expected a folder written by `sftprep build`)\n")
    out, _, _ = built
    r = run("inspect", out, "--tokenizer", tmp_path)
    assert r.exit_code == 2 and "has no tokenizer.json" in r.output
    r = run("inspect", out, "--tokenizer", MISTRAL)  # no <|im_start|>: would decode the wrong text
    assert r.exit_code == 2
    assert f"Error: --tokenizer {MISTRAL} is not the tokenizer these shards were built with" in r.output
    r = run("inspect", out, "--tokenizer", CHATML_TOK, "--sample", 1)
    assert r.exit_code == 0 and "⟦Red.<|im_end|>⟧" in r.output


def test_samples_api_is_a_table_for_pandas(built):
    out, data, _ = built
    table = sftprep.samples(out)
    assert isinstance(table, pa.Table)
    df = table.to_pandas().set_index("sample_id")
    assert list(df.columns) == ["source", "text", "trained_text", "num_tokens", "num_trained", "input_ids",
                                "labels", "truncated"]
    assert list(df.index) == [0, 1, 3, 4]  # sample 2 was dropped
    assert df.loc[0, "source"] == f"{data}:1"
    assert df.loc[0, "text"] == ("<s><|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                 "<|im_start|>assistant\nParis.<|im_end|>\n")
    assert df.loc[0, "trained_text"] == "Paris.<|im_end|>"
    assert df.loc[3, "trained_text"] == "Hello!<|im_end|>\nGoodbye.<|im_end|>"
    assert df.loc[4, "truncated"] and not df.loc[0, "truncated"]
    assert list(df.num_tokens) == [len(x) for x in df.input_ids] == [22, 19, 31, 64]
    assert list(df.num_trained) == [sum(x != -100 for x in lab) for lab in df.labels]
    assert df[df.num_trained > 10].index.tolist() == [4]
    raw = sftprep.samples(out, decode=False)
    assert "text" not in raw.column_names and raw.column("num_trained").to_pylist() == list(df.num_trained)


def test_shards_read_by_polars_and_duckdb(built):
    polars = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    out, _, table = built
    shard = str(out / "shard-train-00000.arrow")
    df = polars.read_ipc(shard)
    assert df.columns == ["input_ids", "labels", "seq_lens", "sample_ids"]
    assert df["input_ids"].to_list() == table.column("input_ids").to_pylist()
    # DuckDB scans the memory-mapped Arrow table (or the polars frame) in place
    shards = sftprep.load(out)  # noqa: F841 (read by name in the SQL)
    rows, tokens = duckdb.sql("SELECT count(*), sum(list_sum(seq_lens)) FROM shards").fetchall()[0]
    trained = duckdb.sql("SELECT count(*) FROM (SELECT unnest(labels) AS label FROM shards) "
                         "WHERE label <> -100").fetchall()[0][0]
    manifest = sftprep.read_manifest(out)
    assert (rows, tokens, trained) == (manifest["totals"]["rows"], manifest["totals"]["tokens"],
                                       manifest["totals"]["trained_tokens"])
    assert duckdb.sql("SELECT count(*) FROM df").fetchall() == [(3,)]
