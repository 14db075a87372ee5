"""Shards -> batches: a memory-mapped dataset, an epoch-aware sampler, a packing-aware collator.

The dataset opens the shards named by the manifest as memory-mapped Arrow tables: start-up reads
only the manifest and the files' footers, and pages are read on demand, so neither start-up time
nor resident memory grows with the dataset. Row `i` is found from the manifest's row counts. Each
row read is checked against the shard contract (`sftprep.write.shards.row_problem`, O(row)):
an edited shard is refused before it is trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from sftprep.errors import InputError
from sftprep.tokenize.labels import IGNORE_INDEX, mask_sample_starts
from sftprep.write.shards import TRAINED_COLUMNS, cu_seqlens, row_positions, row_problem
from sftprep.write.manifest import shard_path

from .attention import REAL_TOKENS, AttentionPath
from .checks import id_bound
from .config import ConfigError


class RealTokens(int):
    """`num_real_tokens` of a batch: its tokens that are not padding (an int), and `per_row`, each row's
    count. A row's padding follows its tokens, so `mask(length)` says which positions are real (the
    router aux loss of a MoE model counts those only, `loss.RouterLoss`)."""

    per_row: tuple[int, ...]

    def __new__(cls, per_row) -> "RealTokens":
        self = super().__new__(cls, sum(int(n) for n in per_row))
        self.per_row = tuple(int(n) for n in per_row)
        return self

    def __reduce__(self):
        return RealTokens, (self.per_row,)

    def mask(self, length: int, device=None) -> torch.Tensor:
        """(rows, length) bool: True at each row's real tokens."""
        counts = torch.tensor(self.per_row, device=device)
        return torch.arange(length, device=device)[None] < counts[:, None]


