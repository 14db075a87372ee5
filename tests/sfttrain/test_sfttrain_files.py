"""The trainer's own files (issue 27, group 3): a checkpoint write that fails leaves no half checkpoint and
says how to continue; `--resume` checks the checkpoint it takes; `merge` names a damaged adapter."""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sfttrain.checks import checkpoint_problem
from sfttrain.cli import main
from sfttrain.trainer import saved_checkpoints
from tests.sfttrain_helpers import spanish_shards, tiny_model  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]


def _flags(shards, model, out, *more) -> list[str]:
    return [str(shards), "--model", str(model), "--output-dir", str(out), "--save-steps", "1", "--seed", "0",
            "--per-device-batch-size", "2", *map(str, more)]


def _cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(map(str, args)))
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # no traceback
    return r.exit_code, r.output.strip()


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, spanish_shards, tiny_model) -> Path:  # noqa: F811
    """A run of 2 steps saved at each: checkpoint-1, checkpoint-2 and final, LoRA r 4 plus lm_head in full."""
    out = tmp_path_factory.mktemp("files") / "run"
    code, output = _cli("run", *_flags(spanish_shards, tiny_model, out, "--max-steps", 2, "--lora-r", 4,
                                       "--modules-to-save", "lm_head"))
    assert code == 0, output
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _cut(path: Path) -> None:
    """Truncate to half, as a write cut by a full disk or a kill leaves it."""
    os.truncate(path, path.stat().st_size // 2)


def test_a_checkpoint_write_past_a_file_size_limit_is_one_line_and_leaves_no_half_checkpoint(
        tmp_path, spanish_shards, tiny_model):  # noqa: F811
    """RLIMIT_FSIZE (SIGXFSZ ignored) makes torch's own zip writer fail on optimizer.pt (`unexpected pos`, a
    RuntimeError, not an OSError), as a full disk does; the adapter and tokenizer (< 4 MiB) still fit."""
    out = tmp_path / "run"
    flags = _flags(spanish_shards, tiny_model, out, "--lora-r", 320)  # optimizer.pt 5 MiB, adapter 2.6 MiB
    code, output = _cli("run", *flags, "--max-steps", 1)
    assert code == 0, output
    before = _digests(out / "checkpoint-1")

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    p = subprocess.run([sys.executable, "-c", "from sfttrain.cli import main; main()", "run", *flags,
                        "--max-steps", "2", "--resume", "--accept-changes"],
                       capture_output=True, text=True, preexec_fn=limited, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: could not save {out}/checkpoint-2 (RuntimeError: [enforce fail at "), last
    assert "unexpected pos" in last and last.endswith(
        f": the disk may be full, over quota or past a file-size limit); it was removed; the last complete "
        f"checkpoint, {out}/checkpoint-1, is intact: free space (or raise the quota / file-size limit), then "
        "continue with --resume"), last
    assert not (out / "checkpoint-2").exists()
    assert saved_checkpoints(out) == [out / "checkpoint-1"] and _digests(out / "checkpoint-1") == before
    assert checkpoint_problem(out / "checkpoint-1") is None


@pytest.mark.parametrize("change, expected", [
    (["--lora-r", 8, "--modules-to-save", "lm_head"], "--lora-r 4 -> 8"),
    (["--lora-r", 4], "--modules-to-save lm_head -> (none)"),
])
def test_resume_with_another_adapter_shape_is_refused_even_with_accept_changes(
        two_checkpoints, spanish_shards, tiny_model, change, expected):  # noqa: F811
    code, output = _cli("run", *_flags(spanish_shards, tiny_model, two_checkpoints, "--max-steps", 3, *change,
                                       "--resume", "--accept-changes"))
    assert code == 2
    assert output == (f"Error: --resume: the adapter in {two_checkpoints}/checkpoint-2 has another shape than this "
                      f"run's: {expected}; a checkpoint's weights fit only the adapter they were trained in "
                      "(--accept-changes cannot apply this): resume with its settings, or start a new --output-dir")


def test_resume_passes_over_a_truncated_trainer_state_to_the_last_complete_checkpoint(
        two_checkpoints, tmp_path, spanish_shards, tiny_model, caplog):  # noqa: F811
    out = _copy(two_checkpoints, tmp_path)
    _cut(out / "checkpoint-2" / "trainer_state.json")
    with caplog.at_level(logging.WARNING, logger="sfttrain"):
        code, output = _cli("run", *_flags(spanish_shards, tiny_model, out, "--max-steps", 2, "--lora-r", 4,
                                           "--modules-to-save", "lm_head", "--resume"))
    assert code == 0, output
    assert f"resuming from {out}/checkpoint-1" in output
    assert [r.getMessage() for r in caplog.records if r.name == "sfttrain"] == [
        f"Warning: --resume: {out}/checkpoint-2/trainer_state.json is truncated or unreadable; resuming from "
        f"{out}/checkpoint-1, the last complete checkpoint"]
    assert checkpoint_problem(out / "checkpoint-2") is None  # step 2 trained again and saved whole


def test_resume_passes_over_a_truncated_adapter_and_names_it_when_none_is_whole(
        two_checkpoints, tmp_path, spanish_shards, tiny_model, caplog):  # noqa: F811
    from sfttrain import config_from_dict
    from sfttrain.api import setup

    out = _copy(two_checkpoints, tmp_path)
    whole = (out / "checkpoint-2" / "adapter_model.safetensors").stat().st_size
    _cut(out / "checkpoint-2" / "adapter_model.safetensors")
    config = config_from_dict({"shards": str(spanish_shards), "model": str(tiny_model), "output_dir": str(out),
                               "max_steps": 2, "save_steps": 1, "seed": 0, "per_device_batch_size": 2,
                               "lora_r": 4, "modules_to_save": ["lm_head"], "resume": True})
    with caplog.at_level(logging.WARNING, logger="sfttrain"):
        assert setup(config).resume_from == str(out / "checkpoint-1")
    size = (out / "checkpoint-2" / "adapter_model.safetensors").stat().st_size
    assert [r.getMessage() for r in caplog.records if r.name == "sfttrain"] == [
        f"Warning: --resume: {out}/checkpoint-2/adapter_model.safetensors is truncated: {size:,} bytes where its "
        f"header lists {whole:,}; resuming from {out}/checkpoint-1, the last complete checkpoint"]
    _cut(out / "checkpoint-1" / "optimizer.pt")
    code, output = _cli("run", *_flags(spanish_shards, tiny_model, out, "--max-steps", 2, "--lora-r", 4,
                                       "--modules-to-save", "lm_head", "--resume"))
    assert code == 2
    assert output == (f"Error: --resume: no complete checkpoint in {out}: {out}/checkpoint-2/adapter_model."
                      f"safetensors is truncated: {size:,} bytes where its header lists {whole:,}; run without "
                      "--resume (--overwrite) to start again")


def test_merge_of_a_truncated_adapter_names_the_damaged_file(two_checkpoints, tmp_path):
    out = _copy(two_checkpoints, tmp_path)
    adapter = out / "final" / "adapter_model.safetensors"
    whole = adapter.stat().st_size
    _cut(adapter)
    code, output = _cli("merge", out / "final", "--out", tmp_path / "merged")
    assert code == 2
    assert output == (f"Error: {adapter} is truncated: {whole // 2:,} bytes where its header lists {whole:,}: the "
                      "adapter is damaged; merge another checkpoint (or copy the files again)")
    assert not (tmp_path / "merged").exists()
