"""Packed samples never see each other: a packed row trains exactly like its samples one by one,
for every architecture family (sliding windows, GQA, soft-capping), with and without gradient
checkpointing."""

import numpy as np
import pytest
import torch

from sfttrain.attention import (REAL_TOKENS, AttentionPath, IsolationError, check_isolation, choose_attention,
                                model_traits)
from sftprep.write.shards import row_positions
from sfttrain.checks import open_build
from sfttrain.data import PackedCollator, ShardDataset
from tests.sfttrain_helpers import (FAMILIES, WINDOW, family_config, family_model, loss_and_grads,  # noqa: F401
                                    loss_and_grads_alone, one_thread, packed_row, spanish_shards, tiny_model,
                                    worst_relative)



def _path(family: str) -> AttentionPath:
    return choose_attention("auto", cuda=False, half=False, traits=model_traits(family_config(family).to_dict()))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-ckpt"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_row_trains_exactly_like_its_samples_alone(family, checkpointing):
    path = _path(family)
    model = family_model(family, path.impl)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    row = packed_row()
    batch = PackedCollator(path, pad_id=0)([row])
    assert batch["input_ids"].shape == (1, 64)  # 60 tokens + 4 pads, no mask: transformers builds it
    assert "attention_mask" not in batch
    assert batch.pop(REAL_TOKENS) == 60

    packed_loss, packed_grads = loss_and_grads(model, **batch)
    alone_loss, alone_grads = loss_and_grads_alone(model, row, batch["labels"])
    assert packed_loss == pytest.approx(alone_loss, rel=1e-5)
    assert worst_relative(packed_grads, alone_grads) < 1e-5

    if FAMILIES[family].get("sliding_window"):
        # What the old path fed the model: a dense block-diagonal mask of ours, which makes
        # transformers skip the window. Proves these samples are long enough for the window to matter.
        dense_loss, dense_grads = loss_and_grads(model, **batch, attention_mask=_block_diagonal(row, 64))
        assert worst_relative(dense_grads, alone_grads) > 1e-3


def _block_diagonal(row, length):
    seg = torch.from_numpy(row_positions(row["seq_lens"], length)[1])
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return ((seg[:, None] == seg[None, :]) & causal)[None, None]


def test_two_padded_rows_in_one_batch_match_their_samples(tiny_model, spanish_shards):  # noqa: F811
    model = family_model("mistral", "sdpa")
    rows = [packed_row((20, 13), seed=1), packed_row((27,), seed=2)]  # padded to 40: a one-sample row and a packed one
    batch = PackedCollator(AttentionPath("sdpa", "positions"), pad_id=0)(rows)
    assert batch.pop(REAL_TOKENS) == 60 and batch["input_ids"].shape == (2, 40)
    packed_loss, packed_grads = loss_and_grads(model, **batch)
    loss0, grads0 = loss_and_grads_alone(model, rows[0], batch["labels"][:1])
    loss1, grads1 = loss_and_grads_alone(model, rows[1], batch["labels"][1:])
    assert packed_loss == pytest.approx(loss0 + loss1, rel=1e-5)
    assert worst_relative(packed_grads, {k: grads0[k] + grads1[k] for k in grads0}) < 1e-5


