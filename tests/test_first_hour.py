"""The first hour of a TRL user (issue 24), fast part: YAML numbers as they write them, one-line type
errors naming file and key, a plot from the plain install, the output lock taken before any work.
Training and subprocess rows are in test_sfttrain_first_hour.py (slow)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from click.testing import CliRunner

from sfttrain.cli import main as sfttrain_main
from tests.conftest import DATA, MISTRAL, sftprep_cli, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def sfttrain_cli(*args):
    return CliRunner().invoke(sfttrain_main, [str(a) for a in args])


def test_exponent_numbers_in_a_training_yaml_are_numbers(tmp_path):
    """`learning_rate: 2e-4` is how TRL / axolotl configs write it; YAML 1.1 would read it as text."""
    from sfttrain.config import config_from_dict, load_train_yaml

    f = tmp_path / "train.yaml"
    f.write_text("shards: no-such-build\nmodel: m\noutput_dir: run\nlearning_rate: 2e-4\nlora_dropout: 5e-2\n"
                 "weight_decay: 1E-2\nlora:\n  alpha: 1.6e1\n")
    r = sfttrain_cli("run", f)
    assert r.exit_code == 2
    assert r.output == f"Error: SHARDS {tmp_path / 'no-such-build'} does not exist; build shards with " \
                       "`sftprep build`\n"  # the settings passed; the first mistake is the missing build
    c = config_from_dict(load_train_yaml(f), source=str(f))
    assert (c.train.learning_rate, c.lora.dropout, c.train.weight_decay, c.lora.alpha) == (2e-4, 5e-2, 1e-2, 16.0)


def test_exponent_numbers_in_a_build_yaml_are_numbers(tmp_path):
    f = tmp_path / "build.yaml"
    f.write_text(f"inputs: [{DATA / 'alpaca_en.json'}]\ntokenizer: {MISTRAL}\ntemplate: alpaca\nout: out\n"
                 "max_reject_ratio: 5e-1\nmax_length: 256\n")
    r = sftprep_cli("build", f, "-q")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]["read"]["max_reject_ratio"] == 0.5


def test_a_value_of_the_wrong_type_is_one_line_naming_the_file_the_key_and_the_type(tmp_path):
    train = tmp_path / "train.yaml"
    train.write_text("shards: s\nmodel: m\noutput_dir: run\nmax_steps: '10'\n")
    r = sfttrain_cli("run", train)
    assert r.exit_code == 2
    assert r.output == f"Error: invalid training config: {train}: `max_steps` must be a whole number, got the " \
                       "text '10' (write it without quotes)\n"
    build = tmp_path / "build.yaml"
    build.write_text(f"inputs: [x.jsonl]\ntokenizer: {MISTRAL}\nout: out\nmax_reject_ratio: half\n"
                     "pack:\n  shard_size: 1.5\n")
    r = sftprep_cli("build", build)
    assert r.exit_code == 2
    assert r.output.splitlines() == [  # several problems: one line each, each naming its key
        "Error: invalid build config:",
        f"  - {build}: `max_reject_ratio` must be a number, got the text 'half'",
        f"  - {build}: `pack.shard_size` must be a whole number, got 1.5"]
    assert not (tmp_path / "out").exists()


def test_stats_plots_with_the_plain_install_and_prints_the_histogram_as_text(tmp_path):
    """matplotlib is a dependency, not an extra the README's install leaves out."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("matplotlib") for d in project["dependencies"])
    r = sftprep_cli("build", "-i", DATA / "alpaca_en.json", "-t", MISTRAL, "--template", "alpaca", "--max-length",
                    256, "-o", tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    r = sftprep_cli("stats", tmp_path / "out", "--plot", tmp_path / "p.png")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    lines = r.output.splitlines()
    at = lines.index("tokens per sample")
    bins = lines[at + 1:at + 11]  # one line per length bin: "  0-25  ████  12"
    assert all("-" in b for b in bins) and any("█" in b for b in bins)


def test_the_out_lock_is_taken_before_any_work(tmp_path):
    """A second build into a folder being written is refused first, before it loads its tokenizer or
    hashes its inputs (here: a tokenizer that does not exist is never looked at)."""
    import fcntl
    import os

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    (tmp_path / "o").mkdir()
    fd = os.open(tmp_path / "o" / ".lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running build holds
    try:
        r = sftprep_cli("build", "-i", data, "-t", tmp_path / "no-tokenizer", "-o", tmp_path / "o")
    finally:
        os.close(fd)
    assert r.exit_code == 2
    assert "is being written by another sftprep build (pid 4242)" in r.output
    # a build refused before writing leaves no folder it made (nor its lock)
    r = sftprep_cli("build", "-i", data, "-t", tmp_path / "no-tokenizer", "-o", tmp_path / "new")
    assert r.exit_code == 2 and "tokenizer folder" in r.output
    assert not (tmp_path / "new").exists()
