#!/usr/bin/env python
"""Benchmark: peak memory and time of `sftprep build` as the input grows (300k -> 1M -> 3M records), and
for one huge record under each truncation mode.

Each build runs in a fresh process (`python -m sftprep.cli build`), sampled every 50 ms from /proc:
peak RSS, and its anonymous part (the heap: per-sample arrays, packing plan, batches) and file-backed
part (memory-mapped spill and shard pages the kernel can drop). The records are synthetic
prompt/completion pairs of varied length (deterministic), or the first N records of a JSONL file given
with --data (repeated if it is shorter). Prints one row per build as it ends, then a Markdown table:

    records | seconds | peak RSS MiB | x the first size | anon MiB | file MiB

    python bench/memory.py                                   # 300k, 1M and 3M (the table in BENCHMARKS.md)
    python bench/memory.py --sizes 100000 300000             # quicker
    python bench/memory.py --data /work/shared/data/some.jsonl --sizes 100000
    python bench/memory.py --sizes --huge 200                # one 200 MB record: keep_start, keep_end, drop, turns
    python bench/memory.py --sizes --huge 1024 --modes keep_start

`--huge MB` builds a short record and one of MB megabytes (`--modes`: keep_start, keep_end, drop: a
prompt/completion record with a MB completion; turns: `--truncation-unit turns` on a chat whose last
answer is MB long), with --max-record-bytes raised to let it in.

Run it on a quiet machine: another process's load changes the time, not the memory.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
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


def huge(path: Path, mb: int, turns: bool) -> None:
    """A short record, then one of `mb` megabytes (written a megabyte at a time)."""
    filler = " ".join(WORDS[i % len(WORDS)] for i in range(200_000)).encode()[:1 << 20]
    with open(path, "wb") as f:
        short = ({"messages": [{"role": "user", "content": "a short one"}, {"role": "assistant", "content": "yes"}]}
                 if turns else {"prompt": "a short one", "completion": " yes"})
        f.write(json.dumps(short).encode() + b"\n")
        if turns:
            f.write(b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "short"}, '
                    b'{"role": "user", "content": "again"}, {"role": "assistant", "content": "')
        else:
            f.write(b'{"prompt": "Tell me everything.", "completion": " ')
        for _ in range(mb):
            f.write(filler)
        f.write(b'"}]}\n' if turns else b'"}\n')


MODES = {"keep_start": ["--truncation", "keep_start"], "keep_end": ["--truncation", "keep_end"],
         "drop": ["--truncation", "drop", "--max-reject-ratio", "1"],
         "turns": ["--truncation-unit", "turns", "--template", "chatml"]}


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


def build_cmd(data: Path, out: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    """The build, with a sample cache of its own, emptied first: cold, as a first build is (it tokenizes and
    fills the entry), and nothing left in the user's cache folder."""
    cache = out.with_name(out.name + ".cache")
    shutil.rmtree(cache, ignore_errors=True)
    return [sys.executable, "-m", "sftprep.cli", "build", "-i", str(data), "-t", str(args.tokenizer),
            "--max-length", str(args.max_length), "--packing", "bfd", "-o", str(out), "--overwrite", "-q",
            "--cache-dir", str(cache), *extra]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[300_000, 1_000_000, 3_000_000])
    ap.add_argument("--data", type=Path, help="a JSONL file to take records from (default: synthetic)")
    ap.add_argument("--huge", type=int, nargs="*", default=[], help="megabytes of one huge record (rows per --modes)")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    ap.add_argument("--keep", type=Path, help="keep inputs and builds in this folder")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="sftprep-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    table = ["| input | seconds | peak RSS MiB | x the first | anon MiB | file MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    first = None
    for n in args.sizes:
        data = work / f"records-{n}.jsonl"
        if not data.exists():
            from_file(data, args.data, n) if args.data else synthetic(data, n)
        r = measure(build_cmd(data, work / f"out-{n}", args))
        first = first or r
        print(f"{n:>9,} records  {r['seconds']:7.1f} s  {n / r['seconds']:8,.0f} rec/s  peak RSS {r['VmRSS']:7.0f} MiB"
              f" (x{r['VmRSS'] / first['VmRSS']:.2f})  anon {r['RssAnon']:6.0f} MiB  file {r['RssFile']:6.0f} MiB",
              flush=True)
        table.append(f"| {n:,} records | {r['seconds']:.1f} | {r['VmRSS']:,.0f} | {r['VmRSS'] / first['VmRSS']:.2f} "
                     f"| {r['RssAnon']:,.0f} | {r['RssFile']:,.0f} |")
    for mb in args.huge:
        for name in args.modes:
            data = work / f"huge-{mb}mb{'-chat' if name == 'turns' else ''}.jsonl"
            if not data.exists():
                huge(data, mb, name == "turns")
            limit = str(data.stat().st_size + (1 << 20))
            out = work / f"out-huge-{mb}-{name}"
            r = measure(build_cmd(data, out, args, *MODES[name], "--max-record-bytes", limit))
            print(f"one {mb} MB record, {name:10}  {r['seconds']:7.1f} s  peak RSS {r['VmRSS']:7.0f} MiB  "
                  f"anon {r['RssAnon']:6.0f} MiB  file {r['RssFile']:6.0f} MiB", flush=True)
            table.append(f"| one {mb} MB record, {name} | {r['seconds']:.1f} | {r['VmRSS']:,.0f} | | "
                         f"{r['RssAnon']:,.0f} | {r['RssFile']:,.0f} |")
    print("\n".join(table))


if __name__ == "__main__":
    main()
