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


# -- merging a QLoRA adapter: into the base it was trained on -----------------------------------------

@pytest.fixture(scope="module")
def nf4_adapter(tmp_path_factory, spanish_shards, tiny_model):  # noqa: F811
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    config = train_config(spanish_shards, tiny_model, tmp_path_factory.mktemp("qlora") / "run", max_steps=3,
                          learning_rate=1e-2, load_in_4bit=True, bnb_4bit_quant_type="nf4")
    final = train(config, disable_tqdm=True).final_dir
    torch.set_num_threads(before)
    return final


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model.eval()(ids).logits


def test_merging_a_qlora_adapter_folds_it_into_the_dequantized_nf4_base(tmp_path, nf4_adapter, tiny_model):  # noqa: F811
    import torch
    from click.testing import CliRunner
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from sfttrain.cli import main

    result = CliRunner().invoke(main, ["merge", nf4_adapter, "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert "into the dequantized 4-bit nf4 double-quant base it was trained on" in result.output
    ids = torch.tensor([[1, 100, 200, 300, 400, 500, 600]])
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    trained = _logits(PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=nf4, dtype=torch.float32), nf4_adapter), ids)
    merged = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids)
    dequantized = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=nf4, dtype=torch.float32)
    unmerged = _logits(PeftModel.from_pretrained(dequantized.dequantize(), nf4_adapter), ids)
    full_precision = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                                       nf4_adapter).merge_and_unload(), ids)
    assert (merged - unmerged).abs().max().item() < 1e-5  # the adapter folded into the dequantized weights
    # against the model as it trained: bitsandbytes' CPU 4-bit matmul rounds (measured 3.5e-3 with 0.50.2,
    # 0 with older kernels), an order of magnitude below what merging into the full-precision weights is off
    into_dequantized = (merged - trained).abs().max().item()
    into_full = (full_precision - trained).abs().max().item()  # what merge did before: measured 6.0e-2
    assert into_dequantized < into_full / 5 and into_full > 1e-2, (into_dequantized, into_full)


def test_merging_a_qlora_adapter_without_bitsandbytes_is_refused_with_the_reason(tmp_path, nf4_adapter,
                                                                                 monkeypatch):
    import importlib.util

    from click.testing import CliRunner

    from sfttrain.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    result = CliRunner().invoke(main, ["merge", nf4_adapter, "--out", str(tmp_path / "merged")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == (
        f"Error: {nf4_adapter} was trained on a 4-bit nf4 double-quant base: merging it needs bitsandbytes to rebuild "
        "that base and dequantize it (pip install bitsandbytes); merged into the full-precision weights, the result "
        "would not be the model that was trained")
    assert not (tmp_path / "merged").exists()
