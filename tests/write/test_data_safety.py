"""Nothing of the user's is ever deleted, lost or changed without an error that names it (issue 26): what
`--overwrite` may remove, folders that overlap, CSV rows, input paths that look like globs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sftprep import read_manifest
from tests.conftest import MISTRAL, sftprep_cli, write_jsonl

RECORDS = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(40)]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def build(*args):
    return sftprep_cli("build", *args)


def user_files(out: Path) -> None:
    """Files a user keeps in a folder under the names a build writes, and some that merely look like it."""
    (out / "work.tmp").mkdir(parents=True)
    (out / "work.tmp" / "notes.txt").write_text("three weeks of notes")
    (out / "draft.tmp").write_text("draft")
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    (out / "tokenizer" / "my_vocab.txt").write_text("mine")
    (out / "shard-train-00000.arrow").write_bytes(b"my arrow file")
    (out / "manifest.json").write_text('{"mine": true}')
    (out / "rejects.jsonl").write_text('{"my": "rejects"}\n')


def test_overwrite_never_touches_files_under_the_names_a_build_writes_that_sftprep_did_not_write(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    out = tmp_path / "mine"
    user_files(out)
    before = snapshot(out)
    r = build("-i", data, "-t", MISTRAL, "-o", out, "--overwrite")
    assert r.exit_code == 2 and "holds manifest.json, rejects.jsonl, shard-train-00000.arrow, tokenizer" in r.output
    assert "no sftprep build wrote there" in r.output and "Traceback" not in r.output
    assert snapshot(out) == before  # not one byte changed, and no .lock left behind


def test_overwrite_builds_beside_other_files_and_keeps_them(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    out = tmp_path / "mine"
    (out / "work.tmp").mkdir(parents=True)
    (out / "work.tmp" / "notes.txt").write_text("three weeks of notes")
    (out / "draft.tmp").write_text("draft")
    (out / "README.txt").write_text("my readme")
    before = snapshot(out)
    r = build("-i", data, "-t", MISTRAL, "-o", out)
    assert r.exit_code == 2 and "pass --overwrite to write the build beside them" in r.output
    assert snapshot(out) == before  # refused: nothing written, not even a .lock
    assert build("-i", data, "-t", MISTRAL, "-o", out, "--overwrite").exit_code == 0
    # a second build with other settings replaces the first one's files, and only those
    assert build("-i", data, "-t", MISTRAL, "-o", out, "--max-length", 64, "--overwrite").exit_code == 0
    after = snapshot(out)
    assert {k: after[k] for k in before} == before
    assert read_manifest(out)["max_length"] == 64


def test_overwrite_removes_exactly_the_previous_builds_files(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    out = tmp_path / "o"
    assert build("-i", data, "-t", MISTRAL, "-o", out, "--packing", "none", "--shard-size", 10).exit_code == 0
    assert len(list(out.glob("shard-*.arrow"))) == 4
    (out / "notes.txt").write_text("mine")
    (out / "tokenizer" / "added_by_me.txt").write_text("mine")
    r = build("-i", data, "-t", MISTRAL, "-o", out, "--overwrite")
    assert r.exit_code == 2 and "tokenizer/added_by_me.txt" in r.output
    (out / "tokenizer" / "added_by_me.txt").unlink()
    assert build("-i", data, "-t", MISTRAL, "-o", out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.glob("shard-*.arrow")) == ["shard-train-00000.arrow"]
    assert (out / "notes.txt").read_text() == "mine"
    assert sftprep_cli("verify", out).exit_code == 0


def test_a_tokenizer_or_input_inside_the_output_folder_is_refused_before_any_work(tmp_path):
    project = tmp_path / "p"
    shutil.copytree(MISTRAL, project / "tokenizer")
    data = write_jsonl(project / "data.jsonl", RECORDS)
    before = snapshot(project)
    r = build("-i", write_jsonl(tmp_path / "d.jsonl", RECORDS), "-t", project / "tokenizer", "-o", project,
              "--overwrite")
    assert r.exit_code == 2 and "the tokenizer" in r.output and "is inside the output folder" in r.output
    r = build("-i", data, "-t", MISTRAL, "-o", project, "--overwrite")
    assert r.exit_code == 2 and "data.jsonl is inside the output folder --out" in r.output
    r = build("-i", tmp_path / "d.jsonl", "-t", project / "tokenizer", "-o", project / "tokenizer" / "out")
    assert r.exit_code == 2 and "the tokenizer" in r.output
    assert snapshot(project) == before


def test_merge_into_one_of_its_parts_is_refused_and_the_part_survives(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    for i in range(2):
        assert build("-i", data, "-t", MISTRAL, "-o", tmp_path / f"p{i}", "--part", f"{i}/2").exit_code == 0
    before = snapshot(tmp_path / "p0")
    r = sftprep_cli("merge", tmp_path / "p0", tmp_path / "p1", "--out", tmp_path / "p0", "--overwrite")
    assert r.exit_code == 2 and "merge reads every part while it writes" in r.output
    r = sftprep_cli("merge", tmp_path / "p0", tmp_path / "p1", "--out", tmp_path, "--overwrite")
    assert r.exit_code == 2 and "merge reads every part while it writes" in r.output
    assert snapshot(tmp_path / "p0") == before
    assert sftprep_cli("merge", tmp_path / "p0", tmp_path / "p1", "--out", tmp_path / "m").exit_code == 0


def test_a_forged_part_is_named_for_what_really_differs(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    for i in range(2):
        assert build("-i", data, "-t", MISTRAL, "-o", tmp_path / f"p{i}", "--part", f"{i}/2").exit_code == 0
    m = json.loads((tmp_path / "p1" / "manifest.json").read_text())
    m["part"]["of_build"] = "0123456789abcdef"
    (tmp_path / "p1" / "manifest.json").write_text(json.dumps(m))
    r = sftprep_cli("merge", tmp_path / "p0", tmp_path / "p1", "--out", tmp_path / "m")
    assert r.exit_code == 2 and "sftprep version differs" not in r.output
    assert "p1/manifest.json: part.of_build is 0123456789abcdef, but its own settings, inputs and tokenizer " \
           "make" in r.output


def csv_file(path: Path, rows: list[bytes]) -> Path:
    path.write_bytes(b"prompt,completion\n" + b"".join(rows))
    return path


def test_a_csv_field_over_128_kib_loses_no_row(tmp_path):
    huge = b'"' + b"word " * 40_000 + b'",done\n'  # 200 kB: past csv's default field size limit
    rows = [b"q0,a0\n", huge] + [f"q{i},a{i}\n".encode() for i in range(1, 1001)]
    path = csv_file(tmp_path / "d.csv", rows)
    assert build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o", "--max-length", 64).exit_code == 0
    totals = read_manifest(tmp_path / "o")["totals"]
    assert totals["records_read"] == 1002
    assert totals["samples_kept"] + totals["samples_dropped"] == 1002 and totals["samples_kept"] >= 1001


def test_an_invalid_utf8_byte_in_a_csv_rejects_only_its_row_at_its_own_line(tmp_path):
    rows = [f"question {i} {'x' * 90},answer {i}\n".encode() for i in range(10_000)]  # ~1 MB before it
    rows.append(b"bad \xff byte,answer\n")
    rows += [f"later {i},answer {i}\n".encode() for i in range(1000)]
    path = csv_file(tmp_path / "d.csv", rows)
    assert build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o", "--max-length", 64).exit_code == 0
    totals = read_manifest(tmp_path / "o")["totals"]
    assert totals["records_read"] == 11_001 and totals["samples_kept"] == 11_000
    rejects = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in rejects] == [(f"{path}:10002", "unreadable")]
    assert 'field "prompt": invalid UTF-8 at byte 4' in rejects[0]["message"]


def test_an_input_path_that_exists_is_taken_literally(tmp_path):
    write_jsonl(tmp_path / "[1].jsonl", RECORDS[:3])
    write_jsonl(tmp_path / "1.jsonl", RECORDS[:5])
    write_jsonl(tmp_path / "star*.jsonl", RECORDS[:7])
    write_jsonl(tmp_path / "starfish.jsonl", RECORDS[:11])
    for given, read in [("[1].jsonl", 3), ("star*.jsonl", 7), ("glob:star*.jsonl", 18), ("glob:[1].jsonl", 5)]:
        out = tmp_path / f"o{read}"
        assert build("-i", str(tmp_path / given) if not given.startswith("glob:") else
                     "glob:" + str(tmp_path / given[5:]), "-t", MISTRAL, "-o", out).exit_code == 0, given
        assert read_manifest(out)["totals"]["records_read"] == read, given
