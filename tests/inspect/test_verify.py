"""`sftprep verify` through the CLI: sound builds pass; each kind of tampering with a copy of a real
build is caught and reported with file, row and position."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pytest

import sftprep
from sftprep.write.shards import SCHEMA, open_shard, write_table
from tests.conftest import DATA, MISTRAL, sftprep_cli


run = sftprep_cli


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Three real builds: bfd (4 shards), wrapped (text across rows), none (one sample per row)."""
    tmp = tmp_path_factory.mktemp("verify")
    common = ["-t", MISTRAL, "--max-length", 256, "-q"]
    for name, args in {
        "bfd": ["-i", DATA / "alpaca_en.json", "--template", "alpaca", "-n", 16, "--shard-size", 2],
        "wrapped": ["-i", DATA / "c4.jsonl", "--packing", "wrapped", "-n", 6],
        "none": ["-i", DATA / "alpaca_zh.jsonl", "--template", "alpaca", "--packing", "none", "-n", 8],
    }.items():
        r = run("build", *args, *common, "-o", tmp / name)
        assert r.exit_code == 0, r.output
    return tmp


@pytest.fixture
def copy(builds, tmp_path):
    """A fresh copy of the bfd build to tamper with."""
    return shutil.copytree(builds / "bfd", tmp_path / "bfd")


def rewrite_shard(folder, name, edit):
    """Rewrite shard `name` with `edit(rows)` applied to its rows (dicts of lists); keep the manifest's
    checksum in step so only the content check can object."""
    rows = open_shard(folder / name).to_pylist()
    edit(rows)
    digest = write_table(folder / name, pa.Table.from_pylist(rows, schema=SCHEMA))
    edit_manifest(folder, lambda m: next(s for s in m["shards"] if s["file"] == name).update(sha256=digest))


def edit_manifest(folder, edit):
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["bfd", "wrapped", "none"])
def test_sound_builds_pass(builds, packing):
    out = builds / packing
    m = sftprep.read_manifest(out)
    t = m["totals"]
    r = run("verify", out)
    assert r.exit_code == 0, r.output
    assert r.output == (f"OK: {out}: {len(m['shards'])} shard(s), {t['rows']:,} rows, {t['tokens']:,} tokens "
                        f"({t['trained_tokens']:,} trained), {t['samples_kept']:,} samples; checksums, "
                        "manifest counts and the shard contract hold\n")
    assert sftprep.verify(out).ok


def test_wrapped_build_really_splits_samples_across_rows(builds):
    sids = [s for row in sftprep.load(builds / "wrapped").column("sample_ids").to_pylist() for s in row]
    assert len(sids) > len(set(sids))  # so the passing test above covers pieces of one sample


def test_flipped_byte_fails_the_checksum(copy):
    shard = copy / "shard-train-00001.arrow"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = run("verify", copy)
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert lines[0].startswith("shard-train-00001.arrow: sha256 is ")
    assert lines[0].endswith(": the file changed after the build")
    assert lines[-1].startswith(f"FAILED: {copy}: ") and "checksum: 1" in lines[-1]


def test_label_that_differs_from_its_input_id(copy):
    rows = open_shard(copy / "shard-train-00000.arrow").to_pylist()
    r0 = rows[0]
    pos = next(i for i, lab in enumerate(r0["labels"]) if lab != -100)
    token = r0["input_ids"][pos]
    rewrite_shard(copy, "shard-train-00000.arrow", lambda rows: rows[0]["labels"].__setitem__(pos, token + 1))
    r = run("verify", copy)
    assert r.exit_code == 1
    assert r.output == (f"shard-train-00000.arrow row 0, position {pos}: label {token + 1} differs from input id "
                        f"{token} at a trained position\n"
                        f"FAILED: {copy}: 1 violation(s) (label != id: 1)\n")


