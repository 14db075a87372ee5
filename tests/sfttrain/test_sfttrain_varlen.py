"""The padding-free path: rows flattened, `cu_seqlens` from `seq_lens`, attention through
`torch.nn.attention.varlen.varlen_attn` registered with transformers as `sfttrain_varlen`. The
kernel is CUDA-only; on CPU the same attention function runs a per-sample SDPA reference, so
everything around the kernel (collator, registration, window, GQA, scaling) is tested here."""

import numpy as np
import pytest
import torch

from sfttrain import ConfigError, train
from sfttrain.attention import (REAL_TOKENS, VARLEN, AttentionPath, choose_attention, model_traits,
                                reference_varlen, register_varlen)
from sfttrain.data import PackedCollator
from tests.sfttrain_helpers import (family_config, family_model, loss_and_grads, loss_and_grads_alone,  # noqa: F401
                                    one_thread, packed_row, spanish_shards, tiny_model, train_config, worst_relative)


@pytest.mark.parametrize("family,checkpointing", [("llama", False), ("mistral", False), ("mistral", True),
                                                  ("qwen2", False), ("gemma3_text", False), ("phi3", False)])
def test_flattened_rows_through_the_varlen_function_train_like_the_samples_alone(family, checkpointing):
    register_varlen()
    model = family_model(family, VARLEN)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = [packed_row((20, 13), seed=1), packed_row((27,), seed=2)]
    batch = PackedCollator(AttentionPath(VARLEN, "varlen"), pad_id=0)(rows)
    assert batch["input_ids"].shape == (1, 60) and batch.pop(REAL_TOKENS) == 60  # no padding at all
    assert batch["cu_seq_lens_q"].tolist() == [0, 20, 33, 60]
    packed_loss, packed_grads = loss_and_grads(model, **batch)

    alone_model = family_model(family, "sdpa")  # same seed, same weights; the model's own masking
    labels = batch["labels"]
    loss0, grads0 = loss_and_grads_alone(alone_model, rows[0], labels[:, :33])
    loss1, grads1 = loss_and_grads_alone(alone_model, rows[1], labels[:, 33:])
    assert packed_loss == pytest.approx(loss0 + loss1, rel=1e-5)
    assert worst_relative(packed_grads, {k: grads0[k] + grads1[k] for k in grads0}) < 1e-5


def test_reference_kernel_applies_the_window_and_gqa():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, heads, 8, generator=gen) for heads in (4, 2, 2))
    cu = torch.tensor([0, 12], dtype=torch.int32)
    out = reference_varlen(q, k, v, cu, window=2)
    # token 11 of head 3 (kv head 1) sees tokens 9, 10, 11 only
    scores = (q[11, 3] @ k[9:12, 1].T) / 8 ** 0.5
    expected = torch.softmax(scores, -1) @ v[9:12, 1]
    assert torch.allclose(out[11, 3], expected, atol=1e-6)


def test_varlen_on_cpu_trains_like_sdpa_end_to_end(tiny_model, spanish_shards, tmp_path, one_thread):  # noqa: F811
    runs = {}
    for impl in ("sdpa", "varlen"):
        runs[impl] = train(train_config(spanish_shards, tiny_model, tmp_path / impl, max_steps=2,
                                        attn_implementation=impl), disable_tqdm=True)
    assert runs["varlen"].summary["attention"].startswith("torch varlen_attn varlen")
    losses = {k: [h["loss"] for h in r.log_history if "loss" in h] for k, r in runs.items()}
    assert losses["varlen"] == pytest.approx(losses["sdpa"], rel=1e-5)


def test_varlen_is_refused_for_soft_capping_models():
    with pytest.raises(ConfigError, match="soft-caps attention logits"):
        choose_attention("varlen", cuda=False, half=False, traits=model_traits(family_config("gemma2").to_dict()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen_attn's kernel is CUDA-only")
def test_cuda_kernel_matches_the_reference():
    from torch.nn.attention.varlen import varlen_attn

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(60, 8, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(60, 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    cu = torch.tensor([0, 20, 33, 60], device="cuda", dtype=torch.int32)
    out = varlen_attn(q, k, v, cu, cu, 27, 27, window_size=(7, 0), enable_gqa=True)
    ref = reference_varlen(q.float(), k.float(), v.float(), cu, window=7)
    assert (out.float() - ref).abs().max().item() < 2e-2


def test_auto_uses_bf16_and_varlen_only_where_a_gpu_supports_them():
    from sfttrain import config_from_dict
    from sfttrain.model import bf16_on, resolve_dtype

    config = config_from_dict({"shards": "s", "model": "m", "output_dir": "o"})
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert bf16_on(config) is gpu_bf16
    assert resolve_dtype(config) == (torch.bfloat16 if gpu_bf16 else torch.float32)
    assert not bf16_on(config_from_dict({"shards": "s", "model": "m", "output_dir": "o", "bf16": False}))
    path = choose_attention("auto", cuda=False, half=False, traits={"sdpa": True})
    assert path.mode == "positions" and "CUDA-only" in path.why


def test_varlen_on_a_model_without_attention_functions_is_one_line(spanish_shards, tmp_path):  # noqa: F811
    """Was: a KeyError traceback from Falcon's own attention classes while loading (Falcon takes registered
    functions since transformers 5.25; Bloom's class still does not)."""
    from click.testing import CliRunner

    from sfttrain.cli import main
    from tests.sfttrain_helpers import save_family_model

    model = save_family_model(tmp_path / "bloom", "bloom")
    result = CliRunner().invoke(main, ["run", str(spanish_shards), "--model", str(model), "--output-dir",
                                       str(tmp_path / "run"), "--attn-implementation", "varlen", "--max-steps", "1"])
    assert result.exit_code == 2, result.output
    assert "transformers' bloom class takes no registered attention function" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
