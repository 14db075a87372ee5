"""Packed samples never see each other: a packed row trains exactly like its samples one by one."""

import numpy as np
import pytest
import torch

from sfttrain.attention import AttentionPath, IsolationError, check_isolation
from sfttrain.checks import open_build
from sfttrain.data import PackedCollator, ShardDataset
from tests.sfttrain_helpers import spanish_shards, tiny_model  # noqa: F401  (fixtures)


def _summed_loss(model, **inputs) -> float:
    with torch.no_grad():  # num_items_in_batch=1 turns the model's mean into a sum over trained tokens
        return model(**inputs, num_items_in_batch=1).loss.item()


@pytest.mark.parametrize("impl,kind", [("sdpa", "bool"), ("eager", "additive")])
def test_packed_row_loss_equals_the_samples_run_one_by_one(tiny_model, spanish_shards, impl, kind):  # noqa: F811
    from transformers import AutoModelForCausalLM

    manifest = open_build(spanish_shards)
    row = ShardDataset(spanish_shards, manifest)[0]
    assert len(row["seq_lens"]) == 5  # all five samples share one packed row
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=impl)
    collate = PackedCollator(AttentionPath(impl, "block_mask", kind), pad_id=manifest["tokenizer"]["pad_id"])

    packed = _summed_loss(model, **collate([row]))

    one_by_one, start = 0.0, 0
    for n in row["seq_lens"]:
        ids = torch.tensor(row["input_ids"][start:start + n], dtype=torch.long)[None]
        labels = torch.tensor(row["labels"][start:start + n], dtype=torch.long)[None]
        one_by_one += _summed_loss(model, input_ids=ids, labels=labels)
        start += n
    assert packed == pytest.approx(one_by_one, rel=1e-5)

    # The same row with positions running on and a plain causal mask: samples leak into each other.
    n = int(np.sum(row["seq_lens"]))
    ids = torch.tensor(row["input_ids"][:n], dtype=torch.long)[None]
    labels = collate([row])["labels"][:, :n]
    unisolated = _summed_loss(model, input_ids=ids, labels=labels, position_ids=torch.arange(n)[None])
    assert abs(unisolated - one_by_one) > 1e-2


class _LeakyCollator(PackedCollator):
    """What a model that ignores masks and positions would see: one plain causal sequence."""

    def __call__(self, rows):
        batch = super().__call__(rows)
        batch.pop("attention_mask")
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
        return batch


def test_isolation_check_passes_the_real_path_and_refuses_a_leaky_one(tiny_model):  # noqa: F811
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    path = AttentionPath("sdpa", "block_mask", "bool")
    assert check_isolation(model, PackedCollator(path, pad_id=2), vocab_size=32000) < 1e-4
    with pytest.raises(IsolationError, match="packed samples are not isolated"):
        check_isolation(model, _LeakyCollator(path, pad_id=2), vocab_size=32000)
