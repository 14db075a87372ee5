"""Recipes: several sources in one build, each with its own settings and weight, a held-out validation
split, exact duplicates dropped, benchmark items kept out; real fixtures, real builds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.feather as feather
import pytest

from sftprep import build, config_from_dict, load, samples
from sftprep.errors import ConfigError

from ..conftest import CHATML_TOK, DATA, FIXTURES, sftprep_cli, write_jsonl

ALPACA = {"name": "alpaca", "inputs": str(DATA / "alpaca_en.json"), "template": "alpaca", "train_on": "completion"}
GLAIVE = {"name": "glaive", "inputs": str(DATA / "glaive_toolcall.jsonl"), "template": "tokenizer",
          "chat_template": str(FIXTURES / "chat_templates" / "qwen2_5.jinja")}
C4 = {"name": "c4", "inputs": str(DATA / "c4.jsonl"), "format": "text", "train_on": "all"}


def recipe(out: Path, sources: list[dict], **settings) -> dict:
    cfg = {"tokenizer": CHATML_TOK, "max_length": 1024, "out": str(out), "sources": sources, **settings}
    return build(config_from_dict(cfg))


def by_source(folder: Path, split: str = "train") -> dict[str, list[tuple[tuple, tuple]]]:
    """(input_ids, labels) of every sample of a build's split, by its file:line."""
    t = samples(folder, decode=False, split=split).to_pydict()
    out: dict[str, list] = {}
    for src, ids, labels in zip(t["source"], t["input_ids"], t["labels"]):
        out.setdefault(src, []).append((tuple(ids), tuple(labels)))
    return out


def test_three_sources_each_train_the_labels_a_build_of_that_source_alone_gives(tmp_path):
    m = recipe(tmp_path / "mix", [ALPACA, GLAIVE, C4], dedup="none")
    mixed = by_source(tmp_path / "mix")
    assert [s["name"] for s in m["sources"]] == ["alpaca", "glaive", "c4"]
    for spec in (ALPACA, GLAIVE, C4):
        alone = {k: v for k, v in spec.items() if k != "name"}
        build(config_from_dict({"tokenizer": CHATML_TOK, "max_length": 1024, "out": str(tmp_path / spec["name"]),
                                **alone}))
        single = by_source(tmp_path / spec["name"])
        assert single and all(mixed[src] == got for src, got in single.items()), spec["name"]
    assert sum(len(v) for v in mixed.values()) == m["totals"]["samples_kept"] == 100
    # each source kept its own template: alpaca's prompt is untrained, a glaive tool call is trained, c4 all
    info = feather.read_table(tmp_path / "mix" / "samples.feather").to_pydict()
    assert sorted(set(info["source_name"])) == ["alpaca", "c4", "glaive"]
    assert m["template"]["glaive"] == "chat template file qwen2_5.jinja"


def test_a_config_without_sources_builds_the_same_shards_as_before(tmp_path):
    """A plain build is one source; `dedup: auto` keeps its duplicates, as before recipes existed."""
    rec = {"text": "the same line twice"}
    data = write_jsonl(tmp_path / "d.jsonl", [rec, rec, {"text": "another"}])
    m = build(config_from_dict({"inputs": [str(data)], "tokenizer": CHATML_TOK, "out": str(tmp_path / "o")}))
    assert m["totals"]["samples_kept"] == 3 and m["totals"]["dropped_by_reason"] == {}
    assert [f.name for f in sorted((tmp_path / "o").glob("shard-*"))] == ["shard-train-00000.arrow"]
    assert m["sources"][0]["name"] == "default" and m["sources"][0]["records"] == 3


def counts(manifest: dict) -> dict[str, int]:
    return {s["name"]: s["selected"] for s in manifest["sources"]}


def test_choose_and_repeat_give_exact_counts(tmp_path):
    m = recipe(tmp_path / "a", [{**ALPACA, "choose": 25}, {**GLAIVE, "choose": 70}, {**C4, "repeat": 2.5}],
               dedup="none")
    assert counts(m) == {"alpaca": 25, "glaive": 70, "c4": 75}  # 70 = 2 x 30 + 10; 2.5 x 30 = 75
    info = feather.read_table(tmp_path / "a" / "samples.feather").to_pandas()
    c4 = info[info.source_name == "c4"]
    per_record = c4.groupby("source").size()
    assert sorted(per_record.value_counts().items()) == [(2, 15), (3, 15)]  # all twice, half once more
    assert sorted(c4.repeat.unique()) == [0, 1, 2] and info.sample_id.is_unique  # each copy its own id
    glaive = info[info.source_name == "glaive"].groupby("source").size()
    assert sorted(glaive.value_counts().items()) == [(2, 20), (3, 10)]
    m = recipe(tmp_path / "b", [{**ALPACA, "repeat": 2}, GLAIVE, C4], dedup="none")
    assert counts(m) == {"alpaca": 80, "glaive": 30, "c4": 30}


