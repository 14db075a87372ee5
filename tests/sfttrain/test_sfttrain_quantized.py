"""QLoRA (NF4, double quant) and LLM.int8 LoRA train wherever bitsandbytes runs, CPU included:
the loss falls, the frozen base stays quantized, the adapter is saved."""

import math

import pytest
from safetensors.torch import load_file

from sfttrain import train
from tests.sfttrain_helpers import one_thread, spanish_shards, tiny_model, train_config  # noqa: F401  (fixtures)

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("flags,described,optim", [
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "gradient_checkpointing": True},
     "4-bit nf4 double-quant, compute float32", "paged_adamw_8bit"),  # the QLoRA recipe's optimizer family
    ({"load_in_8bit": True}, "8-bit (bitsandbytes LLM.int8)", "adamw_torch"),
], ids=["nf4", "int8"])
def test_quantized_lora_learns(tmp_path, spanish_shards, tiny_model, one_thread, flags, described, optim):  # noqa: F811
    import bitsandbytes as bnb
    import torch
    from transformers import TrainerCallback

    seen = {}

    class Inspect(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["quantized"] = sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
            seen["device"] = next(model.parameters()).device.type

    config = train_config(spanish_shards, tiny_model, tmp_path / "run", max_steps=8, learning_rate=1e-2,
                          lr_scheduler="constant", optim=optim, **flags)
    result = train(config, callbacks=[Inspect()], disable_tqdm=True)
    assert result.summary["quantization"] == described
    assert seen["quantized"] >= 14  # q, k, v, o, gate, up, down in both layers
    assert seen["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.3, losses  # it learns
    adapter = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 1e-3
