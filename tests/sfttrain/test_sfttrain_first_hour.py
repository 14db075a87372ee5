"""The first hour of a TRL user (issue 24), `sfttrain` side: mistakes answered before torch is imported,
no bitsandbytes note on a run that quantizes nothing, a model made for another vocabulary refused, plain
progress lines in a log file. Each through the command line: in a subprocess where what it imports is the
point, else in-process (click's runner: its output is no terminal, as a pipe or a log file is not)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from sfttrain.cli import main
from tests.conftest import write_jsonl
from tests.sfttrain_helpers import TINY_LLAMA, one_thread, spanish_shards, tiny_model  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run_cli(*args):
    """`sfttrain run ARGS` in-process; its output is no terminal, as in a pipe or a log file."""
    return CliRunner().invoke(main, ["run", *map(str, args)])


def python(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=300)


MISTAKES = """
import json, sys, time
from sfttrain.cli import main
out = []
for args in json.loads(sys.argv[1]):
    start = time.perf_counter()
    try:
        main(args, standalone_mode=False)
    except SystemExit as e:
        out.append({"code": e.code, "seconds": time.perf_counter() - start})
print(json.dumps({"runs": out, "heavy": [m for m in ("torch", "transformers", "peft") if m in sys.modules]}))
"""


def test_mistakes_that_need_no_model_are_answered_before_torch_is_imported(tmp_path, spanish_shards):  # noqa: F811
    raw = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "completion": "b"}])
    out = ["--output-dir", str(tmp_path / "run")]
    cases = [["run", str(raw), "--model", str(tmp_path), *out],                      # raw data instead of a build
             ["run", str(tmp_path / "missing"), "--model", str(tmp_path), *out],     # a missing folder
             ["run", str(spanish_shards), "--model", str(tmp_path / "no-model"), *out],
             ["run", str(spanish_shards), "--model", str(tmp_path), "--eval", str(tmp_path / "no-eval"), *out],
             ["merge", str(tmp_path / "no-adapter"), "--out", str(tmp_path / "merged")]]
    p = python(MISTAKES, json.dumps(cases))
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert [r["code"] for r in result["runs"]] == [2, 2, 2, 2, 2]
    errors = p.stderr.splitlines()
    assert len(errors) == 5 and all(e.startswith("Error: ") for e in errors), p.stderr
    assert "is a file, not a build folder" in errors[0] and "does not exist" in errors[1]
    assert "--model" in errors[2] and "--eval" in errors[3] and "adapter folder" in errors[4]
    assert result["heavy"] == []  # torch / transformers / peft cost 7-15 s to import
    assert max(r["seconds"] for r in result["runs"]) < 2


def big_vocab_model(tmp: Path) -> Path:
    """A model folder as a config-made model leaves it: config.json (129,024 embedding rows), no tokenizer
    (no weights either: every check here runs before they load)."""
    model = tmp / "big-vocab"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**json.loads(TINY_LLAMA.read_text()), "vocab_size": 129_024}))
    return model


BNB_LOGGER = "bitsandbytes.backends.cpu.ops"


def test_bitsandbytes_note_is_silenced_unless_quantized_and_a_model_for_another_vocabulary_is_refused(
        tmp_path, spanish_shards, monkeypatch, caplog):  # noqa: F811
    """A model made from a config with a 129k vocabulary, in a folder without a tokenizer, on a build of a
    32k tokenizer: refused, naming both sizes and --skip-tokenizer-check. Each refused run has set up its
    logging first; then the note bitsandbytes logs when peft imports it (on a CPU whose optional 4-bit
    kernel cannot be downloaded) is sent as bitsandbytes sends it."""
    logger = logging.getLogger(BNB_LOGGER)
    monkeypatch.setattr(logger, "filters", [])  # as in a fresh process
    model = big_vocab_model(tmp_path)
    notes = []
    for flags in (["--load-in-4bit"], []):  # the note matters to a quantized run: kept
        r = run_cli(spanish_shards, "--model", model, "--output-dir", tmp_path / "run", *flags)
        assert r.exit_code == 2
        assert r.output.startswith(f"Error: the model in {model} has 129,024 embedding rows but the shards' "
                                   "tokenizer (") and len(r.output.splitlines()) == 1
        assert "has 32,000 tokens" in r.output and "--skip-tokenizer-check" in r.output
        caplog.clear()
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "offline")
        notes.append(len([rec for rec in caplog.records if rec.name == BNB_LOGGER]))
    assert notes == [1, 0]


def test_skip_tokenizer_check_passes_a_model_with_spare_rows(tmp_path, spanish_shards):  # noqa: F811
    from sfttrain import config_from_dict
    from sfttrain.api import setup

    model = big_vocab_model(tmp_path)
    config = config_from_dict({"shards": str(spanish_shards), "model": str(model), "output_dir": str(tmp_path / "r"),
                               "skip_tokenizer_check": True})
    assert setup(config).manifest["tokenizer"]["vocab_size"] == 32_000


def test_progress_in_a_log_file_is_one_plain_line_per_log(tmp_path, spanish_shards, tiny_model,  # noqa: F811
                                                          one_thread):  # noqa: F811
    r = run_cli(spanish_shards, "--model", tiny_model, "--output-dir", tmp_path / "run", "--max-steps", 3,
                "--logging-steps", 1, "--lora-r", 4, "--learning-rate", "1e-3")  # stderr: not a terminal
    assert r.exit_code == 0, r.output
    steps = [line for line in r.stderr.splitlines() if line.startswith("step ")]
    assert len(steps) == 3, r.stderr
    for i, line in enumerate(steps, 1):
        assert re.fullmatch(rf"step {i}/3: loss \d+\.\d{{4}}, .*tokens_per_s [\d,]+, trained_tokens_seen [\d,]+, "
                            r".*eta \d+:\d\d:\d\d", line), line
    assert "…" not in r.stderr and "..." not in r.stderr  # nothing cut to the width of a terminal


def test_a_slow_rate_reads_as_a_whole_number_like_a_fast_one():
    """Under load tokens/s drops below 100; it still reads `87`, not `87.1234` beside `1,055`."""
    import io

    from rich.console import Console
    from transformers import TrainerState

    from sfttrain.progress import RichProgress

    out = io.StringIO()
    progress, state = RichProgress(Console(file=out, width=80)), TrainerState(max_steps=30, global_step=0)
    progress.on_train_begin(None, state, None)
    for step, rate in ((10, 87.1234), (20, 1055.4)):
        state.global_step = step
        progress.on_log(None, state, None, logs={"loss": 2.5, "learning_rate": 2e-4, "tokens_per_s": rate,
                                                 "trained_tokens_seen": 1234 * step})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step 10/30: loss 2.5000, learning_rate 0.0002, tokens_per_s 87, "
                               "trained_tokens_seen 12,340, eta ")
    assert "tokens_per_s 1,055, trained_tokens_seen 24,680" in lines[1]
