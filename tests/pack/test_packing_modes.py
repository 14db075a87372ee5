"""A packing mode is one entry in `packing.MODES`: a new strategy written here, and nowhere else, is built,
inspected, verified, summarised and trained on like the built-in ones."""

from __future__ import annotations

import numpy as np
import pytest

from sftprep.pack import packing
from sftprep.pack.packing import PackingMode, Piece
from tests.conftest import sftprep_cli
from tests.sfttrain_helpers import SPANISH, build_shards, make_tiny_model, one_thread, train_config  # noqa: F401


def first_fit_decreasing(lengths, max_length: int, seed: int) -> list[list[Piece]]:
    """Longest first, each sample into the first row it fits in (not the fullest, as bfd does)."""
    lengths = lengths.tolist()  # a compact numpy array (uint16 below 65,536 tokens): Python ints for arithmetic
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = next((k for k, r in enumerate(room) if r >= lengths[i]), None)
        if k is None:
            rows.append([]), room.append(max_length)
            k = len(rows) - 1
        rows[k].append(i)
        room[k] -= lengths[i]
    return [[(i, 0, lengths[i]) for i in row] for row in rows]


@pytest.fixture
def ffd(monkeypatch):
    monkeypatch.setitem(packing.MODES, "ffd", PackingMode("ffd", first_fit_decreasing, padded=True, shared=True,
                                                          splits=False, help="first-fit-decreasing"))


@pytest.mark.slow  # trains a tiny model
def test_a_new_packing_mode_is_built_inspected_verified_summarised_and_trained(tmp_path, ffd, one_thread):  # noqa: F811
    from sftprep import load, read_manifest
    from sftprep.inspect.stats import collect, summarize
    from sftprep.inspect.verify import verify
    from sfttrain.api import train

    pairs = SPANISH * 8
    shards = build_shards(tmp_path, pairs, packing="ffd", max_length=48)
    manifest = read_manifest(shards)
    assert manifest["packing"] == "ffd"
    lengths = load(shards).column("seq_lens").to_pylist()
    samples = sorted(n for row in lengths for n in row)
    assert len(samples) == len(pairs) and all(sum(row) <= 48 for row in lengths)
    expected = first_fit_decreasing(np.asarray(sorted(samples, reverse=True)), 48, 0)
    assert sorted(len(r) for r in lengths) == sorted(len(r) for r in expected)  # rows as first-fit makes them

    report = verify(shards)
    assert report.ok, report.violations
    stats = summarize(collect(shards))
    assert stats["packing"] == "ffd" and stats["rows"]["fill"]["mean"] > 0
    shown = sftprep_cli("inspect", shards, "--row", 0, "--plain")
    assert shown.exit_code == 0 and "sample(s)" in shown.output and "padding" in shown.output

    model = make_tiny_model(tmp_path / "model")
    result = train(train_config(shards, model, tmp_path / "run", max_steps=2), disable_tqdm=True)
    assert result.global_step == 2 and result.final_dir is not None
    assert result.summary["isolation_check"] is not None  # rows hold several samples: the probe ran