class ShardDataset(torch.utils.data.Dataset):
    """Rows of a `sftprep build` folder: dicts of numpy arrays `input_ids`, `labels`, `seq_lens`.

    Shards are opened lazily in each process (a DataLoader worker opens its own maps; pickling the
    dataset never copies table data).
    """

    def __init__(self, folder: str | Path, manifest: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.files = [shard_path(self.folder, s["file"]) for s in manifest["shards"]]
        self.max_id, self.bound_from = id_bound(manifest)
        self.offsets = np.cumsum([0] + [int(s["rows"]) for s in manifest["shards"]])
        self._tables: list | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _open(self) -> list:
        from sftprep.write.shards import open_shard

        tables = []
        for f, s in zip(self.files, self.manifest["shards"]):
            t = open_shard(f)
            if t.num_rows != s["rows"]:
                raise InputError(f"{f} holds {t.num_rows} rows but the manifest says {s['rows']}; "
                                 "rebuild the shards with `sftprep build --overwrite`")
            tables.append([t.column(c) for c in (*TRAINED_COLUMNS, "sample_ids")])
        return tables

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range (0..{len(self) - 1})")
        if self._tables is None:
            self._tables = self._open()
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        cols = self._tables[shard]
        row = index - int(self.offsets[shard])
        out = {name: col[row].values.to_numpy(zero_copy_only=False) for name, col in zip(TRAINED_COLUMNS, cols)}
        ids = out["input_ids"]
        if len(ids) and (ids.max() > self.max_id or ids.min() < 0):  # O(row): an edited shard, not an IndexError
            bad = int(ids.max() if ids.max() > self.max_id else ids.min())
            problem = f" holds token id {bad}, beyond {self.bound_from} {self.max_id} in its manifest"
        else:
            problem = row_problem(ids, out["labels"], out["seq_lens"], len(cols[3][row]), self.manifest)
            problem = problem and f": {problem}"
        if problem:
            raise ConfigError(f"{self.files[shard]} row {row}{problem}; the shard was changed after the build: "
                              "rebuild with `sftprep build --overwrite` (`sftprep verify` checks every shard)")
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tables": None}


class EpochSampler(torch.utils.data.Sampler):
    """Row order for one rank: a seeded permutation per epoch, dealt round-robin across ranks.

    The order depends only on (seed, epoch, rank, world_size), so a resumed run sees exactly the
    rows it would have seen. When the rows do not divide evenly, the first rows of the permutation
    are repeated so that every rank takes the same number of steps (as `DistributedSampler`).
    `ShardTrainer` gives every rank the one order (world_size 1) and lets accelerate deal its batches.
    """

    def __init__(self, num_rows: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.num_rows // self.world_size)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
        else:
            order = np.arange(self.num_rows)
        total = len(self) * self.world_size
        if total > self.num_rows:
            order = np.concatenate([order, order[:total - self.num_rows]])
        return iter(order[self.rank::self.world_size].tolist())


class PackedCollator:
    """Rows -> model inputs whose attention stays inside each packed sample (see `attention.py`).

    positions path: `input_ids`, `labels`, `position_ids` of shape (batch, L), L the longest row in
    the batch (rounded up to `pad_to_multiple_of`), and no attention mask: transformers builds the
    packed, window-aware mask from the restarting position ids. varlen path: the rows flattened to
    (1, tokens) without padding, plus `cu_seq_lens_q/k` and `max_length_q/k` for the varlen kernel.

    Both add `num_real_tokens` (not padding, a `RealTokens`), which `ShardTrainer` counts and never
    passes on.
    The label of every sample's first token is forced to -100 (sftprep writes it so already):
    nothing may be learnt across a sample boundary.
    """

    def __init__(self, attention: AttentionPath, pad_id: int, pad_to_multiple_of: int = 8) -> None:
        self.attention = attention
        self.pad_id = int(pad_id)
        self.multiple = max(1, pad_to_multiple_of)

    def __call__(self, rows: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        if self.attention.mode == "varlen":
            return self._flatten(rows)
        return self._padded(rows)

    def _padded(self, rows: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        used = [int(np.sum(r["seq_lens"])) for r in rows]
        length = -(-max(used) // self.multiple) * self.multiple
        ids = np.full((len(rows), length), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), length), IGNORE_INDEX, dtype=np.int64)
        positions = np.empty((len(rows), length), dtype=np.int64)
        for i, (r, n) in enumerate(zip(rows, used)):
            ids[i, :n] = r["input_ids"][:n]
            labels[i, :n] = mask_sample_starts(r["labels"][:n].astype(np.int64), r["seq_lens"])
            positions[i] = row_positions(r["seq_lens"], length)[0]
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(positions), REAL_TOKENS: RealTokens(used)}

    def _flatten(self, rows: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        ids, labels, positions, lens = [], [], [], []
        for r in rows:
            n = int(np.sum(r["seq_lens"]))
            ids.append(r["input_ids"][:n])
            labels.append(mask_sample_starts(r["labels"][:n].astype(np.int64), r["seq_lens"]))
            positions.append(row_positions(r["seq_lens"], n)[0])
            lens.extend(int(x) for x in r["seq_lens"])
        cu = torch.tensor(cu_seqlens(lens), dtype=torch.int32)
        return {
            "input_ids": torch.from_numpy(np.concatenate(ids).astype(np.int64))[None],
            "labels": torch.from_numpy(np.concatenate(labels).astype(np.int64))[None],
            "position_ids": torch.from_numpy(np.concatenate(positions))[None],
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": max(lens), "max_length_k": max(lens), REAL_TOKENS: RealTokens([int(cu[-1])]),
        }


class TrainerCollator(PackedCollator):
    """`PackedCollator` for a plain `transformers.Trainer` (or TRL's `SFTTrainer`) fed a build's rows,
    e.g. from `datasets.load_dataset("arrow", data_dir=SHARDS, split="train")`: rows stay as packed,
    positions restart at 0 for each sample (transformers builds the packed mask from them), and
    only model inputs come out. Pass `remove_unused_columns=False` (the collator needs `seq_lens`).
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 8) -> None:
        super().__init__(AttentionPath("sdpa", "positions"), pad_id, pad_to_multiple_of)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        arrays = [{k: np.asarray(r[k]) for k in ("input_ids", "labels", "seq_lens")} for r in rows]
        batch = self._padded(arrays)
        batch.pop(REAL_TOKENS)
        return batch
