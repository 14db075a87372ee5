"""sfttrain treats a build's manifest as untrusted input: its schema, its shard paths, its token ids
and its tokenizer are checked before the model is loaded, each failure one line with exit code 2."""

import hashlib
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from sfttrain import config_from_dict
from sfttrain.api import setup
from sfttrain.checks import open_build
from sfttrain.config import ConfigError
from sfttrain.data import ShardDataset
from tests.sfttrain_helpers import (CHATML_TOKENIZER, SPANISH, build_shards, make_tiny_model,  # noqa: F401
                                    spanish_shards, tiny_model)
from tests.sfttrain.test_sfttrain_guards import _refused, no_model_loading, run_cli  # noqa: F401

SHARD = "shard-train-00000.arrow"


def _edit(shards, change) -> None:
    path = shards / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _run(shards, model, tmp_path, *extra):
    return run_cli(shards, "--model", model, "--output-dir", tmp_path / "run", *extra)


@pytest.mark.parametrize("change, expected", [
    (lambda m: m["shards"][0].update(rows="3"), "shards[0].rows must be a whole number, got str '3'"),
    (lambda m: m["shards"][0].update(rows=m["shards"][0]["rows"] + 1), "totals.rows is"),
    (lambda m: (m["shards"][0].update(rows=m["shards"][0]["rows"] + 1), m["totals"].pop("rows")),
     "rows, not"),
    (lambda m: m["shards"][0].pop("file"), "shards[0] lacks the key 'file'"),
    (lambda m: m.pop("tokenizer"), "the manifest lacks the key 'tokenizer'"),
    (lambda m: m["tokenizer"].update(pad_id=-1), "tokenizer.pad_id must be a whole number, got int -1"),
    (lambda m: m.update(max_length="64"), "the manifest.max_length must be a whole number, got str '64'"),
    (lambda m: m.update(shards={"file": SHARD}), "'shards' must be a list, got dict"),
    (lambda m: m["shards"].__setitem__(0, SHARD), "shards[0] must be an object, got str"),
])
def test_hand_edited_manifest_is_refused_in_one_line(tmp_path, spanish_shards, tiny_model,  # noqa: F811
                                                     no_model_loading, change, expected):  # noqa: F811
    shards = tmp_path / "copy"
    shutil.copytree(spanish_shards, shards)
    _edit(shards, change)
    result = _run(shards, tiny_model, tmp_path)
    _refused(result, expected)
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "link.arrow"])
def test_shard_paths_outside_the_build_folder_are_refused(tmp_path, spanish_shards, tiny_model,  # noqa: F811
                                                          no_model_loading, name):  # noqa: F811
    shards = tmp_path / "copy"
    shutil.copytree(spanish_shards, shards)
    outside = tmp_path / "outside.arrow"
    shutil.copy(shards / SHARD, outside)  # a valid shard: only its place is wrong
    (shards / "link.arrow").symlink_to(outside)
    _edit(shards, lambda m: m["shards"][0].update(file=name))
    result = _run(shards, tiny_model, tmp_path)
    _refused(result, f"shard file {name!r}", "outside the build folder")


def _forge_token(shards, token_id: int, update_max_id: bool) -> None:
    """Write `token_id` into the shard's first row and fix the manifest's sha256 (a forged checksum)."""
    path = shards / SHARD
    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()  # not a map of the file rewritten
    rows = table.column("input_ids").to_pylist()
    rows[0][1] = token_id
    table = table.set_column(0, "input_ids", pa.array(rows, pa.list_(pa.int32())))
    with pa.ipc.new_file(str(path), table.schema) as w:
        w.write_table(table)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    def change(m):
        m["shards"][0]["sha256"] = digest
        if update_max_id:
            m["max_token_id"] = max(m["max_token_id"], token_id)
    _edit(shards, change)


def test_build_records_its_largest_token_id(spanish_shards):  # noqa: F811
    manifest = json.loads((spanish_shards / "manifest.json").read_text())
    table = pa.ipc.open_file(pa.memory_map(str(spanish_shards / SHARD))).read_all()
    assert manifest["max_token_id"] == max(max(r) for r in table.column("input_ids").to_pylist())