def test_proportion_by_samples_and_by_tokens(tmp_path):
    m = recipe(tmp_path / "a", [ALPACA, {**GLAIVE, "proportion": 0.5}, {**C4, "proportion": 0.3}], dedup="none")
    # alpaca (40, unweighted) fills the remaining 0.2: the build holds 200 samples
    assert counts(m) == {"alpaca": 40, "glaive": 100, "c4": 60}
    m = recipe(tmp_path / "b", [{**ALPACA, "proportion": 0.5}, {**GLAIVE, "proportion": 0.25},
                                {**C4, "proportion": 0.25}], dedup="none")
    # every source weighted: the largest build that repeats none (alpaca's 40 is half: 80 in all)
    assert counts(m) == {"alpaca": 40, "glaive": 20, "c4": 20}
    m = recipe(tmp_path / "c", [ALPACA, {**C4, "proportion": 0.5}], dedup="none", mix_by="tokens")
    tokens = {s["name"]: s["tokens"] for s in m["sources"]}
    longest_c4 = max(len(ids) for v in by_source(tmp_path / "c").values() for ids, _ in v)
    assert abs(tokens["c4"] - tokens["alpaca"]) <= longest_c4  # half of the tokens, to within one sample


def test_the_recipe_is_the_same_whatever_the_file_order_and_the_same_bytes_built_twice_or_in_parts(tmp_path):
    sources = [{**ALPACA, "choose": 30}, {**GLAIVE, "repeat": 1.5}, C4]
    recipe(tmp_path / "a", sources, eval={"fraction": 0.2})
    recipe(tmp_path / "b", sources, eval={"fraction": 0.2})
    for name in ("shard-train-00000.arrow", "shard-validation-00000.arrow", "samples.feather", "rejects.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # parts 0..2, merged: the single build's bytes
    for i in range(3):
        recipe(tmp_path / f"p{i}", sources, eval={"fraction": 0.2}, part=f"{i}/3")
    r = sftprep_cli("merge", *(tmp_path / f"p{i}" for i in range(3)), "--out", tmp_path / "merged", "-q")
    assert r.exit_code == 0, r.output
    for name in ("shard-train-00000.arrow", "shard-validation-00000.arrow", "samples.feather", "rejects.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "merged" / name).read_bytes(), name
    # records shuffled inside their files: the same samples chosen, the same validation split
    shuffled = []
    for spec in sources:
        path = Path(spec["inputs"])
        lines = (json.loads(path.read_text()) if path.suffix == ".json" else path.read_text().splitlines())
        random.Random(1).shuffle(lines)
        shuffled.append({**spec, "inputs": str(write_jsonl(tmp_path / "in" / (path.stem + ".jsonl"), lines))})
    recipe(tmp_path / "s", shuffled, eval={"fraction": 0.2})

    def contents(folder: Path, split: str) -> list:
        return sorted(s for v in by_source(folder, split).values() for s in v)
    assert contents(tmp_path / "a", "validation") == contents(tmp_path / "s", "validation") != []
    assert contents(tmp_path / "a", "train") == contents(tmp_path / "s", "train")


def test_a_record_in_two_sources_and_twice_in_one_is_trained_once(tmp_path):
    planted = {"instruction": "Name the planted record.", "input": "", "output": "It is trained exactly once."}
    alpaca = json.loads((DATA / "alpaca_en.json").read_text())[:10]
    a = write_jsonl(tmp_path / "a.jsonl", alpaca[:5] + [planted] + alpaca[5:] + [planted])
    b = write_jsonl(tmp_path / "b.jsonl", [planted] + alpaca[:0] + [{"instruction": "x", "input": "", "output": "y"}])
    spec = {"template": "alpaca", "train_on": "completion"}
    m = recipe(tmp_path / "o", [{"name": "first", "inputs": str(a), **spec}, {"name": "second", "inputs": str(b), **spec}])
    trained = [t for t in samples(tmp_path / "o").to_pydict()["trained_text"] if "trained exactly once" in t]
    assert len(trained) == 1
    dups = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert [(d["reason"], d["source"], d["source_name"], d["kept_source_name"]) for d in dups] == [
        ("duplicate", f"{a}:12", "first", "first"), ("duplicate", f"{b}:1", "second", "first")]
    assert f"as sample 5 ({a}:6 of source first), which is kept" in dups[1]["message"]  # the copy kept
    assert {s["name"]: s["rejected"] for s in m["sources"]} == {"first": {"duplicate": 1}, "second": {"duplicate": 1}}


def test_a_validation_sample_is_never_also_in_train(tmp_path):
    rec = json.loads((DATA / "alpaca_en.json").read_text())[3]
    a = write_jsonl(tmp_path / "a.jsonl", [rec] * 3 + json.loads((DATA / "alpaca_en.json").read_text())[:20])
    spec = {"template": "alpaca", "train_on": "completion"}
    # the same text, trained differently in two sources: not duplicates, but one split for both
    m = recipe(tmp_path / "o", [{"name": "c", "inputs": str(a), **spec}, {"name": "all", "inputs": str(a),
                                                                          "template": "alpaca", "train_on": "all"}],
               eval={"samples": 6})
    val = {ids for v in by_source(tmp_path / "o", "validation").values() for ids, _ in v}
    train = {ids for v in by_source(tmp_path / "o", "train").values() for ids, _ in v}
    assert len(val) and not val & train and m["totals"]["validation"]["samples"] == 6


def test_the_validation_split_loads_as_datasets_splits_and_with_sftprep_load(tmp_path):
    datasets = pytest.importorskip("datasets")
    m = recipe(tmp_path / "o", [ALPACA, C4], eval={"fraction": 0.25})
    ds = datasets.load_dataset("arrow", data_dir=str(tmp_path / "o"))
    assert set(ds) == {"train", "validation"}
    assert ds["validation"].num_rows == load(tmp_path / "o", split="validation").num_rows \
        == m["totals"]["validation"]["rows"] > 0
    assert ds["train"].num_rows == m["totals"]["rows"]
    assert sum(s["validation"] for s in m["sources"]) == m["totals"]["validation"]["samples"]


def test_a_benchmark_item_planted_with_other_case_spaces_and_punctuation_is_dropped_and_named(tmp_path):
    item = ("Which of the following best describes the function of mitochondria in eukaryotic cells "
            "and why is it called the powerhouse of the cell?")
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"question": "unrelated words here"}, {"question": item, "answer": "B"}])
    leaked = {"instruction": "which of the following BEST describes   the function of mitochondria, in eukaryotic "
                             "cells -- and why is it called the powerhouse of the cell!", "input": "", "output": "Energy."}
    near = {"instruction": "Which of the following best describes the function of mitochondria in eukaryotic "
                           "organisms?", "input": "", "output": "12 words in a row are shared, not 13: kept."}
    alpaca = json.loads((DATA / "alpaca_en.json").read_text())[:10]
    data = write_jsonl(tmp_path / "a.jsonl", alpaca[:4] + [leaked] + alpaca[4:] + [near])
    m = recipe(tmp_path / "o", [{"name": "alpaca", "inputs": str(data), "template": "alpaca"}],
               decontaminate=[str(bench)])
    rejects = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["source"]) for r in rejects] == [("contaminated", f"{data}:5")]
    assert f"{bench}:2" in rejects[0]["message"]
    assert '13-gram "which of the following best describes the function of mitochondria in eukaryotic cells"' in \
        rejects[0]["message"]  # the first shared 13-gram, normalized
    assert m["sources"][0]["rejected"] == {"contaminated": 1} and m["totals"]["samples_kept"] == 11


