#!/usr/bin/env python
"""Where a build's time goes, phase by phase, at --workers 1, 2, ...: what is serial and what scales.

Each phase of `sftprep.api` is wrapped with a wall clock and this process's CPU clock; with workers the
pool's CPU (children) is shown apart, so "main CPU" is the share that one process does alone whatever
the number of cores (reading + JSON parsing + pickling batches out and results back, packing, writing).

    python bench/phases.py --records 50000 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

PHASES = {"load_fast": "api", "hash_input": "api", "encode_all": "api", "pack": "output", "_write_shards": "output",
          "write_samples": "output", "copy_tokenizer": "output"}  # phase -> the sftprep module that calls it
NESTED = {"_write_shards": "pack"}  # packing runs inside _write_shards: shown apart, not twice


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_build(cfg: dict) -> dict[str, tuple[float, float, float]]:
    import importlib

    import sftprep.api as api
    from sftprep import config_from_dict

    spent: dict[str, list[float]] = {p: [0.0, 0.0, 0.0] for p in PHASES}
    where = {p: importlib.import_module(f"sftprep.{m}") for p, m in PHASES.items()}
    originals = {p: getattr(where[p], p) for p in PHASES}

    def wrap(name, fn):
        def inner(*a, **k):
            t, c, kids = time.perf_counter(), time.process_time(), children_cpu()
            try:
                return fn(*a, **k)
            finally:
                s = spent[name]
                s[0] += time.perf_counter() - t
                s[1] += time.process_time() - c
                s[2] += children_cpu() - kids
        return inner

    for p in PHASES:
        setattr(where[p], p, wrap(p, originals[p]))
    try:
        t, c, kids = time.perf_counter(), time.process_time(), children_cpu()
        api.build(config_from_dict(cfg))
        spent["total"] = [time.perf_counter() - t, time.process_time() - c, children_cpu() - kids]
        for outer, inner in NESTED.items():
            spent[outer] = [a - b for a, b in zip(spent[outer], spent[inner])]
    finally:
        for p in PHASES:
            setattr(where[p], p, originals[p])
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--tokenizer", default=str(REPO / "fixtures" / "tokenizers" / "mistral"))
    a = ap.parse_args()
    base = []
    for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json"):
        base += json.loads((a.data_dir / name).read_text(encoding="utf-8"))
    tmp = Path(tempfile.mkdtemp(prefix="sftprep-phases-"))
    try:
        data = tmp / "records.jsonl"
        with open(data, "w", encoding="utf-8") as f:
            for r in islice(cycle(base), a.records):
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{a.records:,} records; wall s / main-process CPU s / worker-pool CPU s per phase")
        print("| workers | " + " | ".join((*PHASES, "total")) + " |")
        print("| ---: |" + " ---: |" * (len(PHASES) + 1))
        for w in a.workers:
            spent = timed_build({"inputs": [str(data)], "tokenizer": a.tokenizer, "template": "chatml",
                                 "max_length": 2048, "out": str(tmp / "out"), "overwrite": True, "workers": w})
            cells = [f"{s[0]:.1f} / {s[1]:.1f}" + (f" / {s[2]:.1f}" if s[2] > 0.05 else "")
                     for s in (spent[p] for p in (*PHASES, "total"))]
            print(f"| {w} | " + " | ".join(cells) + " |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
