#!/usr/bin/env python
"""Two checkouts of sftprep, the same builds: are the shards byte-identical, and is the speed the same?

For a refactor ("one build writer", packing modes as objects, folders): each case is built by each
checkout in a fresh process (`PYTHONPATH=CHECKOUT`), in turn (A B A B ...: a drift of the machine's
speed falls on both), and the table gives each build's seconds and a hash over its shards' sha256,
samples.feather and rejects.jsonl.

    git worktree add --detach /tmp/before HEAD~5
    python bench/same_output.py /tmp/before . --repeat 3 --data-dir ../shared/data \
        --tokenizer ../shared/tokenizers/mistral-7b-v0.1

Cases: 100k Alpaca EN+ZH records with the `alpaca` preset (the tokenizer given), and 10k Glaive tool
chats with `chatml` on the repository's Mistral-ChatML fixture tokenizer. A report: exit code 0 unless a
build fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from itertools import cycle, islice
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD = """
import json, sys, time
from sftprep import build, config_from_dict
cfg = json.loads(sys.argv[1]); t = time.perf_counter(); build(config_from_dict(cfg)); print(time.perf_counter() - t)
"""


def records(data_dir: Path, names: tuple[str, ...], n: int, path: Path) -> Path:
    base = []
    for name in names:
        base += json.loads((data_dir / name).read_text(encoding="utf-8"))
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in islice(cycle(base), n)),
                    encoding="utf-8")
    return path


def output_hash(out: Path) -> str:
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    h = hashlib.sha256()
    for s in manifest["shards"]:
        h.update(s["sha256"].encode())
    for name in ("samples.feather", "rejects.jsonl"):
        h.update(hashlib.sha256((out / name).read_bytes()).digest())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path, help="checkout A (e.g. a worktree of the previous commit)")
    ap.add_argument("after", type=Path, help="checkout B")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--alpaca", type=int, default=100_000, help="Alpaca records")
    ap.add_argument("--chats", type=int, default=10_000, help="Glaive tool chats")
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "tokenizers" / "mistral-7b-v0.1"))
    a = ap.parse_args()
    a.data_dir, a.tokenizer = a.data_dir.resolve(), str(Path(a.tokenizer).resolve())
    tmp = Path(tempfile.mkdtemp(prefix="same-output-"))
    cases = {
        f"{a.alpaca:,} Alpaca, alpaca preset": {
            "inputs": [str(records(a.data_dir, ("alpaca_en_demo.json", "alpaca_zh_demo.json"), a.alpaca,
                                   tmp / "alpaca.jsonl"))],
            "tokenizer": a.tokenizer, "template": "alpaca", "max_length": 2048},
        f"{a.chats:,} Glaive tool chats, chatml": {
            "inputs": [str(records(a.data_dir, ("glaive_toolcall_en_demo.json",), a.chats, tmp / "chat.jsonl"))],
            "tokenizer": str(REPO / "fixtures" / "tokenizers" / "mistral-chatml"), "template": "chatml",
            "max_length": 2048},
    }
    print("| case | checkout | seconds (median of runs) | runs | output hash |")
    print("| --- | --- | ---: | --- | --- |")
    for name, cfg in cases.items():
        seconds: dict[Path, list[float]] = {a.before: [], a.after: []}
        hashes: dict[Path, set[str]] = {a.before: set(), a.after: set()}
        for _ in range(a.repeat):
            for tree in (a.before, a.after):
                out = tmp / f"out-{tree.resolve().name}"
                run = subprocess.run([sys.executable, "-c", BUILD, json.dumps({**cfg, "out": str(out), "overwrite": True})],
                                     env={**os.environ, "PYTHONPATH": str(tree.resolve())}, capture_output=True,
                                     text=True, cwd=tmp)
                if run.returncode:
                    sys.exit(f"{tree}: the build failed:\n{run.stderr[-2000:]}")
                seconds[tree].append(float(run.stdout.strip().splitlines()[-1]))
                hashes[tree].add(output_hash(out))
        for tree in (a.before, a.after):
            runs = ", ".join(f"{s:.2f}" for s in seconds[tree])
            print(f"| {name} | {tree} | {statistics.median(seconds[tree]):.2f} | {runs} | {', '.join(hashes[tree])} |")
        ratio = statistics.median(seconds[a.after]) / statistics.median(seconds[a.before])
        same = hashes[a.before] == hashes[a.after] and len(hashes[a.after]) == 1
        print(f"|  | after / before | {ratio:.3f}x | | {'identical' if same else 'DIFFERENT'} |", flush=True)


if __name__ == "__main__":
    main()
