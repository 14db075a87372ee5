"""Exact resume after SIGTERM, and per-trained-token loss normalisation across gradient accumulation."""

import json
import os
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import TrainerCallback

from sfttrain import train
from tests.sfttrain_helpers import build_shards, one_thread, tiny_model, train_config  # noqa: F401  (fixtures)

PAIRS = [(f"Item {i}: what number comes after {i}?", f" {i + 1}" + " indeed" * (i % 3)) for i in range(10)]


class SignalAt(TrainerCallback):
    """Sends `signum` to this process just before optimizer step `step` runs."""

    def __init__(self, step: int, signum=signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)


def _adapter(folder) -> dict:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def _losses(result) -> list[float]:
    return [h["loss"] for h in result.log_history if "loss" in h]


def test_sigterm_saves_a_checkpoint_and_resume_continues_exactly(tmp_path, tiny_model, one_thread):  # noqa: F811
    # 10 rows, 2 rows x 2 micro-batches per step: 6 steps span three shuffled epochs (resume lands mid-epoch)
    shards = build_shards(tmp_path, PAIRS, packing="none")
    flat = dict(max_steps=6, gradient_accumulation_steps=2, lora_dropout=0.1, neftune_alpha=5.0,
                learning_rate=5e-3, warmup_steps=2)
    straight = train(train_config(shards, tiny_model, tmp_path / "a", **flat), disable_tqdm=True)

    out = tmp_path / "b"
    handler_before = signal.getsignal(signal.SIGTERM)
    stopped = train(train_config(shards, tiny_model, out, **flat), callbacks=[SignalAt(3)], disable_tqdm=True)
    assert stopped.interrupted_by == "SIGTERM" and stopped.final_dir is None
    assert stopped.global_step == 3
    ckpt = out / "checkpoint-3"
    assert stopped.checkpoint == str(ckpt)
    for f in ("adapter_model.safetensors", "tokenizer.json", "trainer_state.json", "optimizer.pt", "sfttrain.json"):
        assert (ckpt / f).is_file(), f
    assert json.loads((ckpt / "sfttrain.json").read_text())["config"]["train"]["max_steps"] == 6
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the previous handler is given back

    resumed = train(train_config(shards, tiny_model, out, resume=True, **flat), disable_tqdm=True)
    assert resumed.summary["resume_from"] == str(ckpt)
    assert resumed.global_step == 6
    assert _losses(stopped) == pytest.approx(_losses(straight)[:3], rel=1e-6)
    assert _losses(resumed) == pytest.approx(_losses(straight), rel=1e-5)  # the history carries steps 1-3
    assert resumed.metrics["trained_tokens_seen"] == straight.metrics["trained_tokens_seen"]  # counted on
    a, b = _adapter(straight.final_dir), _adapter(resumed.final_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-6, k


def test_gradient_accumulation_normalises_per_trained_token(tmp_path, tiny_model, one_thread):  # noqa: F811
    # Rows train 2, 3 or 4 tokens: a mean per micro-batch would weight them unequally. With SGD
    # (no Adam rescaling) one step of 4 rows x 1 equals one step of 1 row x 4 only if the loss is
    # summed over trained tokens and divided by the step's total.
    shards = build_shards(tmp_path, PAIRS[:4], packing="none")
    flat = dict(max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0, shuffle=False, lora_r=2,
                lr_scheduler="constant")
    one = train(train_config(shards, tiny_model, tmp_path / "one", per_device_batch_size=4, **flat), disable_tqdm=True)
    acc = train(train_config(shards, tiny_model, tmp_path / "acc", per_device_batch_size=1,
                             gradient_accumulation_steps=4, **flat), disable_tqdm=True)
    a, b = _adapter(one.final_dir), _adapter(acc.final_dir)
    moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)
    assert moved > 1e-3  # LoRA B starts at zero: the step did change the adapter
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-5, k
    assert one.train_loss == pytest.approx(acc.train_loss, rel=1e-5)

