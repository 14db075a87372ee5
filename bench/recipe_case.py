"""`bench/prep.py --case recipe`: what a recipe costs over a plain build of the same records.

The Alpaca EN+ZH demo records, made unique (each instruction numbered, so dedup finds nothing to drop and
every build packs the same samples), are written as three files and built three ways in one run, each in a
fresh process (best of `--repeat`):

  single    the three files as one plain build (`--input` x 3)
  recipe    the three files as three sources with weights (none, choose, proportion), dedup and a 1%
            validation split
  decontam  the recipe plus `decontaminate:` against a benchmark file of 10,000 items (sentences of the
            C4 demo documents, numbered)

and prints wall seconds and peak RSS of each, with the verdicts: recipe <= 1.10x single, decontam <= 1.15x
single, peak RSS of each <= 1.2x single's.
"""

from __future__ import annotations

import json
import re
import resource
import time
from pathlib import Path
from typing import Any

TARGET_RECIPE = 1.10
TARGET_DECONTAM = 1.15
TARGET_RSS = 1.2
BENCH_ITEMS = 10_000


def write_sources(records: list[dict[str, Any]], folder: Path) -> list[Path]:
    """The records, each instruction numbered (unique), dealt round-robin into three JSON Lines files."""
    paths = [folder / f"part-{k}.jsonl" for k in range(3)]
    files = [open(p, "w", encoding="utf-8") for p in paths]
    for i, r in enumerate(records):
        files[i % 3].write(json.dumps({**r, "instruction": f"{r['instruction']} (#{i})"}, ensure_ascii=False) + "\n")
    for f in files:
        f.close()
    return paths


def write_benchmark(c4: Path, path: Path, n: int = BENCH_ITEMS) -> Path:
    """`n` benchmark items: sentences of 13+ words from the C4 demo documents, numbered, cycled."""
    sentences = [s.strip() for line in open(c4, encoding="utf-8") for s in re.split(r"(?<=[.!?])\s+",
                                                                                       json.loads(line)["text"])
                 if len(s.split()) >= 13]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"{sentences[i % len(sentences)]} (item {i})"}) + "\n")
    return path


def run_build(cfg: dict[str, Any]) -> dict[str, Any]:
    """One build (in the calling process: `isolated` runs it in a fresh one); its time and peak RSS."""
    from sftprep import build, config_from_dict

    t0 = time.perf_counter()
    m = build(config_from_dict(cfg))
    seconds = time.perf_counter() - t0
    t = m["totals"]
    return {"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "kept": t["samples_kept"], "tokens": t["tokens"], "validation": (t.get("validation") or {}).get("samples", 0),
            "dropped": t["dropped_by_reason"]}


def configs(paths: list[Path], tokenizer: Path, max_length: int, out: Path, bench: Path) -> dict[str, dict[str, Any]]:
    base = {"tokenizer": str(tokenizer), "template": "chatml", "max_length": max_length, "packing": "bfd",
            "overwrite": True, "cache": False}  # every build tokenizes: the recipe's cost, not the cache's gain
    third = sum(1 for _ in open(paths[1], encoding="utf-8"))
    sources = [{"name": "a", "inputs": [str(paths[0])]},
               {"name": "b", "inputs": [str(paths[1])], "choose": third - third // 10},
               {"name": "c", "inputs": [str(paths[2])], "proportion": 0.3}]
    recipe = {**base, "sources": sources, "dedup": "exact", "eval": {"fraction": 0.01}}
    return {"single": {**base, "inputs": [str(p) for p in paths], "out": str(out / "single")},
            "recipe": {**recipe, "out": str(out / "recipe")},
            "decontam": {**recipe, "decontaminate": [str(bench)], "out": str(out / "decontam")}}


def run_recipe_case(a, tmp: Path, load_records, isolated, git_state, load_average) -> None:
    records = load_records(a.data_dir, a.samples)
    paths = write_sources(records, tmp)
    bench = write_benchmark(a.data_dir / "c4_demo.jsonl", tmp / "benchmark.jsonl")
    cfgs = configs(paths, a.tokenizer, a.max_length, tmp, bench)
    print(f"sftprep recipe benchmark: {a.samples:,} Alpaca EN+ZH records (numbered), three files; tokenizer "
          f"{a.tokenizer.name}, chatml, max_length {a.max_length}, bfd; benchmark {BENCH_ITEMS:,} C4 sentences")
    print(f"sftprep code: {git_state()}; load average {load_average()}")
    best: dict[str, dict[str, Any]] = {}
    for rep in range(a.repeat):
        for name, cfg in cfgs.items():  # interleaved, so a disturbance hits one run, not one variant
            r = isolated(run_build, cfg)
            if name not in best or r["seconds"] < best[name]["seconds"]:
                best[name] = r
            print(f"[{rep + 1}/{a.repeat}] {name:9} {r['seconds']:6.2f}s  peak RSS {r['rss_mb']:7.0f} MB  "
                  f"{r['kept']:,} train samples, {r['validation']:,} validation, dropped {r['dropped']}", flush=True)
    single = best["single"]
    print()
    print(f"{'build':10} {'seconds':>8} {'x single':>9} {'peak RSS MB':>12} {'x single':>9}")
    for name, r in best.items():
        print(f"{name:10} {r['seconds']:8.2f} {r['seconds'] / single['seconds']:9.3f} {r['rss_mb']:12.0f} "
              f"{r['rss_mb'] / single['rss_mb']:9.3f}")
    print("verdicts:")
    for name, target in (("recipe", TARGET_RECIPE), ("decontam", TARGET_DECONTAM)):
        x = best[name]["seconds"] / single["seconds"]
        m = best[name]["rss_mb"] / single["rss_mb"]
        print(f"  [{'PASS' if x <= target else 'FAIL'}] {name} <= {target}x the single-source build: {x:.3f}x")
        print(f"  [{'PASS' if m <= TARGET_RSS else 'FAIL'}] {name} peak RSS <= {TARGET_RSS}x: {m:.3f}x")