def test_eager_and_sdpa_agree_on_a_windowed_model():
    row = packed_row()
    losses = []
    for impl in ("eager", "sdpa"):
        batch = PackedCollator(AttentionPath(impl, "positions"), pad_id=0)([row])
        batch.pop(REAL_TOKENS)
        losses.append(loss_and_grads(family_model("mistral", impl), **batch)[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# -- choosing the path -------------------------------------------------------------------------

def test_auto_picks_eager_for_a_model_without_sdpa_and_says_why():
    path = _path("gemma2")  # transformers refuses sdpa for Gemma-2 at load time
    assert (path.impl, path.mode) == ("eager", "positions")
    assert "no sdpa path" in path.why
    assert _path("mistral").impl == "sdpa"


def test_auto_on_a_gpu_prefers_a_varlen_kernel_and_avoids_it_for_soft_capping():
    traits = model_traits(family_config("mistral").to_dict())
    gpu = choose_attention("auto", cuda=True, half=True, traits=traits)
    assert gpu.mode == "varlen"  # flash-attn when installed, else torch's varlen_attn (torch 2.13 has it)
    fp32 = choose_attention("auto", cuda=True, half=False, traits=traits)
    assert fp32.mode == "positions" and "fp32" in fp32.why
    gemma2 = choose_attention("auto", cuda=True, half=True, traits=model_traits(family_config("gemma2").to_dict()))
    if gemma2.impl == "sfttrain_varlen":
        pytest.fail("torch varlen_attn cannot soft-cap: Gemma-2 must not get it")


def test_model_traits_find_the_windows_layers_really_use():
    assert model_traits(family_config("mistral").to_dict())["window"] == WINDOW
    assert model_traits(family_config("qwen2").to_dict())["window"] == WINDOW
    assert model_traits(family_config("qwen2", use_sliding_window=False, layer_types=None).to_dict())["window"] is None
    qwen25 = {"model_type": "qwen2", "sliding_window": 131072, "use_sliding_window": False}  # as on the Hub
    assert model_traits(qwen25)["window"] is None
    assert model_traits(family_config("llama").to_dict())["window"] is None
    gemma2 = model_traits(family_config("gemma2").to_dict())
    assert gemma2["window"] == WINDOW and gemma2["softcap"] and gemma2["sdpa"] is False


# -- the start-up probe ------------------------------------------------------------------------

class _DenseMaskCollator(PackedCollator):
    """The old path: a dense block-diagonal mask of ours on top of the restarting positions."""

    def __call__(self, rows):
        batch = super().__call__(rows)
        batch["attention_mask"] = _block_diagonal(rows[0], batch["input_ids"].shape[1])
        return batch


class _LeakyCollator(PackedCollator):
    """What a model that ignores position ids would see: one plain causal sequence."""

    def __call__(self, rows):
        batch = super().__call__(rows)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
        return batch


def test_isolation_probe_passes_the_real_path_and_refuses_leaks_and_lost_windows():
    model = family_model("mistral", "sdpa")
    path = AttentionPath("sdpa", "positions")
    assert check_isolation(model, PackedCollator(path, pad_id=0), vocab_size=256, window=WINDOW,
                           max_length=512) < 1e-4
    with pytest.raises(IsolationError, match="packed samples are not isolated"):
        check_isolation(model, _LeakyCollator(path, pad_id=0), vocab_size=256, window=WINDOW, max_length=512)
    with pytest.raises(IsolationError, match=f"a sample of {WINDOW + 4} tokens"):  # longer than the window
        check_isolation(model, _DenseMaskCollator(path, pad_id=0), vocab_size=256, window=WINDOW, max_length=512)


def test_packed_shard_row_trains_like_its_samples(tiny_model, spanish_shards):  # noqa: F811
    """The real shards and the real Llama fixture through the dataset and collator."""
    from transformers import AutoModelForCausalLM

    manifest = open_build(spanish_shards)
    row = ShardDataset(spanish_shards, manifest)[0]
    assert len(row["seq_lens"]) == 5  # all five samples share one packed row
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    batch = PackedCollator(AttentionPath("sdpa", "positions"), pad_id=manifest["tokenizer"]["pad_id"])([row])
    batch.pop(REAL_TOKENS)
    packed, _ = loss_and_grads(model, **batch)
    alone, _ = loss_and_grads_alone(model, row, batch["labels"])
    assert packed == pytest.approx(alone, rel=1e-5)


@pytest.mark.parametrize("family,impl", [("gemma2", "eager"), ("mistral", "sdpa")])
def test_windowed_families_train_end_to_end_under_auto(family, impl, spanish_shards, tmp_path,  # noqa: F811
                                                       one_thread):
    """Gemma-2 used to be refused at load under auto (transformers has no sdpa path for it)."""
    from sfttrain import train
    from tests.sfttrain_helpers import save_family_model, train_config

    model = save_family_model(tmp_path / family, family)
    result = train(train_config(spanish_shards, model, tmp_path / "run", max_steps=2), disable_tqdm=True)
    assert result.summary["attention"].startswith(impl + " + packed mask")
    assert result.summary["isolation_check"] < 1e-4  # probe samples of window + 4 tokens
    assert result.global_step == 2 and np.isfinite(result.train_loss)
