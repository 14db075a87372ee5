"""The read side trusts nothing in a build folder (issue 27, group 2): every command that reads one
(`verify`, `stats`, `inspect`, `diff`, `merge`) answers an edited or damaged folder with a line naming the
file (and row), never a traceback, and never opens a path outside the folder, a FIFO or a device."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from tests.conftest import MISTRAL, sftprep_cli, write_jsonl

RECORDS = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(40)]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("read_side")
    data = write_jsonl(root / "d.jsonl", RECORDS)
    assert sftprep_cli("build", "-i", data, "-t", MISTRAL, "-o", root / "good", "--max-length", 64).exit_code == 0
    for i in range(2):
        assert sftprep_cli("build", "-i", data, "-t", MISTRAL, "-o", root / f"p{i}", "--max-length", 64,
                           "--part", f"{i}/2").exit_code == 0
    return root


def edit_manifest(key, value):
    def edit(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        m[key] = value
        (d / "manifest.json").write_text(json.dumps(m))
    return edit


def rewrite_shard(change):
    """Rewrite shard 0 with `change(rows)` applied (and its sha256 updated, as a careful forger would)."""
    def edit(d: Path) -> None:
        p = d / "shard-train-00000.arrow"
        table = pa.ipc.open_file(pa.memory_map(str(p))).read_all()
        table = change(table)
        with pa.ipc.new_file(str(p) + ".x", table.schema) as w:
            w.write_table(table)
        os.replace(str(p) + ".x", p)
        m = json.loads((d / "manifest.json").read_text())
        m["shards"][0]["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
        (d / "manifest.json").write_text(json.dumps(m))
    return edit


def column(name, fn, typ=pa.int32()):
    def change(table):
        values = [fn(r) for r in table.column(name).to_pylist()]
        return table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.list_(typ)))
    return change


def truncate(name):
    def edit(d: Path) -> None:
        p = d / name
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return edit


CASES = {  # case: (edit, what a command says, commands that have nothing to read there)
    "samples_file outside": (edit_manifest("samples_file", "../../../../etc/passwd"), "points outside the build folder",
                             {"diff", "inspect"}),
    "absolute rejects_file": (edit_manifest("rejects_file", "/etc/passwd"), "points outside the build folder",
                              {"diff", "inspect"}),
    "shard cut in half": (truncate("shard-train-00000.arrow"), "is not a complete Arrow file", set()),
    "negative token id": (rewrite_shard(column("input_ids", lambda r: [-5] + r[1:])), "token id -5 is outside the "
                          "vocabulary", {"stats"}),
    "seq_lens 0": (rewrite_shard(column("seq_lens", lambda r: [0] + r[1:])), "seq_lens holds 0", set()),
    "seq_lens negative": (rewrite_shard(column("seq_lens", lambda r: [-3] + r[1:])), "seq_lens holds -3", set()),
    "input_ids as int64": (rewrite_shard(column("input_ids", lambda r: r, pa.int64())), "input_ids list<item: int64>",
                           set()),
}
VERIFY_SAYS = {"samples_file outside": "samples file", "absolute rejects_file": "rejects file",
               "shard cut in half": "unreadable", "negative token id": "id range", "seq_lens 0": "seq_lens",
               "seq_lens negative": "seq_lens", "input_ids as int64": "schema"}


@pytest.mark.parametrize("case", CASES)
def test_an_edited_build_gets_one_line_from_every_reader(good, tmp_path, case):
    edit, says, unread = CASES[case]
    folder = tmp_path / "b"
    shutil.copytree(good / "good", folder)
    edit(folder)
    for command in ("stats", "inspect", "diff"):
        if command in unread:
            continue
        args = {"inspect": ["--row", 0, "--plain"], "diff": [good / "good"]}.get(command, [])
        r = sftprep_cli(command, folder, *args)
        assert r.exit_code == 2 and says in r.output and r.exception.__class__ is SystemExit, (command, r.output)
    r = sftprep_cli("verify", folder)
    assert r.exit_code == 1 and f"{VERIFY_SAYS[case]}: " in r.output.splitlines()[-1] and "Traceback" not in r.output


@pytest.mark.parametrize("make", ["fifo", "link to /dev/zero"])
def test_a_fifo_or_device_in_place_of_a_shard_is_never_opened(good, tmp_path, make):
    folder = tmp_path / "b"
    shutil.copytree(good / "good", folder)
    shard = folder / "shard-train-00000.arrow"
    shard.unlink()
    os.mkfifo(shard) if make == "fifo" else os.symlink("/dev/zero", shard)
    for command in (["verify"], ["stats"], ["inspect", "--row", "0"], ["diff", str(good / "good")]):
        r = subprocess.run([sys.executable, "-m", "sftprep.cli", command[0], str(folder), *command[1:]],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode in (1, 2) and "Traceback" not in r.stderr, (command, r.stderr)
        assert "not a regular file" in r.stdout + r.stderr or "leads outside the build folder" in r.stdout + r.stderr


@pytest.mark.parametrize("damage", ["samples.feather", "shard-train-00000.arrow"])
def test_merge_names_a_truncated_file_of_a_part(good, tmp_path, damage):
    for i in range(2):
        shutil.copytree(good / f"p{i}", tmp_path / f"p{i}")
    truncate(damage)(tmp_path / "p1")
    r = sftprep_cli("merge", tmp_path / "p0", tmp_path / "p1", "--out", tmp_path / "m")
    assert r.exit_code == 2 and f"p1/{damage} is not a complete Arrow file" in r.output
    assert r.exception.__class__ is SystemExit and not (tmp_path / "m" / "manifest.json").exists()
