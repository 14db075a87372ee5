"""The sample cache: a build that changes only what does not decide tokens and labels reads each input's
entry instead of tokenizing it, and writes the shards a --no-cache build writes; entries are checked,
shared safely, and bounded in size. Real fixtures, real builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sftprep import build, config_from_dict

from ..conftest import CHATML_TOK, DATA, FIXTURES, sftprep_cli

ALPACA = {"name": "alpaca", "inputs": [str(DATA / "alpaca_en.json")], "template": "alpaca"}
C4 = {"name": "c4", "inputs": [str(DATA / "c4.jsonl")], "format": "text"}
BASE = {"tokenizer": CHATML_TOK, "max_length": 512, "sources": [ALPACA, C4]}


def built(tmp_path: Path, name: str, **settings) -> tuple[dict, dict[str, bytes]]:
    """Build into tmp_path/name; (the returned manifest, the shards' bytes by file name)."""
    m = build(config_from_dict({**BASE, "out": str(tmp_path / name), **settings}))
    return m, {p.name: p.read_bytes() for p in sorted((tmp_path / name).glob("shard-*.arrow"))}


CHANGES = {  # a setting changed alone -> how many of the inputs are still read from the cache
    "max_length": ({"max_length": 1024}, 2),
    "truncation keep_end": ({"truncation": "keep_end"}, 2),
    "truncation drop": ({"truncation": "drop"}, 2),
    "packing none": ({"packing": "none"}, 2),
    "packing wrapped": ({"packing": "wrapped"}, 2),
    "shard_size": ({"shard_size": 5}, 2),
    "seed": ({"seed": 3}, 2),
    "mixing": ({"sources": [{**ALPACA, "choose": 15}, {**C4, "repeat": 1.5}]}, 2),
    "validation split": ({"eval": {"fraction": 0.2}}, 2),
    "dedup": ({"dedup": "none"}, 2),
    "decontamination": ({"decontaminate": [str(DATA / "benchmark_items.jsonl")]}, 2),
    "another input": ({"sources": [ALPACA, C4, {"name": "tools", "inputs": [str(DATA / "glaive_toolcall.jsonl")],
                                                "template": "chatml"}]}, 2),
    "an input fewer": ({"sources": [ALPACA]}, 1),
}


@pytest.fixture(scope="module")
def primed(tmp_path_factory) -> Path:
    """A cache holding the entries of the base build (made once; each test works on a copy)."""
    folder = tmp_path_factory.mktemp("primed")
    first, _ = built(folder, "first", cache_dir=str(folder / "cache"))
    assert first["cache"]["inputs_tokenized"] == 2 and first["cache"]["inputs_reused"] == 0
    return folder / "cache"


@pytest.mark.parametrize("change", CHANGES)
def test_a_setting_that_decides_no_token_reuses_the_entries_and_writes_the_same_shards(tmp_path, change, primed):
    settings, reused = CHANGES[change]
    shutil.copytree(primed, tmp_path / "cache")
    again, shards = built(tmp_path, "again", cache_dir=str(tmp_path / "cache"), **settings)
    _, fresh = built(tmp_path, "fresh", cache=False, **settings)
    assert shards == fresh and shards  # byte for byte
    assert again["cache"]["inputs_reused"] == reused, again["cache"]
    assert again["cache"]["summary"].startswith(f"{reused} of ")
    assert again["totals"] == json.loads((tmp_path / "fresh" / "manifest.json").read_text())["totals"]


def test_long_records_cut_by_the_first_build_are_tokenized_again_by_one_with_more_room(tmp_path):
    built(tmp_path, "first")
    m, shards = built(tmp_path, "again", max_length=2048)
    _, fresh = built(tmp_path, "fresh", cache=False, max_length=2048)
    assert shards == fresh
    assert m["cache"]["records_tokenized_again"] > 0  # c4 documents past 512 tokens
    assert m["totals"]["samples_truncated"] < json.loads((tmp_path / "first" / "manifest.json").read_text())[
        "totals"]["samples_truncated"]


@pytest.mark.parametrize("change", ["template kwarg", "tokenizer file", "input byte"])
def test_what_decides_tokens_is_a_miss(tmp_path, change):
    data = tmp_path / "chats.jsonl"
    data.write_text((DATA / "chat_multiturn.jsonl").read_text())
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in Path(CHATML_TOK).iterdir():
        (tok / f.name).write_bytes(f.read_bytes())
    cfg = {"inputs": [str(data)], "tokenizer": str(tok), "template": "tokenizer", "max_length": 512}
    first = build(config_from_dict({**cfg, "out": str(tmp_path / "a")}))
    assert first["cache"]["inputs_tokenized"] == 1
    same = build(config_from_dict({**cfg, "out": str(tmp_path / "b")}))
    assert same["cache"]["inputs_reused"] == 1  # nothing changed: a hit
    if change == "template kwarg":
        cfg["template_kwargs"] = {"add_generation_prompt": False, "unused": 1}
    elif change == "tokenizer file":
        jinja = tok / "chat_template.jinja"
        jinja.write_text(jinja.read_text().replace("<|im_start|>", "<|im_start|> "))
    else:
        data.write_text(data.read_text().replace("a", "A", 1))
    m = build(config_from_dict({**cfg, "out": str(tmp_path / "c"), "overwrite": True}))
    assert m["cache"]["inputs_reused"] == 0 and m["cache"]["inputs_tokenized"] == 1


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "missing"])
def test_a_damaged_entry_is_found_removed_and_rebuilt(tmp_path, damage):
    _, before = built(tmp_path, "first")
    entries = sorted((Path(os.environ["SFTPREP_CACHE"]) / "entries").glob("*.arrow"))
    assert len(entries) == 2
    target = entries[0]
    data = bytearray(target.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0x10
        target.write_bytes(bytes(data))
    elif damage == "truncated":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        target.unlink()
    m, after = built(tmp_path, "again")
    assert after == before
    assert m["cache"]["inputs_reused"] == 1 and m["cache"]["inputs_tokenized"] == 1
    assert any(w.startswith(f"cache entry {target} is damaged") for w in m["warnings"]), m["warnings"]
    m, _ = built(tmp_path, "third")  # rebuilt: both entries good again
    assert m["cache"]["inputs_reused"] == 2 and not any("cache entry" in w for w in m["warnings"])


def test_two_builds_filling_one_entry_at_once_both_succeed_with_the_same_shards(tmp_path):
    data = tmp_path / "big.jsonl"
    records = [json.loads(x) for x in (DATA / "alpaca_zh.jsonl").read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "instruction": f"{r['instruction']} {i}"}, ensure_ascii=False) + "\n"
                            for i, r in enumerate(records * 25)))
    args = ["-i", data, "-t", CHATML_TOK, "--template", "alpaca", "-q"]
    code = "import sys; from sftprep.cli import main; sys.exit(main())"
    procs = [subprocess.Popen([sys.executable, "-c", code, "build", *map(str, args), "-o", str(tmp_path / name)],
                              env={**os.environ, "PYTHONPATH": str(FIXTURES.parent)}, stderr=subprocess.PIPE)
             for name in ("a", "b")]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    assert (tmp_path / "a" / "shard-train-00000.arrow").read_bytes() == \
        (tmp_path / "b" / "shard-train-00000.arrow").read_bytes()
    r = sftprep_cli("build", *args, "-o", tmp_path / "c")
    assert r.exit_code == 0
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert (tmp_path / "c" / "shard-train-00000.arrow").read_bytes() == \
        (tmp_path / "a" / "shard-train-00000.arrow").read_bytes() and m["totals"]["samples_kept"] == 1000
    entries = list((Path(os.environ["SFTPREP_CACHE"]) / "entries").iterdir())
    assert len(entries) == 2 and all(".tmp" not in p.name for p in entries)  # one entry, sealed; no leftovers


