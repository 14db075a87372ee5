"""Unpack packed rows back into samples: the per-sample view that `inspect`, `diff`, `verify` and
`sftprep.samples()` share.

A shard row holds whole samples laid end to end (or, with `packing: wrapped`, pieces of them),
then padding. `shards.flatten` (the row reader) gives one long array per column; `seq_lens` cuts
each row into its samples, so every sample is a `[start, start + length)` range of the flat
`input_ids` / `labels`:

    row 0:  input_ids  [ s3 s3 s3 s3 | s7 s7 s7 | pad pad ]    seq_lens [4, 3]   sample_ids [3, 7]
    row 1:  input_ids  [ s1 s1 s1 s1 s1 s1 | pad pad pad ]    seq_lens [6]      sample_ids [1]
    flat:   s3 s3 s3 s3 s7 s7 s7 pad pad s1 s1 s1 s1 s1 s1 pad pad pad
    pieces: (start 0, len 4, sid 3)  (start 4, len 3, sid 7)  (start 9, len 6, sid 1)

Everything here is vectorized with numpy over those flat arrays, so it stays fast on big builds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..tokenize.labels import IGNORE_INDEX
from ..write.shards import Flat, check_ids, flatten, load
from .decode import TRAINED_SEPARATOR, decode_segments, load_build_tokenizer
from .folder import read_build, read_sample_info, sources_by_id


def piece_positions(flat: Flat, pieces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions of `pieces` (indices into the piece arrays) laid end to end, and the offsets
    that cut them back into pieces."""
    lens = flat.seq_lens[pieces]
    off = np.concatenate([[0], np.cumsum(lens)])
    pos = np.repeat(flat.piece_start[pieces] - off[:-1], lens) + np.arange(off[-1])
    return pos, off


def unpack(flat: Flat) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Samples in sample_id order: (sample_ids, offsets, input_ids, labels).

    Pieces of one sample (wrapped packing) are joined in the order they appear in the rows.
    """
    order = np.argsort(flat.sample_ids, kind="stable")
    pos, _ = piece_positions(flat, order)
    sids, first = np.unique(flat.sample_ids[order], return_index=True)
    lens = np.add.reduceat(flat.seq_lens[order], first) if len(first) else np.zeros(0, np.int64)
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return sids, off, flat.ids[pos], flat.labels[pos]


def unpack_build(folder: Path, manifest: dict[str, Any],
                 split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`unpack` of every shard of the build's `split` in `folder`, its ids checked against the build's
    vocabulary before anyone decodes them."""
    flat = flatten(load(folder, split))
    check_ids(flat.ids, manifest["tokenizer"].get("vocab_size"), str(folder))
    return unpack(flat)


def samples(path: str | Path, tokenizer: str | Path | None = None, decode: bool = True,
            split: str = "train") -> pa.Table:
    """One row per kept sample, unpacked from the rows it was packed into.

    Columns: `sample_id`, `source` (file:line), `text` (decoded, special tokens literal),
    `trained_text` (the trained runs decoded, joined by a newline), `num_tokens`, `num_trained`,
    `input_ids`, `labels`, `truncated`. `.to_pandas()` gives a DataFrame.

    Args:
        path: the build folder.
        tokenizer: decode with this tokenizer folder instead of the manifest's (must be the same).
        decode: False skips `text`/`trained_text` (no tokenizer needed; much faster).
        split: train, or validation (the build's held-out split).
    """
    folder, manifest = read_build(path)
    sids, off, ids, labels = unpack_build(folder, manifest, split)
    info = read_sample_info(folder, manifest)
    src = sources_by_id(info)
    trunc = dict(zip(info.column("sample_id").to_pylist(), info.column("truncated").to_pylist())) \
        if info is not None else {}
    trained = labels != IGNORE_INDEX
    cs = np.concatenate([[0], np.cumsum(trained, dtype=np.int64)])
    cols: dict[str, Any] = {
        "sample_id": pa.array(sids, pa.int64()),
        "source": pa.array([src.get(int(s)) for s in sids], pa.string()),
    }
    if decode:
        tok = load_build_tokenizer(folder, manifest, tokenizer)
        texts, trained_texts = [], []
        for i in range(len(sids)):
            segs = decode_segments(tok, ids[off[i]:off[i + 1]], labels[off[i]:off[i + 1]])
            texts.append("".join(t for t, _ in segs))
            trained_texts.append(TRAINED_SEPARATOR.join(t for t, tr in segs if tr))
        cols["text"] = pa.array(texts, pa.string())
        cols["trained_text"] = pa.array(trained_texts, pa.string())
    big = off[-1] > np.iinfo(np.int32).max
    offsets = pa.array(off, pa.int64() if big else pa.int32())
    lists = pa.LargeListArray if big else pa.ListArray
    cols.update({
        "num_tokens": pa.array(np.diff(off), pa.int32()),
        "num_trained": pa.array(cs[off[1:]] - cs[off[:-1]], pa.int32()),
        "input_ids": lists.from_arrays(offsets, pa.array(ids, pa.int32())),
        "labels": lists.from_arrays(offsets, pa.array(labels, pa.int32())),
        "truncated": pa.array([trunc.get(int(s)) for s in sids], pa.bool_()),
    })
    return pa.table(cols)
