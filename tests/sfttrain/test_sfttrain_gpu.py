"""GPU-only: QLoRA / 8-bit training for real, and the flash-attention varlen path's isolation."""

import importlib.util
import math

import pytest
import torch

from sfttrain import train
from tests.sfttrain_helpers import spanish_shards, tiny_model, train_config  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes, flash-attn)")]


@pytest.mark.parametrize("flags,described", [
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "4-bit nf4 double-quant"),
    ({"load_in_8bit": True}, "8-bit"),
])
def test_quantized_lora_trains_and_saves_the_adapter(tmp_path, spanish_shards, tiny_model, flags, described):  # noqa: F811
    config = train_config(spanish_shards, tiny_model, tmp_path / "run", bf16=True, gradient_checkpointing=True,
                          optim="paged_adamw_32bit", max_steps=3, **flags)
    result = train(config, disable_tqdm=True)
    assert described in result.summary["quantization"]
    assert math.isfinite(result.train_loss)
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_varlen_packed_loss_equals_the_samples_one_by_one(spanish_shards, tiny_model):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from sfttrain.attention import AttentionPath
    from sfttrain.checks import open_build
    from sfttrain.data import PackedCollator, ShardDataset

    row = ShardDataset(spanish_shards, open_build(spanish_shards))[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="flash_attention_2",
                                                 dtype=torch.bfloat16).cuda()
    batch = PackedCollator(AttentionPath("flash_attention_2", "varlen"), pad_id=2)([row])
    batch.pop("num_real_tokens")
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.no_grad():
        packed = model(**batch, num_items_in_batch=1).loss.item()
        alone, start = 0.0, 0
        for n in row["seq_lens"]:
            ids = torch.tensor(row["input_ids"][start:start + n], dtype=torch.long, device="cuda")[None]
            labels = torch.tensor(row["labels"][start:start + n], dtype=torch.long, device="cuda")[None]
            alone += model(input_ids=ids, labels=labels, num_items_in_batch=1).loss.item()
            start += n
    assert packed == pytest.approx(alone, rel=1e-2)