@pytest.mark.parametrize("source, message", [
    ({"name": "a", "inputs": "x.jsonl", "tempalte": "chatml"}, "source 'a': unknown key `tempalte` (did you mean 'template'?)"),
    ({"name": "a", "inputs": "x.jsonl", "choose": 5, "repeat": 2}, "source 'a': choose and repeat both set"),
    ({"name": "a", "inputs": "x.jsonl", "max_length": 512}, "source 'a': `max_length` is build-wide"),
    ({"name": "a", "inputs": "x.jsonl", "proportion": "half"}, "source 'a': `proportion` must be a number"),
])
def test_a_wrong_source_key_is_one_line_naming_the_source_and_key(tmp_path, source, message):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(json.dumps({"tokenizer": CHATML_TOK, "out": str(tmp_path / "o"), "sources": [source]}))
    r = sftprep_cli("build", cfg)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_proportions_over_one_are_refused_naming_the_sources(tmp_path):
    with pytest.raises(ConfigError, match=r"proportions sum to 1.2 \(alpaca 0.7, c4 0.5\)"):
        recipe(tmp_path / "o", [{**ALPACA, "proportion": 0.7}, {**C4, "proportion": 0.5}])


def test_a_source_whose_records_are_all_rejected_is_named_in_a_warning(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "no answer field"}] * 3)
    m = recipe(tmp_path / "o", [C4, {"name": "broken", "inputs": str(bad), "format": "prompt_completion"}])
    assert any(w.startswith("source broken: all 3 records rejected") for w in m["warnings"]), m["warnings"]


