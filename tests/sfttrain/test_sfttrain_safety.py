"""sfttrain never trains on data or weights it cannot vouch for (issue 26): the build it started with,
resumed only on that build and those settings unless told, rows that keep the shard contract, and
steps whose loss and gradients are finite."""

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pytest
from safetensors.torch import load_file
from transformers import TrainerCallback

from sfttrain import train
from sfttrain.config import ConfigError
from sftprep.write.output import OutLock
from tests.sfttrain_helpers import (ROOT, SPANISH, TOKENIZER, build_shards, one_thread, spanish_shards,  # noqa: F401
                                    tiny_model, train_config)
from tests.sfttrain.test_sfttrain_guards import run_cli

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
NUMBERS = [(f"What comes after {i}?", f" {i + 1}") for i in range(5)]  # as many rows as SPANISH


def _build_id(folder) -> str:
    return json.loads((folder / "manifest.json").read_text())["build_id"]


# -- the build a run reads is the build it trains on ----------------------------------------------------

class RebuildAfterEpoch1(TrainerCallback):
    """At the end of epoch 1, `sftprep build --overwrite` of other records into the folder being trained on."""

    def __init__(self, shards, tmp) -> None:
        data = tmp / "other.jsonl"
        data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in NUMBERS))
        self.command = [sys.executable, "-m", "sftprep.cli", "build", "-i", str(data), "-t", str(TOKENIZER),
                        "--out", str(shards), "--max-length", "64", "--packing", "none", "--overwrite"]
        self.result = None

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.result is None:
            self.result = subprocess.run(self.command, capture_output=True, text=True, env=ENV, cwd=ROOT)


def test_a_build_folder_is_not_rebuilt_while_a_run_reads_it(tmp_path, tiny_model, one_thread):  # noqa: F811
    shards = build_shards(tmp_path, SPANISH, packing="none")
    built = _build_id(shards)
    rebuild = RebuildAfterEpoch1(shards, tmp_path)
    result = train(train_config(shards, tiny_model, tmp_path / "run", max_steps=-1, num_epochs=2,
                                dataloader_workers=1), callbacks=[rebuild], disable_tqdm=True)
    assert rebuild.result.returncode == 2, rebuild.result.stdout + rebuild.result.stderr
    assert f"is being read by sfttrain (pid {os.getpid()}): a rebuild would change the data under the run" \
        in rebuild.result.stderr + rebuild.result.stdout
    assert _build_id(shards) == built  # epoch 2 trained the build epoch 1 did
    assert json.loads((tmp_path / "run" / "final" / "sfttrain.json").read_text())["data"]["build_id"] == built
    assert result.global_step == 6  # 5 rows, 2 per step: 3 steps per epoch
    lock = OutLock(shards)
    lock.acquire()  # a build under way: the run is refused, rather than reading a folder half rebuilt
    try:
        with pytest.raises(ConfigError, match=r"is being written by sftprep build \(pid \d+\); wait for the build"):
            train(train_config(shards, tiny_model, tmp_path / "run2"), disable_tqdm=True)
    finally:
        lock.release()


KILL_AFTER_TRAINER_STATE = """
import os, signal, sys
from transformers.trainer_callback import TrainerState
from sfttrain import train
from tests.sfttrain_helpers import train_config

save = TrainerState.save_to_json
def save_then_die(self, path):
    save(self, path)
    os.kill(os.getpid(), signal.SIGKILL)  # the moment after trainer_state.json, the checkpoint's last file
TrainerState.save_to_json = save_then_die
train(train_config(sys.argv[1], sys.argv[2], sys.argv[3], max_steps=2, save_steps=1), disable_tqdm=True)
"""


def test_resume_refuses_another_build_after_a_sigkill_at_the_end_of_a_checkpoint(tmp_path, tiny_model,  # noqa: F811
                                                                                 one_thread):  # noqa: F811
    shards, other = build_shards(tmp_path, SPANISH), build_shards(tmp_path, NUMBERS, name="other")
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_TRAINER_STATE, str(shards), str(tiny_model), str(out)],
                            capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert killed.returncode == -9, killed.stderr
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()
    with pytest.raises(ConfigError, match=rf"--resume: this run differs from {out / 'checkpoint-1'}: it was trained "
                                          rf"on build {_build_id(shards)}, {other} holds build {_build_id(other)}; "
                                          "resume with the same shards and settings, pass --accept-changes"):
        train(train_config(other, tiny_model, out, max_steps=2, save_steps=1, resume=True), disable_tqdm=True)


