"""sfttrain never trains on data or weights it cannot vouch for: a diverged step stops the run
(issue 26)."""

import logging
import math

from safetensors.torch import load_file

from sfttrain import train
from tests.sfttrain_helpers import SPANISH, build_shards, one_thread, tiny_model, train_config  # noqa: F401
from tests.test_sfttrain_guards import run_cli


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
