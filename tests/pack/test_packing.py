"""Packing invariants on real builds: real tokens, -100 padding and sample starts, no split, determinism."""

from __future__ import annotations

import json

import pytest

from sftprep.pack.packing import fill_ratio, pack_bfd, pack_wrapped
from tests.conftest import DATA, build_records, samples_of


def alpaca(n=40):
    return json.loads((DATA / "alpaca_en.json").read_text())[:n]


def test_pack_bfd_is_best_fit_decreasing():
    bins = pack_bfd([5, 7, 3, 2, 9, 1], 10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 7, 3, 2, 9, 1][i] for i in b) <= 10 for b in bins)
    assert bins == [[4, 5], [1, 2], [0, 3]]  # 9+1, 7+3, 5+2 (best fit puts 2 beside 5)


def test_pack_bfd_refuses_oversized_sample():
    with pytest.raises(ValueError, match="sample 1 has 11 tokens"):
        pack_bfd([3, 11], 10)


def test_pack_wrapped_cuts_constant_chunks():
    rows = list(pack_wrapped([4, 7, 2], 5))
    assert rows == [[(0, 0, 4), (1, 0, 1)], [(1, 1, 6)], [(1, 6, 7), (2, 0, 2)]]
    assert fill_ratio(13, 3, 5) == pytest.approx(13 / 15)


@pytest.mark.slow
def test_bfd_rows_keep_the_shard_contract(tmp_path, mistral):
    manifest, table = build_records(tmp_path, alpaca(), template="alpaca", max_length=512)
    _, unpacked = build_records(tmp_path, alpaca(), template="alpaca", max_length=512, packing="none",
                                name="single")
    single = {sid: (ids, labels) for ids, labels, sid in samples_of(unpacked)}
    pad = manifest["tokenizer"]["pad_id"]
    seen = []
    for row in table.to_pylist():
        ids, labels, lens = row["input_ids"], row["labels"], row["seq_lens"]
        assert len(ids) == len(labels) == 512
        n = sum(lens)
        assert all(x == pad for x in ids[n:]) and all(x == -100 for x in labels[n:])
        pos = 0
        for length, sid in zip(lens, row["sample_ids"]):
            assert labels[pos] == -100  # first token of every sample
            # no sample is split or altered by packing
            assert (ids[pos:pos + length], labels[pos:pos + length]) == single[sid]
            pos += length
        seen += row["sample_ids"]
    assert sorted(seen) == list(range(40))
    t = manifest["totals"]
    assert t["tokens"] == sum(sum(r) for r in table.column("seq_lens").to_pylist())
    assert t["fill_ratio"] == pytest.approx(t["tokens"] / (t["rows"] * 512), abs=1e-6)
    assert t["rows"] < 40  # it really packed


@pytest.mark.slow
def test_build_is_deterministic(tmp_path):
    a, _ = build_records(tmp_path / "a", alpaca(), template="alpaca", max_length=512, shard_size=4)
    b, _ = build_records(tmp_path / "b", alpaca(), template="alpaca", max_length=512, shard_size=4)
    assert len(a["shards"]) > 1  # bounded shard size
    for sa, sb in zip(a["shards"], b["shards"]):
        assert (tmp_path / "a" / "out" / sa["file"]).read_bytes() == (tmp_path / "b" / "out" / sb["file"]).read_bytes()
    assert a["build_id"] == b["build_id"]


def test_wrapped_packing_for_plain_text(tmp_path):
    recs = [json.loads(line) for line in (DATA / "c4.jsonl").read_text().splitlines()[:10]]
    manifest, table = build_records(tmp_path, recs, packing="wrapped", max_length=128)
    rows = table.to_pylist()
    assert all(sum(r["seq_lens"]) == 128 for r in rows[:-1])
    for r in rows:
        pos = 0
        for n in r["seq_lens"]:
            assert r["labels"][pos] == -100
            pos += n
    assert manifest["totals"]["samples_truncated"] == 0  # wrapped never truncates