def test_two_sources_from_the_command_line(tmp_path):
    r = sftprep_cli("build", "--source", f"alpaca={DATA / 'alpaca_en.json'}", "--source",
                    f"tools={DATA / 'glaive_toolcall.jsonl'}", "-t", CHATML_TOK, "--template", "chatml",
                    "--eval-samples", "5", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "sources (share of trained tokens): alpaca" in r.output and "tools" in r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [s["name"] for s in m["sources"]] == ["alpaca", "tools"] and m["totals"]["validation"]["samples"] == 5


def test_verify_stats_inspect_and_diff_read_a_recipe_per_source(tmp_path):
    from sftprep import verify

    recipe(tmp_path / "a", [ALPACA, {**C4, "proportion": 0.2}], eval={"fraction": 0.2})
    recipe(tmp_path / "b", [ALPACA, {**C4, "proportion": 0.3}], eval={"fraction": 0.2})
    assert verify(tmp_path / "a").ok
    r = sftprep_cli("stats", tmp_path / "a", "--json")
    per_source = {s["name"]: s for s in json.loads(r.output)["per_source"]}
    assert r.exit_code == 0 and set(per_source) == {"alpaca", "c4"}
    alpaca, c4 = per_source["alpaca"], per_source["c4"]
    assert alpaca["validation"] > 0 and c4["selected"] == round(alpaca["selected"] / 0.8 * 0.2)
    r = sftprep_cli("stats", tmp_path / "a")
    assert "per source" in r.output and "alpaca" in r.output
    r = sftprep_cli("inspect", tmp_path / "a", "--source", "c4", "--count", "2", "--plain")
    assert r.exit_code == 0 and r.output.count("· source c4 ·") == 2 and "alpaca_en" not in r.output
    r = sftprep_cli("inspect", tmp_path / "a", "--source", "c5")
    assert r.exit_code == 2 and "no source 'c5' in this build; its sources: alpaca, c4" in r.output
    r = sftprep_cli("diff", tmp_path / "a", tmp_path / "b", "--show", "0")
    more = round(alpaca["selected"] / 0.7 * 0.3)
    assert "sources.c4.proportion: 0.2 -> 0.3" in r.output and f"c4: selected: {c4['selected']} -> {more}" in r.output
    # a changed validation shard is found like a train shard
    val = tmp_path / "a" / "shard-validation-00000.arrow"
    data = bytearray(val.read_bytes())
    data[-200] ^= 1
    val.write_bytes(bytes(data))
    report = verify(tmp_path / "a")
    assert not report.ok and any(v.file == "shard-validation-00000.arrow" for v in report.violations)


def test_a_samples_file_of_many_batches_holds_both_splits(tmp_path):
    """samples.feather is written 1,024 rows a record batch: its source and split columns keep one dictionary
    over the file (an Arrow IPC file allows no other), train rows then validation rows."""
    records = [{"text": f"record number {i} of a long list"} for i in range(3000)]
    data = write_jsonl(tmp_path / "many.jsonl", records)
    m = recipe(tmp_path / "o", [{"name": "many", "inputs": str(data), "repeat": 1.5}], eval={"fraction": 0.1})
    info = feather.read_table(tmp_path / "o" / "samples.feather").to_pandas()
    held = m["totals"]["validation"]["samples"]
    assert 200 < held < 400 and len(info) == m["totals"]["samples_kept"] + held
    assert list(info.split.unique()) == ["train", "validation"] and (info.split == "validation").sum() == held
    assert info.source_name.unique().tolist() == ["many"] and info.sample_id.is_unique
