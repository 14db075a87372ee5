"""The loss at trained positions only (LM head on the kept rows, chunked fp32 cross-entropy)
equals the plain full-logits loss, in value and gradients."""

import numpy as np
import pytest
import torch

from sfttrain.attention import IGNORE_INDEX, REAL_TOKENS, AttentionPath
from sfttrain.data import PackedCollator
from sfttrain.loss import LossMeter, next_token_targets, per_token_loss, trained_head
from tests.sfttrain_helpers import family_model


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
@pytest.mark.parametrize("family", ["llama", "gemma2"])  # Gemma-2 soft-caps its logits after the head
def test_trained_positions_loss_equals_the_full_logits_loss(family):
    model = family_model(family, "eager")
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
    with trained_head(model, keep):
        outputs = model(**batch, use_cache=False)
    assert outputs.logits.shape == (targets.numel(), 256)  # no (B, L, V) logits: only trained positions
    meter = LossMeter()
    fast = per_token_loss(outputs, labels, meter=meter, chunk=5)  # several chunks, the last one short
    fast.backward()
    assert fast.item() == pytest.approx(plain.item(), rel=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, plain_grads[n], rtol=1e-5, atol=1e-8), n
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
    with trained_head(model, keep):
        loss = per_token_loss(model(**batch, use_cache=False), labels)
    loss.backward()  # still part of the graph: a rank with an empty micro-batch must not hang DDP
    assert loss.item() == 0.0
