"""A build folder is self-contained: made in one folder with relative paths, it is inspected,
verified, diffed, trained and merged from another working directory, and after it is moved with the
original tokenizer gone (only the copy in OUT/tokenizer/ is left)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import sftprep_cli
from tests.conftest import write_jsonl
from tests.sfttrain_helpers import SPANISH, TOKENIZER, make_tiny_model, one_thread, pair_records  # noqa: F401


@pytest.fixture
def made_in_a(tmp_path, monkeypatch) -> Path:
    """`sftprep build -i data.jsonl -t tok -o shards` run inside tmp/a (relative paths); cwd is then tmp/b."""
    a = tmp_path / "a"
    a.mkdir()
    shutil.copytree(TOKENIZER, a / "tok")
    write_jsonl(a / "data.jsonl", pair_records(SPANISH * 2))
    monkeypatch.chdir(a)
    for out, template in (("shards", "none"), ("shards_qa", "qa")):
        r = sftprep_cli("build", "-i", "data.jsonl", "-t", "tok", "-o", out, "--template", template,
                        "--max-length", 64, "-q")
        assert r.exit_code == 0, r.output
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    return a / "shards"


def test_the_build_carries_its_tokenizer_and_points_to_it_relatively(made_in_a):
    m = json.loads((made_in_a / "manifest.json").read_text())
    assert m["tokenizer"]["path"] == "tokenizer"
    assert m["tokenizer"]["source"] == str((made_in_a.parent / "tok").resolve())
    copied = sorted(p.name for p in (made_in_a / "tokenizer").iterdir())
    assert copied == m["tokenizer"]["files"] == ["tokenizer.json", "tokenizer_config.json"]
    for name in copied:
        assert (made_in_a / "tokenizer" / name).read_bytes() == (TOKENIZER / name).read_bytes()
    assert all("/" not in s["file"] for s in m["shards"]) and "/" not in m["samples_file"]


def _look(build: str, other: str) -> None:
    """inspect, stats, verify and diff (which decodes changed samples) on `build`, all succeeding."""
    r = sftprep_cli("inspect", build, "--row", 0, "--plain")
    assert r.exit_code == 0, r.output
    assert "How do you say" in r.output and "Spanish" in r.output
    r = sftprep_cli("inspect", build, "--sample", 0, "--plain")
    assert r.exit_code == 0 and "How do you say cat in Spanish?" in r.output, r.output
    r = sftprep_cli("stats", build)
    assert r.exit_code == 0, r.output
    r = sftprep_cli("verify", build)
    assert r.exit_code == 0, r.output
    r = sftprep_cli("diff", build, other)
    assert r.exit_code == 0 or r.exit_code == 1, r.output
    assert "tokenizer: same" in r.output and "### Question:" in r.output  # the qa template, decoded


def test_inspect_stats_verify_diff_from_another_folder_and_after_a_move(made_in_a, tmp_path, monkeypatch):
    _look("../a/shards", "../a/shards_qa")
    elsewhere = tmp_path / "c" / "moved"
    elsewhere.parent.mkdir()
    shutil.move(made_in_a, elsewhere)
    shutil.move(made_in_a.parent / "shards_qa", elsewhere.parent / "qa")
    shutil.rmtree(made_in_a.parent / "tok")  # only the copies are left
    monkeypatch.chdir(tmp_path)
    _look("c/moved", "c/qa")


def test_inspect_of_an_old_build_names_the_missing_tokenizer(made_in_a):
    m = json.loads((made_in_a / "manifest.json").read_text())
    m["tokenizer"]["path"] = "tok"  # as builds before the copy recorded it: relative to where they ran
    (made_in_a / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(made_in_a / "tokenizer")
    r = sftprep_cli("inspect", "../a/shards", "--row", 0, "--plain")
    assert r.exit_code == 2 and "has no tokenizer/ folder" in r.output and "--tokenizer" in r.output


def test_build_yaml_paths_are_relative_to_the_yaml_file(made_in_a, tmp_path):
    yaml_file = made_in_a.parent / "build.yaml"
    yaml_file.write_text("inputs: [data.jsonl]\ntokenizer: tok\nout: from_yaml\nmax_length: 64\n")
    r = sftprep_cli("build", "../a/build.yaml", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads((made_in_a.parent / "from_yaml" / "manifest.json").read_text())["totals"]["samples_kept"] == 10
    assert not (tmp_path / "b" / "from_yaml").exists()


def test_train_and_merge_a_moved_build_from_other_folders(made_in_a, tmp_path, monkeypatch, one_thread):  # noqa: F811
    """The model folder has no tokenizer: the build's copy is checked against nothing, saved with the
    adapter, and the merge carries it. The YAML's paths are relative to the YAML file."""
    from sfttrain.cli import main

    make_tiny_model(tmp_path / "model", tokenizer=None)
    c = tmp_path / "c"
    c.mkdir()
    shutil.move(made_in_a, c / "moved")
    shutil.rmtree(made_in_a.parent / "tok")
    (c / "train.yaml").write_text(
        "shards: moved\nmodel: ../model\noutput_dir: run\nmax_steps: 2\nper_device_batch_size: 2\n"
        "learning_rate: 0.001\nlora_r: 4\nlora_alpha: 8\nsave_steps: 1000\nseed: 0\n")
    r = CliRunner().invoke(main, ["run", "../c/train.yaml"])  # from tmp/b
    assert r.exit_code == 0, r.output
    final = c / "run" / "final"
    assert "adapter and tokenizer in" in r.output
    assert (final / "tokenizer.json").read_bytes() == (c / "moved" / "tokenizer" / "tokenizer.json").read_bytes()
    assert not (tmp_path / "b" / "run").exists()

    (tmp_path / "d").mkdir()
    monkeypatch.chdir(tmp_path / "d")
    r = CliRunner().invoke(main, ["merge", "../c/run/final", "--out", "merged"])
    assert r.exit_code == 0, r.output
    assert "model and tokenizer in merged" in r.output
    assert (tmp_path / "d" / "merged" / "tokenizer.json").is_file()
    assert (tmp_path / "d" / "merged" / "config.json").is_file()
