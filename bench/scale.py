#!/usr/bin/env python
"""Benchmark: a build in parts + merge (`--part i/N`, `sftprep merge`) against one build, as records grow.

For each size: one whole build, then parts 0..N-1 one after another (what N machines of a SLURM job
array or N Ray tasks each do), then the merge; every step runs in its own process, so each has its own
wall time and peak RSS. It checks that the merged shards are the single build's (sha256) and prints a
Markdown table (seconds and peak RSS per step; "parts, slowest" is the wall time N machines would see).

    python bench/scale.py                                   # 100k and 300k records, 4 parts
    python bench/scale.py --records 1000000 --parts 8
    python bench/scale.py --records 100000 --data ../shared/data/alpaca_en_demo.json --workers 2

Records: Alpaca EN+ZH demo records of ../shared/data (repeated), or the files given with --data
(JSON arrays or JSON Lines, repeated up to --records); Mistral tokenizer of fixtures/, ChatML, max_length
2048, BFD.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = [REPO.parent / "shared" / "data" / n for n in ("alpaca_en_demo.json", "alpaca_zh_demo.json")]

# Runs in a fresh interpreter: one step, its wall time and its own peak RSS (no pool: workers=1 unless asked;
# with --workers the pool's children are added with RUSAGE_CHILDREN).
STEP = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
if args["step"] == "merge":
    from sftprep.scale.merge import merge
    m = merge(args["parts"], args["out"], overwrite=True)
else:
    from sftprep import build, config_from_dict
    m = build(config_from_dict(args["config"]))
wall = time.perf_counter() - t0
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({{"seconds": wall, "rss_mib": rss / 1024, "totals": m["totals"],
                  "shards": [s["sha256"] for s in m["shards"]]}}))
"""


def records_from(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        if not p.exists():
            sys.exit(f"error: {p} not found (pass --data FILE ...)")
        text = p.read_text(encoding="utf-8")
        out += json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    return out


def step(args: dict) -> dict:
    code = STEP.format(repo=str(REPO))
    r = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"step failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_size(n: int, base: list[dict], parts: int, workers: int, tokenizer: str, tmp: Path,
             single_too: bool = True) -> dict:
    data = tmp / f"records-{n}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for r in islice(cycle(base), n):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    cfg = {"inputs": [str(data)], "tokenizer": tokenizer, "template": "chatml", "max_length": 2048,
           "packing": "bfd", "overwrite": True, "workers": workers}
    single = {"seconds": float("nan"), "rss_mib": float("nan"), "shards": None}
    if single_too:
        single = step({"step": "build", "config": {**cfg, "out": str(tmp / "single")}})
        shutil.rmtree(tmp / "single")
    print(f"  {n:,} records: single build {single['seconds']:.1f} s, {single['rss_mib']:.0f} MiB", flush=True)
    done = []
    for i in range(parts):
        done.append(step({"step": "build", "config": {**cfg, "out": str(tmp / f"part{i}"), "part": f"{i}/{parts}"}}))
        print(f"  part {i}/{parts} {done[-1]['seconds']:.1f} s, {done[-1]['rss_mib']:.0f} MiB", flush=True)
    merged = step({"step": "merge", "parts": [str(tmp / f"part{i}") for i in range(parts)], "out": str(tmp / "merged")})
    print(f"  merge {merged['seconds']:.1f} s, {merged['rss_mib']:.0f} MiB", flush=True)
    same = merged["shards"] == single["shards"] if single_too else None
    for p in [tmp / "merged", data, *(tmp / f"part{i}" for i in range(parts))]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return {"records": n, "single": single, "parts": done, "merge": merged, "same": same}


def table(results: list[dict], parts: int) -> str:
    lines = ["| records | single build s / MiB | each part s (N=%d) | parts, slowest s / MiB | merge s / MiB | "
             "parts slowest + merge s | merged == single |" % parts,
             "| ---: | ---: | --- | ---: | ---: | ---: | :---: |"]
    for r in results:
        ps = r["parts"]
        slow = max(ps, key=lambda p: p["seconds"])
        each = ", ".join(f"{p['seconds']:.1f}" for p in ps)
        lines.append(f"| {r['records']:,} | {r['single']['seconds']:.1f} / {r['single']['rss_mib']:.0f} | "
                     f"{each} | {slow['seconds']:.1f} / "
                     f"{max(p['rss_mib'] for p in ps):.0f} | {r['merge']['seconds']:.1f} / {r['merge']['rss_mib']:.0f} | "
                     f"{slow['seconds'] + r['merge']['seconds']:.1f} | {'-' if r['same'] is None else 'yes' if r['same'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--data", type=Path, nargs="+", default=DEFAULT_DATA)
    ap.add_argument("--tokenizer", default=str(REPO / "fixtures" / "tokenizers" / "mistral"))
    ap.add_argument("--skip-single", action="store_true", help="Parts and merge only (no whole build to compare).")
    ap.add_argument("--tmp", type=Path, help="Scratch folder (default: a temporary one, removed).")
    a = ap.parse_args()
    base = records_from(a.data)
    print(f"# {platform.node()} {platform.machine()}, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}; {len(base):,} distinct records", flush=True)
    tmp = a.tmp or Path(tempfile.mkdtemp(prefix="sftprep-scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        results = [run_size(n, base, a.parts, a.workers, a.tokenizer, tmp, not a.skip_single) for n in a.records]
    finally:
        if a.tmp is None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(table(results, a.parts))


if __name__ == "__main__":
    main()