def test_first_token_of_a_sample_with_a_trained_label(copy):
    rows = open_shard(copy / "shard-train-00001.arrow").to_pylist()
    r = next(i for i, row in enumerate(rows) if len(row["seq_lens"]) >= 2)
    pos = rows[r]["seq_lens"][0]  # where the second sample of the row starts
    sid, token = rows[r]["sample_ids"][1], rows[r]["input_ids"][pos]
    assert rows[r]["labels"][pos] == -100

    def train_first(rows):
        rows[r]["labels"][pos] = token

    rewrite_shard(copy, "shard-train-00001.arrow", train_first)
    result = run("verify", copy)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == (f"shard-train-00001.arrow row {r}, position {pos}: first token of sample {sid} has label "
                        f"{token}, not -100 (it would train the previous sample to predict this one)")
    # one more trained token than the manifest counted
    assert lines[1].startswith("manifest.json: totals.trained_tokens is ")
    assert lines[2] == f"FAILED: {copy}: 2 violation(s) (first token: 1, manifest totals: 1)"


def test_manifest_row_count_that_does_not_match(copy):
    n = sftprep.read_manifest(copy)["shards"][2]["rows"]
    edit_manifest(copy, lambda m: m["shards"][2].update(rows=n + 1))
    r = run("verify", copy)
    assert r.exit_code == 1
    assert r.output == (f"shard-train-00002.arrow: the manifest says {n + 1} rows, the shard has {n}\n"
                        f"FAILED: {copy}: 1 violation(s) (manifest rows: 1)\n")


def test_padding_must_be_pad_id_with_label_minus_100(copy):
    rows = open_shard(copy / "shard-train-00000.arrow").to_pylist()
    r = next(i for i, row in enumerate(rows) if sum(row["seq_lens"]) < 256)
    pad_id = sftprep.read_manifest(copy)["tokenizer"]["pad_id"]
    assert rows[r]["input_ids"][255] == pad_id and rows[r]["labels"][255] == -100

    def break_padding(rows):
        rows[r]["input_ids"][255] = 7
        rows[r]["labels"][254] = pad_id

    rewrite_shard(copy, "shard-train-00000.arrow", break_padding)
    lines = run("verify", copy).output.splitlines()
    assert f"shard-train-00000.arrow row {r}, position 254: padding has label {pad_id}, not -100" in lines
    assert f"shard-train-00000.arrow row {r}, position 255: padding has id 7, not pad_id {pad_id}" in lines


def test_rows_whose_labels_are_shorter_than_their_ids(copy):
    rewrite_shard(copy, "shard-train-00001.arrow", lambda rows: rows[1]["labels"].pop())
    r = run("verify", copy)
    assert r.exit_code == 1
    assert r.output.splitlines()[0] == "shard-train-00001.arrow row 1: 256 input_ids but 255 labels"


def test_many_violations_are_counted_and_the_first_listed_in_order(copy):
    def shift_every_trained_label(rows):
        for row in rows:
            row["labels"] = [lab + 1 if lab != -100 else lab for lab in row["labels"]]

    rewrite_shard(copy, "shard-train-00000.arrow", shift_every_trained_label)
    rows = open_shard(copy / "shard-train-00000.arrow").to_pylist()
    trained = sum(lab != -100 for row in rows for lab in row["labels"])
    r = run("verify", copy, "--max-errors", 3)
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert len(lines) == 4
    assert all(line.startswith("shard-train-00000.arrow row 0, position ") for line in lines[:3])
    positions = [int(line.split("position ")[1].split(":")[0]) for line in lines[:3]]
    assert positions == sorted(positions)
    assert lines[3] == (f"FAILED: {copy}: {trained} violation(s) (label != id: {trained}); "
                        "first 3 listed above")


def test_missing_shard_and_missing_build(copy, tmp_path):
    (copy / "shard-train-00003.arrow").unlink()
    r = run("verify", copy)
    assert r.exit_code == 1 and r.output.splitlines()[0] == "shard-train-00003.arrow: the file is missing"
    r = run("verify", tmp_path / "nope")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "does not exist" in r.output