@pytest.mark.slow
@pytest.mark.parametrize("mode,expect_len", [("keep_start", 16), ("keep_end", 16)])
def test_truncation_keeps_start_or_end(tmp_path, mistral, mode, expect_len):
    rec = {"prompt": "Count:", "completion": " " + " ".join(str(i) for i in range(40))}
    manifest, table = build_records(tmp_path, [rec], packing="none", max_length=16, truncation=mode)
    ids, labels, _ = samples_of(table)[0]
    assert len(ids) == expect_len and manifest["totals"]["samples_truncated"] == 1
    assert ids[0] == mistral.bos_token_id  # BOS kept in front either way
    text = mistral.decode(ids[1:])
    assert (text.startswith("Count:") if mode == "keep_start" else text.endswith("39</s>"))


@pytest.mark.slow
def test_truncation_drop_and_fully_masked_samples_are_rejected(tmp_path):
    long = {"prompt": "Count:", "completion": " " + " ".join(str(i) for i in range(40))}
    masked = {"prompt": " ".join(["word"] * 40), "completion": " end"}
    manifest, _ = build_records(tmp_path, [long, {"prompt": "a", "completion": " b"}], packing="none",
                                max_length=16, truncation="drop")
    assert manifest["totals"]["dropped_by_reason"] == {"too_long": 1}
    manifest, _ = build_records(tmp_path, [masked, {"prompt": "a", "completion": " b"}], packing="none",
                                max_length=16, name="masked")
    assert manifest["totals"]["dropped_by_reason"] == {"no_trained_tokens_after_truncation": 1}
    reject = json.loads((tmp_path / "masked" / "rejects.jsonl").read_text())
    assert reject["source"].endswith("masked.jsonl:1") and reject["sample_id"] == 0


@pytest.mark.slow
def test_workers_give_the_same_shards(tmp_path):
    one, _ = build_records(tmp_path / "a", alpaca(), template="alpaca", max_length=512)
    two, _ = build_records(tmp_path / "b", alpaca(), template="alpaca", max_length=512, workers=2)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    assert one["totals"] == two["totals"]


def test_batches_are_bounded_by_bytes_as_well_as_records(tmp_path, monkeypatch):
    from sftprep import config_from_dict
    from sftprep.scale import pipeline

    path = tmp_path / "big.jsonl"
    path.write_text("".join('{"text": "%s"}\n' % ("x" * 20_000) for _ in range(50)))
    monkeypatch.setattr(pipeline, "BATCH_BYTES", 100_000)  # 1 MB of records: 10+ batches, not one
    cfg = config_from_dict({"inputs": [str(path)], "tokenizer": "t", "out": str(tmp_path / "o")})
    counts = [0]
    batches = [b for _, _, b in pipeline._work(cfg, [pipeline.FileTask(0, path)], [], counts)]
    assert [len(b) for b in batches] == [5] * 10  # 5 records of ~20 KB reach 100 KB
    assert [sid for b in batches for sid, _ in b] == list(range(50))  # ids run on across batches
    assert counts == [50]


def test_a_build_leaves_the_garbage_collector_as_it_found_it(tmp_path):
    """The build pauses the cyclic GC for its own work only: on after a build (and after a refused one)
    when it was on, off when the caller had turned it off."""
    import gc

    import pytest

    from sftprep.errors import ConfigError

    assert gc.isenabled()
    build_records(tmp_path / "a", alpaca()[:5], template="alpaca", max_length=512)
    assert gc.isenabled()
    with pytest.raises(ConfigError):
        build_records(tmp_path / "b", alpaca()[:5], template="alpaca", max_length=8)
    assert gc.isenabled()
    gc.disable()
    try:
        build_records(tmp_path / "c", alpaca()[:5], template="alpaca", max_length=512)
        assert not gc.isenabled()
    finally:
        gc.enable()
