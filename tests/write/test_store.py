"""The sample store between tokenize and pack: what it keeps in memory per sample, and that rows read back
from it carry the right sample ids whatever the gaps between them."""

import numpy as np
import pyarrow as pa

from sftprep.pack.packing import PieceArrays
from sftprep.tokenize.encode import Encoded
from sftprep.write.store import SampleStore


def _fill(store: SampleStore, sample_ids: np.ndarray, batch: int = 5000) -> None:
    for lo in range(0, len(sample_ids), batch):
        sids = sample_ids[lo:lo + batch].tolist()
        lengths = np.asarray([1 + s % 3 for s in sids], np.int64)
        ids = np.repeat(np.asarray(sids, np.int32) % 1000, lengths)
        store.add(Encoded(ids, ids.copy(), lengths, lengths.copy(), sids, [f"in.jsonl:{s + 1}" for s in sids],
                          [False] * len(sids)))


def _ids_bytes(store: SampleStore) -> int:
    ids = store.sample_ids
    return ids.nbytes if isinstance(ids, np.ndarray) else ids.starts.nbytes + ids.firsts.nbytes


def test_a_build_with_few_rejects_keeps_no_sample_id_per_sample(tmp_path):
    """200k kept samples of 200,050 records (50 rejected here and there): the ids are a few runs, not an
    array of 200k, and every id read back is the real one."""
    rng = np.random.default_rng(0)
    rejected = rng.choice(200_050, 50, replace=False)
    sids = np.setdiff1d(np.arange(200_050), rejected)
    store = SampleStore(tmp_path, "tokens.spill")
    _fill(store, sids)
    store.seal()
    try:
        assert len(store) == len(sids)
        assert _ids_bytes(store) <= 16 * 51  # a run per gap
        k = rng.integers(0, len(sids), 10_000)
        assert np.array_equal(store.sample_ids[k], sids[k])
        assert np.array_equal(np.asarray(store.sample_ids), sids)
        rows = store.rows_batch(_pieces(k[:50], store.lengths), None, 0)
        assert pa.array(rows.column("sample_ids").flatten()).to_pylist() == sids[k[:50]].tolist()
    finally:
        store.remove()


def test_ids_that_jump_everywhere_are_one_compact_array(tmp_path):
    """A --part 2/3 keeps ids 1, 4, 7...: one int32 array (4 bytes a sample), not a run per sample."""
    sids = np.arange(1, 30_000, 3)
    store = SampleStore(tmp_path, "tokens.spill")
    _fill(store, sids)
    store.seal()
    try:
        assert isinstance(store.sample_ids, np.ndarray) and store.sample_ids.dtype == np.int32
        assert np.array_equal(store.sample_ids, sids)
    finally:
        store.remove()


def _pieces(samples: np.ndarray, lengths: np.ndarray) -> PieceArrays:
    samples = samples.astype(np.int64)
    return PieceArrays(samples, np.zeros(len(samples), np.int64), lengths[samples].astype(np.int64),
                       np.ones(len(samples), np.int64))


def test_where_a_sample_starts_is_summed_from_the_lengths_not_held_per_sample(tmp_path):
    """200k samples: the store's arrays hold ~2 bytes a sample (the lengths), not a token start each (4-8
    more), and a row of any samples, in any order, reads back exactly their tokens."""
    sids = np.arange(200_000)
    store = SampleStore(tmp_path, "tokens.spill")
    _fill(store, sids)
    store.seal()
    try:
        held = sum(v.nbytes for v in vars(store).values()  # arrays in memory, not the maps of the files
                   if isinstance(v, np.ndarray) and v.flags.owndata) + _ids_bytes(store)
        assert held <= 2.5 * len(sids)
        k = np.random.default_rng(1).integers(0, len(sids), 3000)
        rows = store.rows_batch(_pieces(k, store.lengths), None, 0)
        want = np.concatenate([np.full(1 + s % 3, s % 1000) for s in k.tolist()])
        assert np.array_equal(pa.array(rows.column("input_ids").flatten()).to_numpy(), want)
    finally:
        store.remove()
