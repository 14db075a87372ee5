"""The loss at trained positions only (LM head on the kept rows, chunked fp32 cross-entropy)
equals the plain full-logits loss, in value and gradients."""

import numpy as np
import pytest
import torch

from sfttrain.attention import IGNORE_INDEX, REAL_TOKENS, AttentionPath
from sfttrain.data import PackedCollator
from sfttrain import loss as loss_module
from sfttrain.loss import LossMeter, chunk_rows, next_token_targets, per_token_loss, trained_head
from tests.sfttrain_helpers import _SMALL, family_model


def _model(family):
    """A tiny model of `family`; Cohere and Granite scale the logits after their head."""
    if family not in ("cohere", "granite"):
        return family_model(family, "eager")
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"cohere": dict(logit_scale=0.5), "granite": dict(logits_scaling=3.0)}[family]
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **{**_SMALL, **extra})
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()


def _plain_loss(logits, labels):
    """The textbook computation: every position's logits, shifted, upcast, mean over trained tokens."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    return torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                             shift_labels.reshape(-1), ignore_index=IGNORE_INDEX)


def _batch():
    gen = np.random.default_rng(3)
    rows = []
    for lens in ((12, 9), (17,)):
        n = sum(lens)
        ids = gen.integers(3, 256, size=n).astype(np.int32)
        labels = np.where(np.arange(n) % 3 == 0, IGNORE_INDEX, ids).astype(np.int32)  # 2 of 3 trained
        rows.append({"input_ids": ids, "labels": labels, "seq_lens": np.array(lens, np.int32)})
    batch = PackedCollator(AttentionPath("eager", "positions"), pad_id=0)(rows)
    assert batch.pop(REAL_TOKENS) == 38  # 24 columns x 2 rows, 10 of them padding
    return batch


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma2", "cohere", "granite"])  # soft-capping, logit scales
def test_trained_positions_loss_equals_the_full_logits_loss(family):
    model = _model(family)
    batch = _batch()
    labels = batch.pop("labels")

    model.zero_grad()
    full = model(**batch, use_cache=False).logits
    assert full.shape == (2, 24, 256)
    plain = _plain_loss(full, labels)
    plain.backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    keep, targets = next_token_targets(labels)
    with trained_head(model, keep) as head:
        outputs = model(**batch, use_cache=False)
    assert outputs.logits.shape == (1, 256)  # the model computes one row's logits, to check ours against
    meter = LossMeter()
    fast = per_token_loss(outputs, labels, meter=meter, head=head, chunk=5)  # several chunks, the last one short
    fast.backward()
    assert fast.item() == pytest.approx(plain.item(), rel=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, plain_grads[n], rtol=1e-5, atol=1e-6 * float(plain_grads[n].abs().max())), n
    taken = meter.take()
    assert taken["trained"] == targets.numel() == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert taken["loss_sum"] == pytest.approx(plain.item() * targets.numel(), rel=1e-6)
    assert 0 <= taken["correct"] <= taken["trained"] and meter.take()["trained"] == 0


def test_next_token_targets_keep_the_positions_before_trained_labels():
    labels = torch.tensor([[-100, -100, 5, 6, -100, 7, -100, -100]])
    keep, targets = next_token_targets(labels)
    assert keep[0].nonzero().reshape(-1).tolist() == [1, 2, 4]
    assert targets.tolist() == [5, 6, 7]


@pytest.mark.slow
def test_a_batch_with_nothing_trained_gives_zero_loss_with_a_gradient():
    model = family_model("llama", "eager")
    batch = _batch()
    labels = torch.full_like(batch.pop("labels"), IGNORE_INDEX)
    keep, _ = next_token_targets(labels)
    with trained_head(model, keep) as head:
        loss = per_token_loss(model(**batch, use_cache=False), labels, head=head)
    loss.backward()  # still part of the graph: a rank with an empty micro-batch must not hang DDP
    assert loss.item() == 0.0


def test_a_loss_chunk_holds_at_most_256_mib_of_logits_whatever_the_vocabulary():
    assert chunk_rows(32_000) == 2_097 and chunk_rows(129_280) == 519 and chunk_rows(262_144) == 256
    for vocab in (256, 32_000, 129_280, 262_144, 10**9):
        assert chunk_rows(vocab) * 4 * vocab <= 256 << 20 or chunk_rows(vocab) == 1


class _LargestLogits(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most elements of any logits-shaped tensor (`vocab` columns, not a weight's 64 rows)
    made while active."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab and t.numel() != 64 * self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.slow
def test_no_more_logits_than_one_chunk_exist_in_forward_and_backward(monkeypatch):
    monkeypatch.setattr(loss_module, "LOGITS_BUDGET", 4 * 256 * 6)  # 6 rows of a 256 vocabulary
    monkeypatch.setattr(loss_module.chunk_rows, "__defaults__", (loss_module.LOGITS_BUDGET,))
    model = family_model("llama", "eager")
    batch = _batch()
    labels = batch.pop("labels")
    keep, targets = next_token_targets(labels)
    assert targets.numel() == 25
    with _LargestLogits(256) as seen:
        with trained_head(model, keep) as head:
            loss = per_token_loss(model(**batch, use_cache=False), labels, head=head)
        loss.backward()
    assert seen.largest <= 6 * 256  # never the 25 trained rows' (25, 256) logits at once


def test_a_model_whose_logits_are_not_its_heads_output_is_refused():
    model = family_model("llama", "eager")
    batch = _batch()
    labels = batch.pop("labels")
    keep, _ = next_token_targets(labels)
    with trained_head(model, keep) as head:
        outputs = model(**batch, use_cache=False)
    head.transform = lambda logits: logits * 2  # what an unknown family's forward might do
    with pytest.raises(ValueError, match="logits of this llama model are not its LM head's output"):
        per_token_loss(outputs, labels, head=head)
