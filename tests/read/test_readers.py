"""Every input type gives the same records, with provenance; identical shards whatever the container."""

from __future__ import annotations

import hashlib
import json

import pytest
import pyarrow as pa
import pytest
import pyarrow.feather as feather
import pyarrow.parquet as pq

from sftprep import build, config_from_dict, load
from sftprep.read import expand_inputs, reader_for
from tests.conftest import MISTRAL, write_jsonl

RECS = [{"prompt": f"Say {w}", "completion": f" {w}!"} for w in ["yes", "no", "maybe", "héllo 你好"]]


def iter_records(patterns):
    """Every record of every input, in order: what a build reads."""
    for path in expand_inputs(patterns):
        yield from reader_for(path)(path)


def write_all(tmp_path):
    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", RECS)}
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(RECS, ensure_ascii=False))
    paths["csv"] = tmp_path / "d.csv"
    paths["csv"].write_text("prompt,completion\n" + "".join(f'"{r["prompt"]}","{r["completion"]}"\n' for r in RECS))
    table = pa.Table.from_pylist(RECS)
    paths["parquet"] = tmp_path / "d.parquet"
    pq.write_table(table, paths["parquet"])
    paths["feather"] = tmp_path / "d.arrow"
    feather.write_feather(table, paths["feather"])
    import datasets

    paths["hf"] = tmp_path / "hf"
    datasets.Dataset.from_list(RECS).save_to_disk(str(paths["hf"]))
    return paths


def test_all_readers_agree_and_keep_provenance(tmp_path):
    paths = write_all(tmp_path)
    for kind, path in paths.items():
        recs = list(iter_records([str(path)]))
        assert [r.fields for r in recs] == RECS, kind
    sources = {k: [r.source for r in iter_records([str(p)])] for k, p in paths.items()}
    assert sources["jsonl"][2].endswith("d.jsonl:3")
    assert sources["csv"][2].endswith("d.csv:4")  # header is line 1
    assert sources["json"][2].endswith("d.json[2]")
    assert sources["parquet"][2].endswith("d.parquet:row 2")
    assert sources["hf"][2].endswith("hf:row 2")


@pytest.mark.slow
def test_same_shards_from_every_container(tmp_path):
    digests = set()
    for kind, path in write_all(tmp_path).items():
        m = build(config_from_dict({"inputs": [str(path)], "tokenizer": MISTRAL, "out": str(tmp_path / f"o-{kind}"),
                                    "max_length": 64}))
        digests.add(m["shards"][0]["sha256"])
    assert len(digests) == 1


def test_globs_and_several_inputs_in_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", RECS[2:])
    write_jsonl(tmp_path / "a.jsonl", RECS[:2])
    recs = list(iter_records([str(tmp_path / "*.jsonl")]))
    assert [r.fields for r in recs] == RECS
    m = build(config_from_dict({"inputs": [str(tmp_path / "*.jsonl")], "tokenizer": MISTRAL,
                                "out": str(tmp_path / "o"), "max_length": 64, "packing": "none"}))
    assert m["totals"]["samples_kept"] == 4 and len(m["inputs"]) == 2
    assert all(len(i["sha256"]) == 64 for i in m["inputs"])
    assert len(load(tmp_path / "o")) == 4


@pytest.mark.slow
def test_fast_loader_matches_transformers(tmp_path):
    """The build loads tokenizer.json without transformers; ids and identity must be the same."""
    from sftprep.tokenizer import load_fast, load_tokenizer, tokenizer_identity
    from tests.conftest import CHATML_TOK, DATA

    texts = [json.loads(line)["text"] for line in (DATA / "c4.jsonl").read_text().splitlines()[:5]]
    texts += ["<|im_start|>user\nhi<|im_end|>", " two  spaces\n\n x", "你好世界 👍🏽 e\u0301"]
    for path in (MISTRAL, CHATML_TOK):
        fast, full = load_fast(path), load_tokenizer(path)
        assert tokenizer_identity(fast, path) == tokenizer_identity(full, path)
        assert [e.ids for e in fast.backend_tokenizer.encode_batch(texts, add_special_tokens=False)] == \
            [full(t, add_special_tokens=False)["input_ids"] for t in texts]
        assert (fast.bos_token_id, fast.eos_token_id, fast.chat_template) == \
            (full.bos_token_id, full.eos_token_id, full.chat_template)