def _cli(shards, model, out, *flags):
    return run_cli(shards, "--model", model, "--output-dir", out, "--lora-r", 4, "--logging-steps", 1,
                   "--save-steps", 1, "--lr-scheduler", "constant", "--learning-rate", "0.001", *flags)


def _learning_rates(checkpoint) -> list[float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [h["learning_rate"] for h in history if "loss" in h]


def test_resume_with_other_settings_or_without_run_info_needs_accept_changes_which_applies_them(
        tmp_path, spanish_shards, tiny_model, one_thread):  # noqa: F811
    out = tmp_path / "run"
    assert "--accept-changes applies to --resume only" in _cli(spanish_shards, tiny_model, out, "--accept-changes").output
    assert _cli(spanish_shards, tiny_model, out, "--max-steps", 2).exit_code == 0
    refused = _cli(spanish_shards, tiny_model, out, "--max-steps", 4, "--learning-rate", "0.002", "--seed", 1,
                   "--per-device-batch-size", 2, "--resume")
    assert refused.exit_code == 2, refused.output
    assert refused.output.strip() == (
        f"Error: --resume: this run differs from {out / 'checkpoint-2'}: per_device_batch_size 1 -> 2; "
        "learning_rate 0.001 -> 0.002; max_steps 2 -> 4; seed 42 -> 1; resume with the same shards and settings, "
        "pass --accept-changes to continue with these changes, or start a new --output-dir"), refused.output

    resumed = _cli(spanish_shards, tiny_model, out, "--max-steps", 4, "--learning-rate", "0.002", "--resume",
                   "--accept-changes")
    assert resumed.exit_code == 0, resumed.output
    assert "changed  learning_rate 0.001 -> 0.002; max_steps 2 -> 4 (--accept-changes: applied)" in resumed.output
    assert _learning_rates(out / "checkpoint-4") == [0.001, 0.001, 0.002, 0.002]  # the new rate is the one used

    (out / "checkpoint-4" / "sfttrain.json").unlink()  # a checkpoint that cannot say what it was trained on
    refused = _cli(spanish_shards, tiny_model, out, "--max-steps", 4, "--learning-rate", "0.002", "--resume")
    assert refused.exit_code == 2, refused.output
    assert f"this run differs from {out / 'checkpoint-4'}: {out / 'checkpoint-4' / 'sfttrain.json'} is missing " \
           "or unreadable, so neither its build nor its settings are known" in refused.output, refused.output

SHARD = "shard-train-00000.arrow"


# -- edited shards (their sha256 updated in the manifest, so only the contract can tell) ------------

def _forge_row0(shards, **change) -> None:
    """Replace columns of the shard's row 0 (`change(row) -> new value` per column), fix the sha256."""
    path = shards / SHARD
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    rows = table.to_pylist()
    for column, edit in change.items():
        rows[0][column] = edit(rows[0])
    table = pa.Table.from_pylist(rows, schema=table.schema)
    with pa.ipc.new_file(str(path), table.schema) as w:
        w.write_table(table)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (shards / "manifest.json").write_text(json.dumps(manifest))


def _pad_labels_set(r):  # the padding after the row's samples is trained
    used = sum(r["seq_lens"])
    return r["labels"][:used] + r["input_ids"][used:]


def _last_sample_shortened(r):  # its last token (EOS, trained) becomes padding
    return r["seq_lens"][:-1] + [r["seq_lens"][-1] - 1]


def _two_merged(r):  # samples 0 and 1 become one: sample 1 would attend to sample 0
    return [r["seq_lens"][0] + r["seq_lens"][1]] + r["seq_lens"][2:]


EDITS = {  # name -> (columns changed, what sfttrain says when it reads the row, what verify says)
    "pad labels set": ({"labels": _pad_labels_set}, "padding at position 58 has label 2, not -100", "padding label"),
    "seq_lens changed": ({"seq_lens": _last_sample_shortened}, "padding at position 57 has label 2, not -100",
                         "padding label"),
    "two samples merged": ({"seq_lens": _two_merged}, "4 seq_lens but 5 sample_ids", "lengths"),
}


def _train_cli(shards, model, out, *extra):
    return run_cli(shards, "--model", model, "--output-dir", out, "--max-steps", 2, "--lora-r", 4, *extra)


@pytest.mark.parametrize("edit", EDITS)
def test_an_edited_shard_is_refused_when_read_and_by_verify_checksums(tmp_path, spanish_shards, tiny_model,  # noqa: F811
                                                                      one_thread, edit):  # noqa: F811
    change, read_error, check = EDITS[edit]
    shards = tmp_path / "copy"
    shutil.copytree(spanish_shards, shards)
    _forge_row0(shards, **change)
    result = _train_cli(shards, tiny_model, tmp_path / "run", "--dataloader-workers", 1)  # read in a worker
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last == (f"Error: {shards / SHARD} row 0: {read_error}; the shard was changed after the build: rebuild "
                    "with `sftprep build --overwrite` (`sftprep verify` checks every shard)"), last
    assert not (tmp_path / "run" / "final").exists()
    result = _train_cli(shards, tiny_model, tmp_path / "run2", "--verify-checksums")
    assert result.exit_code == 2 and "trainable of" not in result.output, result.output  # before the model loads
    assert result.output.startswith(f"Error: --verify-checksums: {shards} fails `sftprep verify` ("), result.output
    assert f"{check}: " in result.output.split("), first:")[0], result.output


def test_two_samples_merged_in_every_column_are_refused_by_verify_checksums(tmp_path, spanish_shards,  # noqa: F811
                                                                            tiny_model):  # noqa: F811
    """Merged in seq_lens and sample_ids alike, the row keeps the contract: only the samples file knows."""
    shards = tmp_path / "copy"
    shutil.copytree(spanish_shards, shards)
    _forge_row0(shards, seq_lens=_two_merged, sample_ids=lambda r: r["sample_ids"][:1] + r["sample_ids"][2:])
    result = _train_cli(shards, tiny_model, tmp_path / "run", "--verify-checksums")
    assert result.exit_code == 2, result.output
    assert "samples file: 2), first: samples.feather: 1 sample(s) listed here are in no shard (first: [1]); " \
           "rebuild with `sftprep build --overwrite`" in result.output, result.output


# -- training that diverges ---------------------------------------------------------------------------


def test_learning_rate_1e30_stops_at_the_first_non_finite_step_keeping_the_last_checkpoint(
        tmp_path, tiny_model, one_thread):  # noqa: F811
    shards = build_shards(tmp_path, SPANISH * 2, packing="none")
    out = tmp_path / "run"
    result = run_cli(shards, "--model", tiny_model, "--output-dir", out, "--learning-rate", "1e30",
                     "--max-steps", 4, "--save-steps", 1, "--lora-r", 4, "--per-device-batch-size", 2)
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: step 2: the loss is nan with --learning-rate 1e+30: training stopped before "
                           "this step changed the weights, no adapter saved; the last good checkpoint is "
                           f"{out / 'checkpoint-1'}"), last
    assert "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["checkpoint-1"]  # no NaN adapter
    kept = load_file(str(out / "checkpoint-1" / "adapter_model.safetensors"))
    assert all(math.isfinite(t.abs().max().item()) for t in kept.values())


def test_a_dead_optimizer_is_warned_about(tmp_path, tiny_model, one_thread, caplog):  # noqa: F811
    """At --learning-rate 1e6 the first step saturates the model: every later gradient is 0, the loss frozen."""
    shards = build_shards(tmp_path, SPANISH * 2, packing="none")
    with caplog.at_level(logging.WARNING, logger="sfttrain"):
        result = train(train_config(shards, tiny_model, tmp_path / "run", learning_rate=1e6, max_steps=3),
                       disable_tqdm=True)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert losses[1] == losses[2]  # frozen
    warned = [r.getMessage() for r in caplog.records if r.name == "sfttrain"]
    assert len(warned) == 1 and warned[0].startswith("Warning: step 2: every gradient is 0 while the loss is "), warned
    assert "--learning-rate 1e+06 is likely too high" in warned[0]