def test_the_cache_keeps_to_its_size_and_the_commands_show_and_prune_it(tmp_path):
    cache = Path(os.environ["SFTPREP_CACHE"])
    built(tmp_path, "a")
    r = sftprep_cli("cache", "list")
    assert r.exit_code == 0 and "2 entries" in r.output and "alpaca_en.json" in r.output and "c4.jsonl" in r.output
    sizes = [p.stat().st_size for p in (cache / "entries").glob("*.arrow")]
    built(tmp_path, "b", cache_max_size=str(max(sizes) + 1000))  # room for one entry
    assert sum(p.stat().st_size for p in (cache / "entries").glob("*.arrow")) <= max(sizes) + 1000
    assert len(list((cache / "entries").glob("*.json"))) == 1
    r = sftprep_cli("cache", "prune", "--max-size", "0")
    assert r.exit_code == 0 and "removed 1 entries" in r.output
    built(tmp_path, "c")
    r = sftprep_cli("cache", "clear")
    assert r.exit_code == 0 and "removed 4 files" in r.output and not list((cache / "entries").iterdir())


def test_no_cache_writes_nothing_and_parts_and_workers_read_entries(tmp_path):
    cache = Path(os.environ["SFTPREP_CACHE"])
    m, _ = built(tmp_path, "plain", cache=False)
    assert "cache" not in m and not (cache / "entries").exists()
    built(tmp_path, "first")
    m = build(config_from_dict({**BASE, "out": str(tmp_path / "p0"), "part": "0/2"}))
    assert m["cache"]["inputs_reused"] == 2
    m, shards = built(tmp_path, "w2", workers=2, max_length=600)
    _, fresh = built(tmp_path, "w2-fresh", cache=False, max_length=600)
    assert m["cache"]["inputs_reused"] == 2 and shards == fresh


def test_a_cache_folder_that_cannot_be_written_is_a_warning_not_a_failure(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    m, shards = built(tmp_path, "a", cache_dir=str(blocked))
    _, fresh = built(tmp_path, "b", cache=False)
    assert shards == fresh
    assert any(w.startswith(f"the sample cache {blocked} cannot be written") for w in m["warnings"]), m["warnings"]
    assert sum("cannot be written" in w for w in m["warnings"]) == 1  # said once, not once per input
