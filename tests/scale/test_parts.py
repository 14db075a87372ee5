"""Builds in parts (`--part i/N`) merged by manifest (`sftprep merge`), on Ray too: the same bytes as one build."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from sftprep import build, config_from_dict
from sftprep.errors import InputError
from sftprep.write.files import claim
from sftprep.scale.merge import merge
from tests.conftest import CHATML_TOK, DATA, MISTRAL, sftprep_cli, write_jsonl

BUILD_FILES = ("rejects.jsonl", "samples.feather")


def inputs(tmp_path: Path) -> list[str]:
    """Three files of different sizes and formats, with records that are rejected in two ways."""
    bad = write_jsonl(tmp_path / "in" / "bad.jsonl", [
        {"instruction": "Say hi.", "output": "Hi."},
        '{"instruction": broken',
        {"instruction": "No answer"},
        {"instruction": "Count to three.", "output": "One, two, three."},
    ])
    return [str(DATA / "alpaca_en.json"), str(bad), str(DATA / "alpaca_zh.jsonl")]


def settings(tmp_path: Path, **more) -> dict:
    return {"inputs": inputs(tmp_path), "tokenizer": MISTRAL, "template": "alpaca", "max_length": 256,
            "truncation": "drop", "shard_size": 7, **more}


def assert_same_build(single: Path, merged: Path) -> None:
    """The rule README's "Scaling out" states: every file of the build byte for byte; the manifest equal
    but for `config.out`, `config.workers` and `merged_from`."""
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (single, merged))
    assert a["shards"] and [s["file"] for s in a["shards"]] == [s["file"] for s in b["shards"]]
    for name in [s["file"] for s in a["shards"]] + list(BUILD_FILES):
        assert (single / name).read_bytes() == (merged / name).read_bytes(), name
    for name in a["tokenizer"]["files"]:
        assert (single / "tokenizer" / name).read_bytes() == (merged / "tokenizer" / name).read_bytes()
    assert b.pop("merged_from")["count"] >= 1
    for m in (a, b):
        m["config"].pop("out"), m["config"].pop("workers")
    assert a == b


@pytest.mark.parametrize("packing", ["bfd", "none"])
def test_parts_merged_equal_one_build(tmp_path, packing):
    cfg = settings(tmp_path, packing=packing)
    single = build(config_from_dict({**cfg, "out": str(tmp_path / "single")}))
    t = single["totals"]
    assert t["samples_dropped"] >= 2 and t["rows"] > 7  # rejects and several shards: the test means something
    parts = []
    for i in (2, 0, 1):  # any order
        m = build(config_from_dict({**cfg, "out": str(tmp_path / f"p{i}"), "part": f"{i}/3"}))
        assert m["part"] == {"index": i, "count": 3, "of_build": single["build_id"]}
        parts.append(tmp_path / f"p{i}")
    merged = merge(parts, tmp_path / "merged")
    assert merged["build_id"] == single["build_id"]
    assert merged["merged_from"]["count"] == 3
    assert_same_build(tmp_path / "single", tmp_path / "merged")


def test_a_part_holds_every_nth_record(tmp_path):
    cfg = settings(tmp_path)
    m = build(config_from_dict({**cfg, "out": str(tmp_path / "p1"), "part": [1, 4]}))
    import pyarrow.feather as feather

    ids = feather.read_table(tmp_path / "p1" / "samples.feather").column("sample_id").to_pylist()
    rejected = [json.loads(line)["sample_id"] for line in (tmp_path / "p1" / "rejects.jsonl").open()]
    assert sorted(ids + rejected) == list(range(1, 84, 4))  # 40 + 4 + 40 records: 1, 5, 9, ..., 81
    assert m["totals"]["records_read"] == 21


def test_cli_parts_then_merge_from_elsewhere_on_moved_folders(tmp_path, monkeypatch):
    cfg = settings(tmp_path)
    args = [a for path in cfg["inputs"] for a in ("-i", path)] + [
        "-t", MISTRAL, "--template", "alpaca", "--max-length", "256", "--truncation", "drop", "--shard-size", "7", "-q"]
    assert sftprep_cli("build", *args, "-o", tmp_path / "single").exit_code == 0
    for i in range(2):
        r = sftprep_cli("build", *args, "--part", f"{i}/2", "-o", tmp_path / "made" / f"part{i}")
        assert r.exit_code == 0, r.output
    shutil.move(tmp_path / "made", tmp_path / "moved")  # parts copied to another machine / folder
    monkeypatch.chdir(tmp_path / "moved")
    r = sftprep_cli("merge", "part1", "part0", "--out", "../merged")
    assert r.exit_code == 0, r.output
    assert "records read" in r.output
    assert_same_build(tmp_path / "single", tmp_path / "merged")
    r = sftprep_cli("verify", tmp_path / "merged")
    assert r.exit_code == 0, r.output
    for i in range(2):  # a part is a sound build of its own
        assert sftprep_cli("verify", f"part{i}").exit_code == 0


def test_a_killed_part_run_again_gives_the_same_bytes(tmp_path):
    cfg = config_from_dict({**settings(tmp_path), "out": str(tmp_path / "p0"), "part": "0/2"})
    build(cfg)
    clean = {p.name: p.read_bytes() for p in (tmp_path / "p0").iterdir() if p.is_file() and p.name != ".lock"}
    # what a kill mid-write leaves: no manifest, a shard half written, spill files, a stale lock
    (tmp_path / "p0" / "manifest.json").unlink()
    (tmp_path / "p0" / "shard-train-00001.arrow").write_bytes(b"ARROW1\0\0 half")
    claim(tmp_path / "p0" / "shard-train-00002.arrow", tmp_path / "p0" / "shard-train-00002.arrow.tmp")
    (tmp_path / "p0" / "shard-train-00002.arrow.tmp").write_bytes(b"partial")  # claimed first, as the writer does
    (tmp_path / "p0" / "tokens.spill.ids.tmp").write_bytes(b"\0" * 64)
    build(cfg)  # the same command again: no --overwrite needed
    again = {p.name: p.read_bytes() for p in (tmp_path / "p0").iterdir() if p.is_file() and p.name != ".lock"}
    assert again.keys() == clean.keys() and all(again[k] == clean[k] for k in clean)


@pytest.fixture
def three_parts(tmp_path):
    cfg = settings(tmp_path)
    for i in range(3):
        build(config_from_dict({**cfg, "out": str(tmp_path / f"p{i}"), "part": f"{i}/3"}))
    return cfg, [tmp_path / f"p{i}" for i in range(3)]


def test_merge_refuses_missing_duplicate_and_foreign_parts(tmp_path, three_parts):
    cfg, (p0, p1, p2) = three_parts
    with pytest.raises(InputError, match=r"part\(s\) 1 of 3 missing \(given: 0, 2\); merge needs parts 0..2"):
        merge([p0, p2], tmp_path / "m")
    shutil.copytree(p1, tmp_path / "copy")
    with pytest.raises(InputError, match=r"part 1/3 is given twice: .*p1 and .*copy"):
        merge([p0, p1, tmp_path / "copy", p2], tmp_path / "m")
    build(config_from_dict({**cfg, "out": str(tmp_path / "q1"), "part": "1/2"}))
    with pytest.raises(InputError, match=r"q1 is part 1/2 but .*p0 is part 0/3: parts of different splits"):
        merge([p0, tmp_path / "q1", p2], tmp_path / "m")
    build(config_from_dict({**cfg, "out": str(tmp_path / "r1"), "part": "1/3", "max_length": 512}))
    with pytest.raises(InputError, match=r"r1 is not a part of the same build as .*p0: setting "
                                         r"tokenize.max_length differs \(512 vs 256\)"):
        merge([p0, tmp_path / "r1", p2], tmp_path / "m")
    tok = shutil.copytree(MISTRAL, tmp_path / "tok")  # the same vocabulary, another tokenizer_config.json
    config = json.loads((tok / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tok / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 4096}), encoding="utf-8")
    build(config_from_dict({**cfg, "out": str(tmp_path / "t1"), "part": "1/3", "tokenizer": str(tok)}))
    with pytest.raises(InputError, match=r"t1 is not a part of the same build as .*p0: their tokenizer files differ"):
        merge([p0, tmp_path / "t1", p2], tmp_path / "m")
    build(config_from_dict({**cfg, "out": str(tmp_path / "whole")}))
    with pytest.raises(InputError, match=r"whole is a whole build, not a part \(it was built without --part"):
        merge([tmp_path / "whole"], tmp_path / "m")
    assert not (tmp_path / "m").exists()  # nothing written by a refused merge


def test_merge_errors_are_one_line_on_the_command_line(tmp_path, three_parts):
    _, (p0, p1, p2) = three_parts
    r = sftprep_cli("merge", p0, p2, "--out", tmp_path / "m")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "part(s) 1 of 3 missing" in r.output


def test_part_settings_are_checked(tmp_path):
    from sftprep.errors import ConfigError

    for part, message in [("3/3", r"part=3/3: the part index counts from 0 to 2"),
                          ("1-3", r"part='1-3' is not i/N"), ("a/3", r"part='a/3' is not i/N with whole"),
                          ("0/0", r"the number of parts must be at least 1")]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({**settings(tmp_path), "out": "o", "part": part})
    with pytest.raises(ConfigError, match="--packing wrapped cannot be built in parts: its rows cut samples"):
        config_from_dict({**settings(tmp_path), "out": "o", "part": "0/2", "packing": "wrapped"})


def test_more_parts_than_records_and_the_reject_ratio_over_all_parts(tmp_path):
    records = [{"prompt": "p", "completion": "c"}, {"prompt": "p"}, {"prompt": "q"}]  # 2 of 3 rejected
    cfg = {"inputs": [str(write_jsonl(tmp_path / "d.jsonl", records))], "tokenizer": MISTRAL, "max_length": 64}
    for i in range(4):  # part 3 holds no record; part 0 alone would pass the ratio
        build(config_from_dict({**cfg, "out": str(tmp_path / f"p{i}"), "part": f"{i}/4"}))
    from sftprep.errors import BuildError

    with pytest.raises(BuildError, match=r"2 of 3 records rejected \(67% > max_reject_ratio 50%"):
        merge([tmp_path / f"p{i}" for i in range(4)], tmp_path / "m")


def test_executor_ray_without_ray_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as when it is not installed
    r = sftprep_cli("build", "-i", DATA / "alpaca_zh.jsonl", "-t", MISTRAL, "-o", tmp_path / "o",
                    "--executor", "ray", "-q")
    assert r.exit_code == 2
    assert r.output == "Error: --executor ray needs Ray, which is not installed: pip install 'sftprep[ray]'\n"


def test_executor_flags_are_checked_in_one_line(tmp_path):
    base = ["-i", DATA / "alpaca_zh.jsonl", "-t", MISTRAL, "-o", tmp_path / "o", "-q"]
    for flags, message in [(["--parts", "2"], "--ray-address, --parts and --parts-dir go with --executor ray"),
                           (["--executor", "ray", "--parts", "0"], "parts=0 must be at least 1"),
                           (["--executor", "ray", "--part", "0/2"], "--part builds one part here; --executor ray "
                                                                     "builds them all")]:
        r = sftprep_cli("build", *base, *flags)
        assert r.exit_code == 2 and r.output.startswith("Error: ") and message in r.output, r.output
        assert "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_executor_help_comes_from_the_field_docs():
    from sftprep.cli import build as build_command
    from sftprep.config import ExecutorConfig, field_help

    helps = {p.name: p.help for p in build_command.params}
    for name in ("executor", "ray_address", "parts", "parts_dir"):
        assert helps[name] == field_help(ExecutorConfig, name)
    assert helps["executor"].endswith("[default: local]")


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow  # starting Ray takes seconds
def test_executor_ray_gives_the_single_build(tmp_path, local_ray):
    from sftprep.scale.executors import build_ray

    cfg = settings(tmp_path)
    build(config_from_dict({**cfg, "out": str(tmp_path / "single")}))
    seen = []
    merged = build_ray(config_from_dict({**cfg, "out": str(tmp_path / "ray")}), parts=3,
                       on_part=lambda i, n, m: seen.append((i, n, m["part"]["of_build"])))
    assert sorted(seen) == [(i, 3, merged["build_id"]) for i in range(3)]
    assert_same_build(tmp_path / "single", tmp_path / "ray")
    assert not (tmp_path / "ray" / ".parts").exists()  # parts in OUT/.parts go once merged
    # the command line, with the parts kept: a second run rewrites identical parts
    args = [a for path in cfg["inputs"] for a in ("-i", path)] + [
        "-t", MISTRAL, "--template", "alpaca", "--max-length", "256", "--truncation", "drop", "--shard-size", "7",
        "--executor", "ray", "--parts", "2", "--parts-dir", tmp_path / "parts", "-q"]
    assert sftprep_cli("build", *args, "-o", tmp_path / "cli").exit_code == 0
    first = {p: p.read_bytes() for p in sorted((tmp_path / "parts").rglob("*")) if p.is_file() and p.name != ".lock"}
    r = sftprep_cli("build", *args, "-o", tmp_path / "cli")
    assert r.exit_code == 0, r.output
    assert first == {p: p.read_bytes() for p in sorted((tmp_path / "parts").rglob("*"))
                     if p.is_file() and p.name != ".lock"}  # the lock holds the pid of its last writer
    assert_same_build(tmp_path / "single", tmp_path / "cli")


@pytest.mark.slow
def test_executor_ray_names_the_failing_part_and_record(tmp_path, local_ray):
    cfg = settings(tmp_path)
    args = [a for path in cfg["inputs"] for a in ("-i", path)] + [
        "-t", MISTRAL, "--template", "alpaca", "--on-error", "fail", "--executor", "ray", "--parts", "2", "-q"]
    r = sftprep_cli("build", *args, "-o", tmp_path / "o")
    assert r.exit_code == 2, r.output
    # records 41 (bad.jsonl:2, broken JSON) and 42 (bad.jsonl:3, no "output": format unknown) fail parts 1 and 0: the first reported
    assert r.output.count("\n") == 1
    assert re.match(r"Error: part 1/2 \(records 1, 3, 5, \.\.\. of the inputs \(index = 1 mod 2\): .*alpaca_en.json, "
                    r".*\) failed: .*bad.jsonl:2: invalid JSON", r.output) or \
        re.match(r"Error: part 0/2 \(records 0, 2, 4, .*\) failed: .*bad.jsonl:3: cannot tell the record's format", r.output), \
        r.output


def test_an_input_all_rejected_is_warned_of_by_the_merge_not_by_a_part(tmp_path):
    """Each part sees a share of an input's records: whether none of them was kept is known only over
    all parts, so the merge adds the warning a single build gives (and parts agree on their warnings)."""
    chat = write_jsonl(tmp_path / "d" / "chat.jsonl", [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(7)])
    notes = write_jsonl(tmp_path / "d" / "notes.jsonl", [{"text": f"note {i}"} for i in range(3)])
    cfg = {"inputs": [str(chat), str(notes)], "tokenizer": CHATML_TOK, "template": "chatml", "max_length": 64}
    single = build(config_from_dict({**cfg, "out": str(tmp_path / "single")}))
    assert [w for w in single["warnings"] if str(notes) in w]
    for i in range(3):
        m = build(config_from_dict({**cfg, "out": str(tmp_path / f"p{i}"), "part": f"{i}/3"}))
        assert not [w for w in m["warnings"] if str(notes) in w]
    merged = merge([tmp_path / f"p{i}" for i in range(3)], tmp_path / "merged")
    assert merged["warnings"] == single["warnings"]
    assert_same_build(tmp_path / "single", tmp_path / "merged")


def test_progress_total_of_a_part_is_its_share(tmp_path):
    class Recorder:
        total, done = "unset", 0

        def start(self, total):
            self.total = total

        def __call__(self, n):
            self.done += n

    data = write_jsonl(tmp_path / "a.jsonl", [{"text": f"line {i}"} for i in range(10)])
    for part, num_samples, total in (("1/4", None, 3), ("3/4", None, 2), ("0/4", 5, 2)):
        rec = Recorder()
        m = build(config_from_dict({"inputs": [str(data)], "tokenizer": MISTRAL, "out": str(tmp_path / "o"),
                                    "overwrite": True, "part": part, "num_samples": num_samples}), progress=rec)
        assert (rec.total, rec.done) == (total, m["totals"]["records_read"]), part


@pytest.mark.slow  # starting Ray takes seconds
def test_executor_ray_builds_a_recipe_as_one_process_would(tmp_path, local_ray):
    """Parts on Ray tasks keep every sample; the merge applies the recipe over all of them: the same
    dedup, validation split and weights, byte for byte."""
    from sftprep.scale.executors import build_ray

    cfg = {"tokenizer": MISTRAL, "max_length": 256, "truncation": "drop", "eval": {"fraction": 0.2}, "sources": [
        {"name": "en", "inputs": str(DATA / "alpaca_en.json"), "template": "alpaca", "choose": 50},
        {"name": "zh", "inputs": str(DATA / "alpaca_zh.jsonl"), "template": "alpaca", "repeat": 1.5}]}
    build(config_from_dict({**cfg, "out": str(tmp_path / "single")}))
    build(config_from_dict({**cfg, "out": str(tmp_path / "workers"), "workers": 2}))
    build_ray(config_from_dict({**cfg, "out": str(tmp_path / "ray")}), parts=3)
    for other in ("workers", "ray"):
        for f in ("shard-train-00000.arrow", "shard-validation-00000.arrow", "samples.feather", "rejects.jsonl"):
            assert (tmp_path / "single" / f).read_bytes() == (tmp_path / other / f).read_bytes(), (other, f)