def test_token_id_beyond_the_model_is_refused_at_start_up(tmp_path, spanish_shards, tiny_model,  # noqa: F811
                                                          no_model_loading):  # noqa: F811
    shards = tmp_path / "copy"
    shutil.copytree(spanish_shards, shards)
    _forge_token(shards, 40000, update_max_id=True)  # the tiny model has 32002 embeddings
    _refused(_run(shards, tiny_model, tmp_path), "hold token id 40000 (max_token_id in manifest.json)",
             "has only 32002 embeddings")


def test_token_id_the_manifest_does_not_admit_is_never_an_index_error(tmp_path, spanish_shards,  # noqa: F811
                                                                      tiny_model, no_model_loading):  # noqa: F811
    """A forger who keeps max_token_id: --verify-checksums refuses at start-up; without it, the row is
    refused with a message when read (before the embedding sees it), not an IndexError mid-training."""
    shards = tmp_path / "copy"
    shutil.copytree(spanish_shards, shards)
    _forge_token(shards, 40000, update_max_id=False)
    _refused(_run(shards, tiny_model, tmp_path, "--verify-checksums"), "fails `sftprep verify` (id range: 1)",
             f"{SHARD} row 0, position 1: id 40000 is outside the vocabulary")
    manifest = open_build(shards)
    ds = ShardDataset(shards, manifest)
    with pytest.raises(ConfigError, match=r"row 0 holds token id 40000, beyond max_token_id"):
        ds[0]


def test_old_manifest_without_max_token_id_is_bounded_by_its_vocabulary(tmp_path, spanish_shards):  # noqa: F811
    shards = tmp_path / "copy"
    shutil.copytree(spanish_shards, shards)
    _edit(shards, lambda m: m.pop("max_token_id"))
    ds = ShardDataset(shards, open_build(shards))
    assert ds.max_id == 32000 - 1 and len(ds[0]["input_ids"])


def _setup(shards, model, tmp_path, **flat):
    return setup(config_from_dict({"shards": str(shards), "model": str(model), "output_dir": str(tmp_path / "r"),
                                   **flat}))


def test_build_copy_of_another_tokenizer_is_refused(tmp_path, spanish_shards, no_model_loading):  # noqa: F811
    """A model folder without a tokenizer: the build's own copy is compared with the manifest."""
    model = make_tiny_model(tmp_path / "bare", tokenizer=None, vocab_size=32002)
    shards = tmp_path / "copy"
    shutil.copytree(spanish_shards, shards)
    shutil.rmtree(shards / "tokenizer")
    shutil.copytree(CHATML_TOKENIZER, shards / "tokenizer")  # shards of one build, tokenizer of another
    _refused(_run(shards, model, tmp_path), "tokenizer mismatch", "is another one",
             "vocab_size 32000 in the shards, 32002 in the build's copy")


def test_tokenizer_that_cannot_be_compared_is_refused_unless_skipped(tmp_path, spanish_shards,  # noqa: F811
                                                                     no_model_loading):  # noqa: F811
    model = make_tiny_model(tmp_path / "bare", tokenizer=None)
    shards = tmp_path / "copy"
    shutil.copytree(spanish_shards, shards)
    shutil.rmtree(shards / "tokenizer")
    _refused(_run(shards, model, tmp_path), "cannot check the tokenizer", "--skip-tokenizer-check")
    assert _setup(shards, model, tmp_path, skip_tokenizer_check=True).tokenizer is None
    # the embedding bound is never skipped
    _forge_token(shards, 40000, update_max_id=True)
    _refused(_run(shards, model, tmp_path, "--skip-tokenizer-check"), "has only 32002 embeddings")


def test_model_without_tokenizer_trains_with_the_build_copy(tmp_path, spanish_shards):  # noqa: F811
    model = make_tiny_model(tmp_path / "bare", tokenizer=None)
    assert _setup(spanish_shards, model, tmp_path).tokenizer is not None
    assert np.asarray(ShardDataset(spanish_shards, open_build(spanish_shards))[0]["input_ids"]).size