def _vocab_digest(backend, special):
    """The vocab hash as builds have always computed it: get_vocab's pairs, sorted by id."""
    pairs = sorted(backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    h = hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode())
    h.update(json.dumps(special, sort_keys=True).encode())
    return h.hexdigest()


@pytest.mark.parametrize("name", ["mistral", "deepseek-v4", "holes"])
def test_the_vocab_hash_a_manifest_records_is_unchanged(tmp_path, name):
    """Shards are tied to their tokenizer by `vocab_hash`: its value must not change with how it is computed
    (read from the token list where ids run without holes, from get_vocab's dict where they do not)."""
    from tokenizers import Tokenizer, models

    from sftprep.tokenizer import load_fast, tokenizer_identity
    from tests.conftest import FIXTURES

    folder = FIXTURES / "tokenizers" / name
    if name == "holes":  # ids 0, 2, 5: no token at 1, 3, 4
        folder = tmp_path / name
        folder.mkdir()
        Tokenizer(models.BPE({"a": 0, "b": 2, "ab": 5}, [("a", "b")])).save(str(folder / "tokenizer.json"))
    tok = load_fast(folder)
    special = {f"{k}_token": getattr(tok, f"{k}_token") for k in ("bos", "eos", "pad", "unk")}
    assert tokenizer_identity(tok, folder)["vocab_hash"] == _vocab_digest(tok.backend_tokenizer, special)


# -- .json arrays are streamed: memory bounded by the chunk and the largest record ---------------

def _array_records(path):
    from sftprep.read.jsonfile import read_json

    return [(r.source.rsplit("/", 1)[-1], r.fields, r.error) for r in read_json(path)]


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_json_array_read_in_chunks_gives_each_record_or_its_reason(tmp_path, monkeypatch, chunk):
    import sftprep.read.jsonfile as jsonfile

    monkeypatch.setattr(jsonfile, "CHUNK", chunk)
    good = [{"prompt": "é" * i, "completion": "😀 \\u00e9 \n" * i, "n": [1, 2.5, None, True]} for i in range(12)]
    body = ",\n ".join(json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(good))
    path = tmp_path / "d.json"
    path.write_text("\ufeff[ " + body + ", 7, " + "[" * 3000 + "]" * 3000 + ', {"n": ' + "9" * 5000
                    + '}, {"p": "a\\ud800"}, {"p": "\\ud83d\\ude00"} ]\n', encoding="utf-8")
    got = _array_records(path)
    assert [f for _, f, _ in got[:12]] == good
    assert [(s, e.split(":")[0] if e else e) for s, _, e in got[12:]] == [
        ("d.json[12]", "expected a JSON object, got int"), ("d.json[13]", "invalid JSON"),
        ("d.json[14]", "invalid JSON"), ("d.json[15]", "a string holds a lone UTF-16 surrogate ('\\ud800'), which is "
                                                       "not Unicode text (often scraped data cut mid-character)"),
        ("d.json[16]", None)]
    assert "nested too deeply" in got[13][2] and "4300 digits" in got[14][2] and got[16][1] == {"p": "😀"}


@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_json_array_syntax_error_keeps_the_records_before_it(tmp_path, monkeypatch, chunk):
    import sftprep.read.jsonfile as jsonfile

    monkeypatch.setattr(jsonfile, "CHUNK", chunk)
    path = tmp_path / "d.json"
    path.write_text('[{"a": 1},\n {"a": 2,},\n {"a": 3}]')
    assert _array_records(path) == [
        ("d.json[0]", {"a": 1}, None),
        ("d.json:2", None, "invalid JSON: Expecting property name enclosed in double quotes (column 10); the array "
                           "is unreadable from record 1 on")]


def test_large_json_array_is_streamed_with_bounded_memory(tmp_path, monkeypatch):
    """A 5 MB array is read with a small fraction of its size in memory (it was parsed whole)."""
    import tracemalloc

    import sftprep.read.jsonfile as jsonfile

    monkeypatch.setattr(jsonfile, "CHUNK", 64 << 10)
    path = tmp_path / "big.json"
    path.write_text(json.dumps([{"prompt": f"question {i} " * 10, "completion": "answer é " * 20}
                                for i in range(12000)]))
    tracemalloc.start()
    try:
        kept = sum(1 for r in jsonfile.read_json(path) if r.fields)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert kept == 12000
    assert peak < path.stat().st_size / 8, f"peak {peak / 2**20:.1f} MiB for a {path.stat().st_size / 2**20:.1f} MiB file"
