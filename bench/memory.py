#!/usr/bin/env python
"""Benchmark: peak memory and time of `sftprep build` as the input grows (100k -> 300k -> 1M records).

Each size is built in a fresh process (`python -m sftprep.cli build`), sampled every 50 ms from
/proc: peak RSS, and its anonymous part (the heap: per-sample metadata, packing plan, batches) and
file-backed part (memory-mapped spill and shard pages the kernel can drop). The records are
synthetic prompt/completion pairs of varied length (deterministic), or the first N records of a
JSONL file given with --data (repeated if it is shorter). Prints one table:

    records | seconds | records/s | peak RSS MiB | peak anon MiB | peak file MiB | anon bytes/record

    python bench/memory.py                                   # 100k and 300k
    python bench/memory.py --sizes 100000 300000 1000000
    python bench/memory.py --data /work/shared/data/some.jsonl --sizes 100000

Run it on a quiet machine: another process's load changes the time, not the memory.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "fixtures" / "tokenizers" / "mistral"
WORDS = ("the a of to and in is it you that was for on are with as I his they be at one have this from or "
         "had by word but what some we can out other were all there when up use your how said an each she "
         "which do their time if will way about many then them write would like so these her long make thing "
         "see him two has look more day could go come did number sound no most people my over know water").split()


def synthetic(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(5, 200)))
            f.write(json.dumps({"prompt": f"{prompt} ({i})?", "completion": " " + answer + "."}) + "\n")


def from_file(path: Path, src: Path, n: int) -> None:
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(lines[i % len(lines)] + "\n")


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def measure(cmd: list[str]) -> dict[str, float]:
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def sample() -> None:
        while proc.poll() is None:
            for k, v in _status(proc.pid).items():
                if k in peaks:
                    peaks[k] = max(peaks[k], v)
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    t.join()
    if proc.returncode != 0:
        sys.exit(f"build failed ({proc.returncode}): {err[-2000:]}")
    return {"seconds": seconds, **{k: v / 2**20 for k, v in peaks.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--data", type=Path, help="a JSONL file to take records from (default: synthetic)")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    ap.add_argument("--keep", type=Path, help="keep inputs and builds in this folder")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="sftprep-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes:
        data = work / f"records-{n}.jsonl"
        if not data.exists():
            from_file(data, args.data, n) if args.data else synthetic(data, n)
        cmd = [sys.executable, "-m", "sftprep.cli", "build", "-i", str(data), "-t", str(args.tokenizer),
               "--max-length", str(args.max_length), "--packing", "bfd", "-o", str(work / f"out-{n}"),
               "--overwrite", "-q"]
        r = measure(cmd)
        rows.append((n, r))
        print(f"{n:>9,} records  {r['seconds']:7.1f} s  {n / r['seconds']:8,.0f} rec/s  peak RSS {r['VmRSS']:7.0f} MiB"
              f"  anon {r['RssAnon']:6.0f} MiB  file {r['RssFile']:6.0f} MiB"
              f"  ({r['RssAnon'] * 2**20 / n:5.0f} anon bytes/record)", flush=True)
    if len(rows) > 1:
        (n0, a), (n1, b) = rows[0], rows[-1]
        print(f"{n1 / n0:.0f}x the records: peak RSS x{b['VmRSS'] / a['VmRSS']:.2f}, anon x{b['RssAnon'] / a['RssAnon']:.2f}, "
              f"time x{b['seconds'] / a['seconds']:.2f}")


if __name__ == "__main__":
    main()
