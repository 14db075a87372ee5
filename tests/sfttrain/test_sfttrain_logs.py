"""What a TRL user expects in the logs: per-token eval loss, mean token accuracy, non-pad
tokens/s and trained tokens seen; schedulers that need arguments start; checkpoints are capped."""

import math

import pytest
import torch

from sfttrain import config_from_dict, train
from sfttrain.checks import open_build
from sfttrain.data import ShardDataset
from tests.sfttrain_helpers import build_shards, one_thread, tiny_model, train_config  # noqa: F401  (fixtures)

PAIRS = [("Say one.", " one"), ("Count to ten in words, please.", " one two three four five six seven eight nine ten")]


def test_eval_loss_is_per_trained_token_and_logs_carry_accuracy_and_throughput(tmp_path, tiny_model,  # noqa: F811
                                                                               one_thread):
    from transformers import AutoModelForCausalLM

    shards = build_shards(tmp_path, PAIRS, packing="none")
    evals = build_shards(tmp_path, PAIRS, name="eval", packing="none")  # rows training 2 and 12 tokens
    result = train(train_config(shards, tiny_model, tmp_path / "run", eval=str(evals), max_steps=2,
                                learning_rate=1e-12, per_device_eval_batch_size=1, lr_scheduler="constant"),
                   disable_tqdm=True)

    model = AutoModelForCausalLM.from_pretrained(tiny_model)  # lr 1e-12: the adapter left the model as is
    sums, counts = [], []
    for row in ShardDataset(evals, open_build(evals)):
        ids = torch.tensor(row["input_ids"][:row["seq_lens"][0]], dtype=torch.long)[None]
        labels = torch.tensor(row["labels"][:row["seq_lens"][0]], dtype=torch.long)[None]
        with torch.no_grad():
            sums.append(model(input_ids=ids, labels=labels, num_items_in_batch=1).loss.item())
        counts.append(int((labels[0, 1:] != -100).sum()))
    per_token = sum(sums) / sum(counts)
    per_batch = sum(s / c for s, c in zip(sums, counts)) / len(sums)
    assert abs(per_token - per_batch) > 2e-3  # the two averages differ on these rows (random model: by little)
    assert result.eval_loss == pytest.approx(per_token, rel=2e-5)
    assert 0 <= result.metrics["eval_mean_token_accuracy"] <= 1
    assert result.metrics["eval_trained_tokens"] == sum(counts)

    logs = [h for h in result.log_history if "loss" in h]
    assert len(logs) == 2
    manifest = open_build(shards)
    # 2 steps of both rows (2 epochs); padding not counted
    assert logs[0]["tokens_seen"] == manifest["totals"]["tokens"]
    assert logs[-1]["tokens_seen"] == 2 * manifest["totals"]["tokens"]
    assert logs[-1]["trained_tokens_seen"] == 2 * manifest["totals"]["trained_tokens"]
    assert all(0 <= h["mean_token_accuracy"] <= 1 and h["tokens_per_s"] > 0 for h in logs)
    assert result.metrics["trained_tokens_seen"] == 2 * manifest["totals"]["trained_tokens"]
    assert result.metrics["train_tokens_per_s"] > 0


@pytest.mark.parametrize("scheduler,kwargs", [("cosine_with_min_lr", None), ("warmup_stable_decay", None),
                                              ("cosine_with_min_lr", '{"min_lr_rate": 0.5}')])
def test_schedulers_that_need_arguments_start(tmp_path, tiny_model, scheduler, kwargs, one_thread):  # noqa: F811
    shards = build_shards(tmp_path, PAIRS, packing="none")
    extra = {"lr_scheduler_kwargs": kwargs} if kwargs else {}
    steps = 20 if scheduler == "warmup_stable_decay" else 10
    result = train(train_config(shards, tiny_model, tmp_path / "run", max_steps=steps, per_device_batch_size=1,
                                lr_scheduler=scheduler, **extra), disable_tqdm=True)
    rates = [h["learning_rate"] for h in result.log_history if "learning_rate" in h]
    floor = 0.5 if kwargs else 0.1 if scheduler == "cosine_with_min_lr" else 0.0
    assert rates[0] == pytest.approx(1e-3)
    assert min(rates) >= floor * 1e-3 - 1e-12 and rates[-1] < 1e-3
    if scheduler == "warmup_stable_decay":  # stable, then decays over the last 2 steps (10%)
        assert rates[:18] == [pytest.approx(1e-3)] * 18


def test_scheduler_kwargs_must_be_json():
    from sfttrain import ConfigError

    with pytest.raises(ConfigError, match="--lr-scheduler-kwargs is not valid JSON"):
        config_from_dict({"shards": "s", "model": "m", "output_dir": "o"}, {"lr_scheduler_kwargs": "{min_lr: 1"})


def test_checkpoints_are_capped_by_default():
    config = config_from_dict({"shards": "s", "model": "m", "output_dir": "o"})
    assert config.train.save_total_limit == 2 and not math.isnan(config.train.save_steps)
