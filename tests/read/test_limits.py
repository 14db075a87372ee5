"""Hostile inputs stop within the read settings' bounds (max_record_bytes, max_gzip_ratio,
max_blank_lines): one line, exit 2 or a `too_large` reject, in seconds and under a real memory limit."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import pytest

from sftprep import build, config_from_dict
from sftprep.config import ReadConfig
from sftprep.read import reader_for
from tests.conftest import MISTRAL, write_jsonl
from tests.limited import one_line_error, sftprep_limited


def build_limited(tmp_path: Path, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return sftprep_limited(tmp_path, "build", "-t", MISTRAL, "-o", tmp_path / "out", *args, timeout=timeout)


def gzip_bomb(path: Path, head: bytes, filler: bytes, mib: int) -> Path:
    """`head` then `mib` MiB of `filler` bytes, as gzip members of 1 MiB each (about 1 KB apiece)."""
    member = gzip.compress(filler * (1 << 20))
    with open(path, "wb") as f:
        f.write(gzip.compress(head))
        for _ in range(mib):
            f.write(member)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero.jsonl", "zero.json", "zero.csv"])
def test_dev_zero_as_an_input_stops_in_one_line_within_memory(tmp_path, name):
    (tmp_path / name).symlink_to("/dev/zero")
    line = one_line_error(build_limited(tmp_path, "-i", name))
    assert "max_record_bytes (67,108,864 bytes)" in line and "--max-record-bytes" in line
    assert f"{name}:1: a line longer" in line or f"first: {name}: the record is longer" in line  # names the file


@pytest.mark.slow
def test_a_gzip_bomb_of_one_4_gib_line_stops_at_the_ratio(tmp_path):
    gzip_bomb(tmp_path / "bomb.jsonl.gz", b'{"text": "', b"x", 4096)
    assert (tmp_path / "bomb.jsonl.gz").stat().st_size < 5 << 20
    line = one_line_error(build_limited(tmp_path, "-i", "bomb.jsonl.gz", timeout=30))
    assert line.startswith("Error: bomb.jsonl.gz: inflates more than max_gzip_ratio (100)")
    assert "--max-gzip-ratio" in line


@pytest.mark.slow
def test_a_gzip_bomb_of_2_gib_of_newlines_stops_in_seconds(tmp_path):
    gzip_bomb(tmp_path / "nl.jsonl.gz", b'{"text": "hi"}\n', b"\n", 2048)
    line = one_line_error(build_limited(tmp_path, "-i", "nl.jsonl.gz", timeout=30))
    assert line.startswith("Error: nl.jsonl.gz:1000002: more than max_blank_lines (1,000,000) empty lines in a row")


def test_a_line_past_max_record_bytes_is_a_too_large_reject_and_the_next_lines_are_read(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"text": "short one"}\n{"text": "' + b"y" * 5000 + b'"}\n\n{"text": "after it"}')
    records = list(reader_for(data, ReadConfig(max_record_bytes=1000))(data))
    assert [(r.source.rsplit("/", 1)[-1], r.fields, r.reason if r.fields is None else None) for r in records] == [
        ("d.jsonl:1", {"text": "short one"}, None), ("d.jsonl:2", None, "too_large"),
        ("d.jsonl:4", {"text": "after it"}, None)]
    assert records[1].size == 5013 and "longer than max_record_bytes (1,000 bytes)" in records[1].error


def test_a_build_lists_the_too_large_record_in_its_rejects_with_the_flag_to_raise(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"record {i}"} for i in range(3)] + [{"text": "z" * 3000}])
    manifest = build(config_from_dict({"inputs": [str(data)], "tokenizer": MISTRAL, "out": str(tmp_path / "out"),
                                       "max_length": 64, "read": {"max_record_bytes": 1000}}))
    assert manifest["totals"]["samples_kept"] == 3
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["source"].rsplit("/", 1)[-1], r["reason"]) for r in rejects] == [("d.jsonl:4", "too_large")]
    assert "--max-record-bytes" in rejects[0]["message"]


def test_a_csv_row_past_max_record_bytes_is_a_too_large_reject_and_the_next_rows_are_read(tmp_path):
    data = tmp_path / "d.csv"
    data.write_bytes(b"prompt,completion\n" + b"short,one\n" + b"long," + b"y" * 5000 + b"\n"
                     + b'"a quoted field,\nover lines ' + b"z" * 5000 + b'\nand more",x\n' + b"after,it")
    records = list(reader_for(data, ReadConfig(max_record_bytes=1000))(data))
    assert [(r.source.rsplit("/", 1)[-1], r.fields, r.reason if r.fields is None else None) for r in records] == [
        ("d.csv:2", {"prompt": "short", "completion": "one"}, None), ("d.csv:3", None, "too_large"),
        ("d.csv:4", None, "too_large"), ("d.csv:7", {"prompt": "after", "completion": "it"}, None)]
    assert records[1].size == 5006 and "longer than max_record_bytes (1,000 bytes)" in records[1].error
    assert "--max-record-bytes" in records[2].error


def test_a_json_array_item_past_max_record_bytes_ends_the_array_there(tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"text": "a"}, {"text": "b" * 5000}, {"text": "c"}]))
    records = list(reader_for(data, ReadConfig(max_record_bytes=1000))(data))
    assert [(r.source.rsplit("/", 1)[-1], r.fields, r.reason if r.fields is None else None) for r in records] == [
        ("d.json[0]", {"text": "a"}, None), ("d.json[1]", None, "too_large")]
    assert "it and the records after it were not read" in records[1].error


def test_the_limits_are_settings_with_flags_and_are_checked(tmp_path):
    from tests.conftest import sftprep_cli

    r = sftprep_cli("build", "-i", "x.jsonl", "-t", MISTRAL, "-o", tmp_path / "o", "--max-record-bytes", "0")
    assert r.exit_code == 2 and "max_record_bytes=0 must be at least 1" in r.output
    for flag in ("--max-record-bytes", "--max-gzip-ratio", "--max-blank-lines"):
        assert flag in sftprep_cli("build", "--help").output
