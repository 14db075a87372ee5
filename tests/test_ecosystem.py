"""A build opens as it is in the readers people already use: only shards match `OUT/*.arrow`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.sfttrain_helpers import SPANISH, TINY_LLAMA, build_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A build of 20 prompt/completion pairs in two shards, plus the rows `sftprep.load` gives."""
    from sftprep import load

    out = build_shards(tmp_path_factory.mktemp("eco"), SPANISH * 4, shard_size=2, packing="none")
    return out, load(out).to_pylist()


def test_only_shards_match_the_arrow_glob(shards):
    out, rows = shards
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.glob("*.arrow")) == [s["file"] for s in manifest["shards"]]
    assert (out / manifest["samples_file"]).is_file()  # the side table is there, under another name


def test_datasets_load_dataset_data_dir(shards, tmp_path):
    import datasets

    out, rows = shards
    ds = datasets.load_dataset("arrow", data_dir=str(out), split="train", cache_dir=str(tmp_path))
    assert ds.column_names == ["input_ids", "labels", "seq_lens", "sample_ids"]
    assert sorted(map(json.dumps, ds.to_list())) == sorted(map(json.dumps, rows))


def test_polars_scan_ipc_glob(shards):
    import polars as pl

    out, rows = shards
    df = pl.scan_ipc(str(out / "*.arrow")).collect()
    assert df.columns == ["input_ids", "labels", "seq_lens", "sample_ids"]
    assert sorted(df["sample_ids"].to_list()) == sorted(r["sample_ids"] for r in rows)


def test_pandas_read_feather_of_every_arrow_file(shards):
    import pandas as pd

    out, rows = shards
    frames = [pd.read_feather(p) for p in sorted(out.glob("*.arrow"))]
    assert len(frames) == 10 and all(list(f.columns) == ["input_ids", "labels", "seq_lens", "sample_ids"]
                                    for f in frames)
    df = pd.concat(frames, ignore_index=True)
    assert [list(x) for x in df["input_ids"]] == [r["input_ids"] for r in rows]


def test_duckdb_on_load(shards):
    import duckdb

    from sftprep import load

    out, rows = shards
    shards_table = load(out)  # noqa: F841 (DuckDB finds the Python variable by name)
    n, tokens = duckdb.sql("SELECT count(*), sum(list_sum(seq_lens)) FROM shards_table").fetchall()[0]
    assert (n, tokens) == (len(rows), sum(sum(r["seq_lens"]) for r in rows))


def test_trainer_collator_restarts_positions_and_drops_nothing(shards):
    from sfttrain.data import TrainerCollator

    out, rows = shards
    packed = {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, -100, -100, 9], "seq_lens": [2, 3],
              "sample_ids": [0, 1]}
    batch = TrainerCollator(pad_id=0, pad_to_multiple_of=8)([packed])
    assert sorted(batch) == ["input_ids", "labels", "position_ids"]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2]]
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, -100, -100, 9, -100, -100, -100]]


@pytest.mark.slow
def test_plain_trainer_trains_one_step_on_load_dataset(tmp_path):
    """The README's recipe: `load_dataset("arrow", data_dir=...)` + `TrainerCollator` + a plain Trainer."""
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from sfttrain.data import TrainerCollator

    out = build_shards(tmp_path, SPANISH, max_length=64, packing="bfd")
    manifest = json.loads((out / "manifest.json").read_text())
    assert any(len(r) > 1 for r in datasets.load_dataset("arrow", data_dir=str(out), split="train",
                                                         cache_dir=str(tmp_path / "c"))["seq_lens"])
    ds = datasets.load_dataset("arrow", data_dir=str(out), split="train", cache_dir=str(tmp_path / "c"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**json.loads(TINY_LLAMA.read_text())))
    before = model.lm_head.weight.detach().clone()
    args = TrainingArguments(str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                             remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no",
                             learning_rate=1e-2)
    seen = []
    collator = TrainerCollator(manifest["tokenizer"]["pad_id"])

    def collate(rows):
        seen.append(collator(rows))
        return seen[-1]

    result = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate).train()
    assert result.global_step == 1 and np.isfinite(result.training_loss)
    assert not torch.equal(before, model.lm_head.weight.detach())
    assert (seen[0]["position_ids"] == 0).sum() > seen[0]["input_ids"].shape[0]  # a restart inside a row
