"""The public Python surface: `build(config)` and `load(dir)`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from . import __version__
from .config import BuildConfig, ConfigError
from .encode import Encoder
from .labels import IGNORE_INDEX
from .manifest import MANIFEST, fsync_dir, read_manifest, shard_path, write_manifest
from .packing import fill_ratio, pack_bfd, pack_wrapped
from .pipeline import encode_all
from .readers import expand_inputs
from .shards import SCHEMA, names_path, open_shard, rows_batch, sha256_file, shard_name, shard_writer, write_table
from .store import SampleStore
from .tokenizer import load_fast, tokenizer_identity

WRITE_ROWS = 1024  # rows per record batch in a shard
SAMPLES_FILE = "samples.feather"  # Arrow IPC file too, but no `*.arrow` glob meets it
OLD_SAMPLES_FILE = "samples.arrow"  # older builds: still read, as their manifest names it
REJECTS_FILE = "rejects.jsonl"
TOKENIZER_DIR = "tokenizer"  # a copy of the build's tokenizer: the folder is usable anywhere
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
SPILL_STEM = "tokens.spill"  # tokens.spill.{ids,labels}.tmp: removed at the end, or by the next build


class BuildError(RuntimeError):
    """The build ran but its result must not be used (e.g. too many rejected records)."""


def build(config: BuildConfig, progress: Callable[[int], None] | None = None, *,
          allow_code: bool = False) -> dict[str, Any]:
    """Read, render, tokenize, label, pack and write shards; return the manifest.

    Args:
        config: the resolved build configuration.
        progress: called with the number of records just processed, batch by batch.
        allow_code: let a `module:function` template import and run Python code.

    Raises:
        ConfigError / FileNotFoundError: a setting is wrong (nothing is written).
        RecordError: a bad record under `on_error="fail"` (no manifest is written).
        BuildError: too many records rejected (shards and rejects are left, no manifest).
    """
    if allow_code:
        config = dataclasses.replace(config, allow_code=True)
    lock = _OutLock(Path(config.out))
    try:
        return _build(config, progress, lock)
    finally:
        lock.release()


class _OutLock:
    """One build per output folder at a time: an advisory lock on OUT/.lock, taken once the settings
    are checked (a refused build writes nothing) and held until the build ends."""

    def __init__(self, out: Path) -> None:
        self.out, self.fd = out, None

    def acquire(self) -> None:
        import fcntl

        out = self.out
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file, not a folder")
        out.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            self.release()
            raise ConfigError(f"--out {out} is being written by another sftprep build (pid {holder}); wait for it "
                              "to finish, or choose another folder") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _build(config: BuildConfig, progress: Callable[[int], None] | None, lock: _OutLock) -> dict[str, Any]:
    tok = load_fast(config.tokenize.tokenizer)
    inputs = _inputs(config)
    encoder = Encoder(config, tok)  # validates template settings before any work
    identity = tokenizer_identity(tok, config.tokenize.tokenizer)
    input_info = [{"path": str(p), "sha256": _hash_input(p)} for p in inputs]
    build_id = _build_id(config, input_info, identity)
    lock.acquire()
    out = _prepare_out(Path(config.out), build_id, config.overwrite)

    store = SampleStore(out, SPILL_STEM)
    try:
        rejects, read = encode_all(config, inputs, encoder, store, progress)
        _check_rejects(config, rejects, read, out)
        store.seal()
        rows, pieces = _pack(config, store)
        shards = _write_shards(config, out, store, rows, pieces, identity["pad_id"])
        _write_samples(out, store)
        _write_rejects(out, rejects)
        _copy_tokenizer(Path(config.tokenize.tokenizer), out)
    except BaseException:
        _remove_temps(out)  # a failed write (disk full...) leaves no *.tmp behind
        raise
    finally:
        store.remove()

    tokens = sum(s["tokens"] for s in shards)
    n_rows = sum(s["rows"] for s in shards)
    trained = sum(s["trained_tokens"] for s in shards)
    totals = {
        "records_read": read,
        "samples_kept": len(store),
        "samples_dropped": len(rejects),
        "dropped_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "samples_truncated": int(sum(store.truncated)),
        "tokens": tokens,
        "trained_tokens": trained,
        "rows": n_rows,
        "fill_ratio": round(fill_ratio(tokens, n_rows, config.tokenize.max_length), 6)
        if config.pack.mode != "none" else None,
    }
    manifest = {
        "tool": {"name": "sftprep", "version": __version__},
        "build_id": build_id,
        "config": config.to_dict(),
        "inputs": input_info,
        "template": encoder.renderer.description,
        "warnings": encoder.renderer.warnings,
        "tokenizer": {**identity, "path": TOKENIZER_DIR, "source": str(tok.path.resolve()),
                      "files": sorted(p.name for p in (out / TOKENIZER_DIR).iterdir())},
        "max_length": config.tokenize.max_length,
        "max_token_id": max(store.max_id, identity["pad_id"]),  # lets sfttrain check ids without reading shards
        "packing": config.pack.mode,
        "shards": [{k: s[k] for k in ("file", "rows", "tokens", "sha256")} for s in shards],
        "samples_file": SAMPLES_FILE,
        "rejects_file": REJECTS_FILE,
        "totals": totals,
    }
    write_manifest(out, manifest)
    return manifest


def _remove_temps(out: Path) -> None:
    """Remove the build's temporary files and folders (`*.tmp`) from `out`, after an error."""
    for p in out.glob("*.tmp"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def load(path: str | Path) -> pa.Table:
    """All shards of a build as one memory-mapped `pyarrow.Table` (zero-copy); `.to_pandas()` away."""
    manifest = read_manifest(path)
    tables = [open_shard(shard_path(path, s["file"])) for s in manifest["shards"]]
    if not tables:
        return SCHEMA.empty_table()
    return pa.concat_tables(tables)


# -- stages ----------------------------------------------------------------------------------

def _inputs(config: BuildConfig) -> list[Path]:
    """The input files, resolved once (the list hashed is the list read), never from inside `--out`
    (a recursive glob would otherwise read the build's own rejects.jsonl)."""
    out = Path(config.out).resolve()
    inputs = [p for p in expand_inputs(config.read.inputs) if out not in p.resolve().parents]
    if not inputs:
        raise FileNotFoundError(f"no input outside the output folder {config.out}: "
                                f"{', '.join(config.read.inputs)} match only files the build writes")
    return inputs


def _check_rejects(config: BuildConfig, rejects: list, read: int, out: Path) -> None:
    if read == 0:
        raise BuildError("the inputs hold no records")
    ratio = len(rejects) / read
    if rejects and ratio > config.read.max_reject_ratio:
        _write_rejects(out, rejects)
        reasons = ", ".join(f"{k}: {v}" for k, v in Counter(r["reason"] for r in rejects).most_common())
        raise BuildError(f"{len(rejects)} of {read} records rejected ({ratio:.0%} > max_reject_ratio "
                         f"{config.read.max_reject_ratio:.0%}; {reasons}); first: {rejects[0]['source']}: "
                         f"{rejects[0]['message']}. All are listed in {out / REJECTS_FILE}")


def _pack(config: BuildConfig, store: SampleStore) -> tuple[list[list[int]], list | None]:
    lengths = store.lengths.tolist()
    mode, max_length = config.pack.mode, config.tokenize.max_length
    if mode == "bfd":
        rows, pieces = pack_bfd(lengths, max_length), None
    elif mode == "wrapped":
        pieces = pack_wrapped(lengths, max_length)
        rows = list(range(len(pieces)))
    else:
        rows, pieces = [[i] for i in range(len(lengths))], None
    order = list(range(len(rows)))
    if mode == "bfd":  # BFD emits rows by fill; shuffle so shard position says nothing of length
        random.Random(config.pack.seed).shuffle(order)
        rows = [rows[i] for i in order]
    return rows, pieces


def _write_shards(config: BuildConfig, out: Path, store: SampleStore, rows: list, pieces: list | None,
                  pad: int) -> list[dict[str, Any]]:
    """Write rows in shards of `shard_size` rows, `WRITE_ROWS` rows per record batch, copying
    samples out of the spill files into two reused buffers."""
    max_length = config.tokenize.max_length
    padded = config.pack.mode != "none"
    lengths, sample_ids = store.lengths, store.sample_ids
    size = config.pack.shard_size
    buf_len = min(WRITE_ROWS, size) * max_length
    buf_ids, buf_labels = np.empty(buf_len, np.int32), np.empty(buf_len, np.int32)
    shards = []
    for k, first in enumerate(range(0, len(rows), size)):
        name, tokens, trained = shard_name(k), 0, 0
        with shard_writer(out / name) as writer:
            for lo in range(first, min(first + size, len(rows)), WRITE_ROWS):
                copies, gaps, seq_lens, sids, row_off, seq_off = [], [], [], [], [0], [0]
                for row in rows[lo:min(lo + WRITE_ROWS, first + size)]:
                    parts = pieces[row] if pieces is not None else [(i, 0, lengths[i]) for i in row]
                    dest = row_off[-1]
                    for i, a, b in parts:
                        copies.append((i, a, b, dest))
                        dest += b - a
                        seq_lens.append(b - a)
                        sids.append(sample_ids[i])
                    row_off.append(row_off[-1] + max_length if padded else dest)
                    seq_off.append(len(seq_lens))
                    if dest < row_off[-1]:
                        gaps.append((dest, row_off[-1]))
                n = row_off[-1]
                if n > len(buf_ids):  # unpadded rows may exceed the buffer
                    buf_ids, buf_labels = np.empty(n, np.int32), np.empty(n, np.int32)
                ids, labels = buf_ids[:n], buf_labels[:n]
                store.gather(copies, gaps, ids, labels, pad)
                writer.write(rows_batch(ids, labels, np.asarray(row_off), np.asarray(seq_lens),
                                        np.asarray(seq_off), np.asarray(sids)))
                tokens += sum(seq_lens)
                trained += int(np.count_nonzero(labels != IGNORE_INDEX))
        shards.append({"file": name, "rows": writer.rows, "tokens": tokens, "trained_tokens": trained,
                       "sha256": writer.sha256})
    return shards


def _write_samples(out: Path, store: SampleStore) -> None:
    """Per-sample side table: provenance, length and trained tokens of every kept sample."""
    table = pa.table({
        "sample_id": pa.array(np.frombuffer(store.sample_ids, np.int64), pa.int64()),
        "source": pa.array(store.sources, pa.string()),
        "num_tokens": pa.array(np.frombuffer(store.lengths, np.int64).astype(np.int32), pa.int32()),
        "num_trained": pa.array(np.frombuffer(store.num_trained, np.int64).astype(np.int32), pa.int32()),
        "truncated": pa.array(np.frombuffer(store.truncated, np.int8).astype(bool), pa.bool_()),
    })
    write_table(out / SAMPLES_FILE, table)


def _copy_tokenizer(source: Path, out: Path) -> None:
    """Copy the tokenizer's files to `out/tokenizer/` (via a temporary folder, renamed)."""
    if source.is_file():  # a path to tokenizer.json itself
        source = source.parent
    tmp = out / (TOKENIZER_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            with names_path(tmp / name):  # shutil names the source when the destination's disk is full
                shutil.copyfile(source / name, tmp / name)
    shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
    os.replace(tmp, out / TOKENIZER_DIR)


def _write_rejects(out: Path, rejects: list[dict[str, Any]]) -> None:
    tmp = out / (REJECTS_FILE + ".tmp")
    with names_path(out / REJECTS_FILE), open(tmp, "w", encoding="utf-8") as f:
        for r in rejects:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out / REJECTS_FILE)


# -- output folder and identity ----------------------------------------------------------------

def _prepare_out(out: Path, build_id: str, overwrite: bool) -> Path:
    """Make `out` ready: refuse a folder holding another build unless `overwrite`; then remove the
    manifest first (so the folder never claims a finished build mid-way) and old shards. The folder
    exists and is locked (`_OutLock`)."""
    if out.exists():
        links = sorted(p.name for p in out.iterdir() if p.is_symlink())
        if links:
            raise ConfigError(f"--out {out} holds symbolic links ({', '.join(links)}); sftprep never writes "
                              "through a link: remove them or choose another folder")
        previous = _previous_build_id(out)
        foreign = previous is None and any(p for p in out.iterdir() if not p.name.startswith("."))
        # a build that failed before writing a shard (e.g. everything rejected) left nothing to protect
        failed = not (out / MANIFEST).exists() and not any(out.glob("shard-*.arrow"))
        if not overwrite and (foreign or (previous is not None and previous != build_id and not failed)):
            what = "files that are not a sftprep build" if foreign else "a different build"
            raise ConfigError(f"--out {out} already holds {what}; pass --overwrite to replace it, "
                              "or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    with names_path(out / ".build_id"):
        (out / ".build_id").write_text(build_id + "\n")
    for old in [*out.glob("shard-*.arrow"), *out.glob("*.tmp"), out / SAMPLES_FILE, out / OLD_SAMPLES_FILE,
                out / REJECTS_FILE]:
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
    fsync_dir(out)
    return out


def _previous_build_id(out: Path) -> str | None:
    marker = out / ".build_id"
    if marker.exists():
        return marker.read_text().strip()
    if (out / MANIFEST).exists():
        try:
            return read_manifest(out).get("build_id")
        except (ValueError, FileNotFoundError):
            return "unreadable"
    return None


def _hash_input(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def _build_id(config: BuildConfig, inputs: list[dict], identity: dict) -> str:
    """What makes two builds the same: settings that change the shards, inputs, tokenizer, version."""
    cfg = config.to_dict()
    for volatile in ("out", "workers", "overwrite"):
        cfg.pop(volatile)
    cfg["read"].pop("inputs")  # identified by content below, wherever the files lie
    cfg["tokenize"].pop("tokenizer")
    key = {"config": cfg, "inputs": [i["sha256"] for i in inputs], "tokenizer": identity["vocab_hash"],
           "version": __version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
