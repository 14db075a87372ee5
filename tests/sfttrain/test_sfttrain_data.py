"""Dataset over memory-mapped shards, epoch-aware rank-sharding sampler, packing-aware collator."""

import pickle

import numpy as np
import torch

from sftprep import load
from sftprep.write.shards import row_positions
from sfttrain.attention import AttentionPath
from sfttrain.checks import open_build
from sfttrain.data import EpochSampler, PackedCollator, ShardDataset
from tests.sfttrain_helpers import SPANISH, build_shards

PAIRS = SPANISH + [("Translate 'the red car' to Spanish.", " el coche rojo"), ("Say hi.", " hola")]


def test_dataset_rows_are_the_shard_rows(tmp_path):
    shards = build_shards(tmp_path, PAIRS, packing="none", shard_size=3)  # 7 rows over 3 shard files
    manifest = open_build(shards)
    assert len(manifest["shards"]) == 3
    ds = ShardDataset(shards, manifest)
    table = load(shards).to_pylist()
    assert len(ds) == len(table) == 7
    for i, expected in enumerate(table):
        row = ds[i]
        assert row["input_ids"].tolist() == expected["input_ids"]
        assert row["labels"].tolist() == expected["labels"]
        assert row["seq_lens"].tolist() == expected["seq_lens"]


def test_pickling_the_dataset_carries_no_table_data(tmp_path):
    shards = build_shards(tmp_path, PAIRS, packing="none")
    ds = ShardDataset(shards, open_build(shards))
    ds[0]  # opens the memory maps
    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker receives
    assert clone._tables is None
    assert clone[6]["input_ids"].tolist() == ds[6]["input_ids"].tolist()


def test_sampler_is_seeded_and_epoch_aware():
    a, b = EpochSampler(50, seed=1), EpochSampler(50, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first) == list(range(50))
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_sampler_deals_rows_to_ranks_without_overlap():
    ranks = [EpochSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    for s in ranks:
        s.set_epoch(2)
    parts = [list(s) for s in ranks]
    assert [len(p) for p in parts] == [4, 4, 4]  # equal steps on every rank
    seen = [i for p in parts for i in p]
    assert set(seen) == set(range(10))  # every row, and only 2 repeated to even out the ranks
    assert len(seen) - len(set(seen)) == 2


def test_positions_restart_per_sample_and_padding_is_its_own_segment():
    pos, seg = row_positions(np.array([3, 2]), 7)
    assert pos.tolist() == [0, 1, 2, 0, 1, 0, 1]
    assert seg.tolist() == [0, 0, 0, 1, 1, -1, -1]


def _row(seq_lens, trained_first=False):
    n = sum(seq_lens)
    ids = np.arange(10, 10 + n, dtype=np.int32)
    labels = ids.copy() if trained_first else np.where(np.arange(n) % 2 == 0, -100, ids).astype(np.int32)
    return {"input_ids": ids, "labels": labels, "seq_lens": np.array(seq_lens, dtype=np.int32)}


def test_positions_collator_pads_to_the_longest_row_and_builds_no_mask():
    collate = PackedCollator(AttentionPath("sdpa", "positions"), pad_id=2, pad_to_multiple_of=4)
    batch = collate([_row([3, 2]), _row([6], trained_first=True)])
    assert batch["input_ids"].shape == (2, 8)
    assert "attention_mask" not in batch  # transformers builds the packed mask from the positions
    assert batch["num_real_tokens"] == 11  # 16 columns, 5 of them padding
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 13, 14, 2, 2, 2]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    # the first token of every sample and the padding are never trained
    assert batch["labels"][1].tolist() == [-100, 11, 12, 13, 14, 15, -100, -100]
    assert batch["labels"][0, 3].item() == -100


def test_varlen_collator_flattens_rows_without_padding():
    collate = PackedCollator(AttentionPath("flash_attention_2", "varlen"), pad_id=2)
    row = _row([3, 2])
    row["input_ids"] = np.concatenate([row["input_ids"], [2, 2, 2]]).astype(np.int32)  # a padded shard row
    row["labels"] = np.concatenate([row["labels"], [-100] * 3]).astype(np.int32)
    batch = collate([row, _row([4], trained_first=True)])
    assert batch["input_ids"].shape == (1, 9)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9]
    assert batch["max_length_q"] == 4
    assert batch["num_real_tokens"] == 9
    assert batch["labels"][0, 5].item() == -100  # first token of the second row's sample
    assert "attention_mask" not in batch
