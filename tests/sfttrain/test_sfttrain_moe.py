"""MoE models: the router load-balancing loss is added as the model's own forward adds it (and logged
as `aux_loss`), and `sfttrain run`'s defaults train them, routers never adapted."""

import pytest
import torch
from click.testing import CliRunner

from sfttrain import ConfigError, config_from_dict
from sfttrain.attention import REAL_TOKENS, AttentionPath
from sfttrain.cli import main
from sfttrain.data import PackedCollator
from sfttrain.model import apply_lora
from tests.sfttrain_helpers import (family_model, one_thread, packed_row, save_family_model,  # noqa: F401
                                    spanish_shards, worst_relative)

MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
COEF = 0.02


def _trainer(model, tmp_path, accumulation: int = 1):
    from transformers import TrainingArguments

    from sfttrain.trainer import ShardTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                             gradient_accumulation_steps=accumulation)
    return ShardTrainer(model=model, args=args)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _trained(labels) -> torch.Tensor:
    return (labels[:, 1:] != -100).sum()


def _sfttrain_loss(trainer, model, rows):
    """ShardTrainer's loss of a batch of `rows` (padded, positions path) and its gradients."""
    batch = PackedCollator(AttentionPath("sdpa", "positions"), pad_id=0)(rows)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=_trained(batch["labels"]))
    return loss, _grads(model, loss)


@pytest.mark.parametrize("family", MOE)
def test_router_aux_loss_is_the_models_own_on_each_sample_alone(family, tmp_path, one_thread):  # noqa: F811
    """One sample in a padded row: loss and gradients of the model's own forward with labels on the sample
    alone (its CE + router_aux_loss_coef x aux), pads left out of the balance."""
    model = family_model(family, "sdpa", output_router_logits=True, router_aux_loss_coef=COEF)
    trainer = _trainer(model, tmp_path)
    for seed, n in ((1, 13), (2, 21)):  # padded to 16 and 24
        row = packed_row((n,), seed=seed)
        ours, our_grads = _sfttrain_loss(trainer, model, [row])
        ids = torch.tensor(row["input_ids"], dtype=torch.long)[None]
        labels = PackedCollator(AttentionPath("sdpa", "positions"), pad_id=0)([row])["labels"][:, :n]
        own = model(input_ids=ids, labels=labels, num_items_in_batch=_trained(labels))
        assert ours.item() == pytest.approx(own.loss.item(), rel=1e-6)
        assert own.loss.item() - (own.loss - COEF * own.aux_loss).item() > 0.01  # the aux term is not nothing
        assert worst_relative(our_grads, _grads(model, own.loss)) < 1e-5
    logged = trainer.meter.take()
    assert logged["aux_batches"] == 2 and logged["aux_sum"] > 2 * 1.0  # balanced: aux ~ 1 x layers


@pytest.mark.parametrize("family", MOE)
def test_packed_row_aux_loss_is_the_models_forward_on_the_same_row(family, tmp_path, one_thread):  # noqa: F811
    model = family_model(family, "sdpa", output_router_logits=True, router_aux_loss_coef=COEF)
    row = packed_row((20, 13, 24), seed=3)  # 57 tokens, 7 pads
    ours, our_grads = _sfttrain_loss(_trainer(model, tmp_path), model, [row])
    batch = PackedCollator(AttentionPath("sdpa", "positions"), pad_id=0)([row])
    batch.pop(REAL_TOKENS)
    real = {k: v[:, :57] for k, v in batch.items()}  # the same row without its pads
    own = model(**real, num_items_in_batch=_trained(real["labels"]))
    assert ours.item() == pytest.approx(own.loss.item(), rel=1e-6)
    assert worst_relative(our_grads, _grads(model, own.loss)) < 1e-5


def test_aux_term_weighs_the_same_whatever_the_gradient_accumulation(tmp_path, one_thread):  # noqa: F811
    """Per optimizer step the aux term is the mean over its micro-batches: two micro-batches of one row
    each weigh it as much as one micro-batch does."""
    model = family_model("mixtral", "sdpa", output_router_logits=True, router_aux_loss_coef=1.0)
    rows = [packed_row((16,), seed=5)]
    one, _ = _sfttrain_loss(_trainer(model, tmp_path / "a"), model, rows)
    two = _trainer(model, tmp_path / "b", accumulation=2)
    half, _ = _sfttrain_loss(two, model, rows)
    aux = two.meter.take()["aux_sum"]
    assert one.item() - half.item() == pytest.approx(aux / 2, rel=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "llama4_text"])
def test_defaults_train_moe_models_and_never_adapt_routers(family, spanish_shards, tmp_path, one_thread):  # noqa: F811
    """Were: exit 2 (peft: ParamWrapper does not work with lora_dropout != 0) on Mixtral / Qwen3-MoE, and an
    AttributeError traceback on Llama-4 (peft wrapped its router, whose forward returns a tuple)."""
    moe = {"output_router_logits": True, "router_aux_loss_coef": COEF} if family != "llama4_text" else {}
    model = save_family_model(tmp_path / family, family, **moe)
    result = CliRunner().invoke(main, ["run", str(spanish_shards), "--model", str(model), "--output-dir",
                                       str(tmp_path / "run"), "--max-steps", "2", "--logging-steps", "1"])
    assert result.exit_code == 0, result.output
    assert "LoRA r=16 alpha=16 dropout=0.05" in result.output  # the defaults
    assert "all-linear on this MoE model:" in result.output and "not adapted:" in result.output
    assert ("aux_loss" in result.output) == bool(moe)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "final" / "adapter_model.safetensors"), "pt") as f:
        adapted = list(f.keys())
    assert adapted and not any(".router." in k or ".gate." in k for k in adapted)


def test_explicit_expert_targets_with_dropout_say_the_fix():
    model = family_model("mixtral", "eager")
    config = config_from_dict({"shards": "s", "model": "m", "output_dir": "o", "target_modules": "q_proj,w1,w2,w3"})
    with pytest.raises(ConfigError, match="pass --lora-dropout 0"):
        apply_lora(model, config)
