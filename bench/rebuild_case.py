"""`bench/prep.py --case rebuild`: what the sample cache saves when a build is changed and built again.

The 100k Alpaca EN+ZH records of the alpaca case (chatml, bfd, max_length 2048), in one run, each build in a
fresh process (best of `--repeat`):

  floor      the Rust tokenizer alone on the rendered texts (prep.py's floor)
  no cache   `sftprep build --no-cache`
  cold       the same build with the cache on and empty: it tokenizes and writes every entry
  rebuild    the same build with --max-length 4096, the cache holding the cold build's entries

and prints the verdicts: rebuild <= 0.15x the floor, cold <= 1.05x the no-cache build; and the cache's size
on disk per million tokens.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

TARGET_REBUILD = 0.15
TARGET_COLD = 1.05


def run_build(cfg: dict[str, Any]) -> dict[str, Any]:
    from sftprep import build, config_from_dict

    t0 = time.perf_counter()
    m = build(config_from_dict(cfg))
    return {"seconds": time.perf_counter() - t0, "tokens": m["totals"]["tokens"], "rows": m["totals"]["rows"],
            "cache": (m.get("cache") or {}).get("summary", "off")}


def cache_size(folder: Path) -> tuple[int, int]:
    """(bytes, tokens) of the sealed entries in a cache folder."""
    from sftprep.tokenize.cache import list_entries

    listed = list_entries(folder)
    return sum(e["size"] for e in listed), sum(e["tokens"] for e in listed)


def run_rebuild_case(a, tmp: Path, load_records, write_jsonl, render_chatml, run_floor, isolated, git_state,
                     load_average) -> None:
    records = load_records(a.data_dir, a.samples)
    jsonl = tmp / "alpaca_en_zh.jsonl"
    write_jsonl(records, jsonl)
    texts = [render_chatml(r) for r in records]
    base = {"inputs": [str(jsonl)], "tokenizer": str(a.tokenizer), "template": "chatml", "max_length": a.max_length,
            "packing": "bfd", "overwrite": True}
    print(f"sftprep rebuild benchmark: {a.samples:,} Alpaca EN+ZH records, tokenizer {a.tokenizer.name}, chatml, "
          f"bfd; max_length {a.max_length}, then {2 * a.max_length} from the cache")
    print(f"sftprep code: {git_state()}; load average {load_average()}")
    best: dict[str, dict[str, Any]] = {}
    for rep in range(a.repeat):
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        runs = {
            "floor": lambda: isolated(run_floor, texts, a.tokenizer,
                                      [int(x) for x in a.floor_batches.split(",") if x.strip()]),
            "no cache": lambda: isolated(run_build, {**base, "out": str(tmp / "plain"), "cache": False}),
            "cold": lambda: isolated(run_build, {**base, "out": str(tmp / "cold"), "cache_dir": str(tmp / "cache")}),
            "rebuild": lambda: isolated(run_build, {**base, "out": str(tmp / "rebuild"), "cache_dir": str(tmp / "cache"),
                                                    "max_length": 2 * a.max_length}),
        }
        for name, run in runs.items():  # in this order: the rebuild reads the cold build's entries
            r = run()
            if name not in best or r["seconds"] < best[name]["seconds"]:
                best[name] = r
            print(f"[{rep + 1}/{a.repeat}] {name:9} {r['seconds']:6.2f}s  {r.get('cache', '')}", flush=True)
    size, tokens = cache_size(tmp / "cache")
    floor = best["floor"]["seconds"]
    print()
    print(f"{'run':10} {'seconds':>8} {'x floor':>8}")
    for name, r in best.items():
        print(f"{name:10} {r['seconds']:8.2f} {r['seconds'] / floor:8.3f}")
    print(f"cache on disk: {size / 2**20:.1f} MiB for {tokens / 1e6:.1f}M tokens = "
          f"{size / 2**20 / (tokens / 1e6):.2f} MiB per million tokens")
    print("verdicts:")
    x = best["rebuild"]["seconds"] / floor
    print(f"  [{'PASS' if x <= TARGET_REBUILD else 'FAIL'}] rebuild (--max-length {2 * a.max_length}, from the cache) "
          f"<= {TARGET_REBUILD}x the floor: {x:.3f}x")
    c = best["cold"]["seconds"] / best["no cache"]["seconds"]
    print(f"  [{'PASS' if c <= TARGET_COLD else 'FAIL'}] cold build with the cache on <= {TARGET_COLD}x a --no-cache "
          f"build: {c:.3f}x")
