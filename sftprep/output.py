"""The output folder of a build: its lock, its identity, and the side files beside the shards.

    OUT/.lock              held while a build writes (one build per folder at a time), shared by runs reading it
    OUT/.build_id          what the folder holds (settings that change the shards, inputs, tokenizer)
    OUT/samples.feather    per kept sample: sample_id, source, num_tokens, num_trained, truncated
    OUT/rejects.jsonl      every dropped record with its source, reason and message
    OUT/tokenizer/         a copy of the build's tokenizer: the folder is usable anywhere
    (shards and manifest.json: `shards.py`, `manifest.py`)

`prepare_out` refuses a folder that holds something else, then clears the previous build, manifest
first, so that the folder never claims a finished build mid-way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from . import __version__
from .config import BuildConfig, shard_settings
from .errors import ConfigError, InputError
from .manifest import MANIFEST, fsync_dir, read_manifest
from .shards import names_path, numpy_array, sha256_file, write_table
from .store import Samples

SAMPLES_FILE = "samples.feather"  # Arrow IPC file too, but no `*.arrow` glob meets it
OLD_SAMPLES_FILE = "samples.arrow"  # older builds: still read, as their manifest names it
REJECTS_FILE = "rejects.jsonl"
TOKENIZER_DIR = "tokenizer"  # a copy of the build's tokenizer: the folder is usable anywhere
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


class OutLock:
    """One build per output folder at a time, and none while a training run reads it: an advisory lock
    on OUT/.lock, exclusive for a build (taken once the settings are checked, so a refused build writes
    nothing, and held until the build ends), shared for each reader (`reading`, held by `sfttrain run`
    for the whole run): a rebuild never changes the data under a run."""

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
            readers = self._readers(self.fd)
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            self.release()
            if readers:
                raise ConfigError(f"--out {out} is being read by sfttrain (pid {', '.join(readers)}): a rebuild would "
                                  "change the data under the run; wait for the run to end (or stop it), or build "
                                  "into another folder") from None
            raise ConfigError(f"--out {out} is being written by another sftprep build (pid {holder}); wait for it "
                              "to finish, or choose another folder") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold a shared lock on the build in `out` while the block runs: a build into it is refused
        meanwhile, and a build running now refuses the reader. A folder where no lock file can be
        made (read-only) is read without one: no build can write there either."""
        import fcntl

        try:
            fd = os.open(self.out / ".lock", os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError:
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise ConfigError(f"{self.out} is being written by sftprep build (pid {holder}); wait for the "
                                  "build to finish, then start again") from None
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _readers(fd: int) -> list[str]:
        """The pids holding a shared lock on the file open as `fd` (Linux' /proc/locks; [] elsewhere)."""
        st = os.fstat(fd)
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        try:
            entries = [line.split() for line in Path("/proc/locks").read_text().splitlines() if "->" not in line]
        except OSError:
            return []
        return sorted({e[4] for e in entries if len(e) > 5 and e[1] == "FLOCK" and e[3] == "READ" and e[5] == key})


def prepare_out(out: Path, build_id: str, overwrite: bool) -> Path:
    """Make `out` ready: refuse a folder holding another build unless `overwrite`; then remove the
    manifest first (so the folder never claims a finished build mid-way) and old shards. The folder
    exists and is locked (`OutLock`)."""
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
        except (InputError, FileNotFoundError):
            return "unreadable"
    return None


def hash_input(path: Path) -> str:
    """sha256 of an input file, or of a folder's files (names and contents)."""
    if path.is_file():
        return sha256_file(path)
    return _hash_files(path, [str(f.relative_to(path)) for f in sorted(p for p in path.rglob("*") if p.is_file())])


def hash_tokenizer(folder: Path) -> str:
    """sha256 of the tokenizer files a build copies (names and contents): cheap, known before any
    work, and stricter than the vocabulary hash (a changed normalizer or template changes it too)."""
    return _hash_files(folder, [name for name in TOKENIZER_FILES if (folder / name).is_file()])


def _hash_files(folder: Path, names: list[str]) -> str:
    """sha256 over each named file of `folder`, in order: its name, then its contents' sha256."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        h.update(sha256_file(folder / name).encode())
    return h.hexdigest()


def build_id(config: BuildConfig, inputs: list[dict], tokenizer_hash: str) -> str:
    """What makes two builds the same: settings that change the shards, inputs, tokenizer files, version."""
    cfg = shard_settings(config.to_dict())
    cfg["read"].pop("inputs")  # identified by content below, wherever the files lie
    cfg["tokenize"].pop("tokenizer")
    key = {"config": cfg, "inputs": [i["sha256"] for i in inputs], "tokenizer": tokenizer_hash,
           "version": __version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def write_samples(out: Path, store: Samples) -> None:
    """Per-sample side table: provenance, length and trained tokens of every kept sample."""
    table = pa.table({
        "sample_id": numpy_array(np.frombuffer(store.sample_ids, np.int64), pa.int64()),
        "source": store.sources,
        "num_tokens": numpy_array(np.frombuffer(store.lengths, np.int64), pa.int32()),
        "num_trained": numpy_array(np.frombuffer(store.num_trained, np.int64), pa.int32()),
        "truncated": numpy_array(np.frombuffer(store.truncated, np.int8), pa.bool_()),
    })
    write_table(out / SAMPLES_FILE, table)


def copy_tokenizer(source: Path, out: Path) -> None:
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


# characters that JSON leaves raw but str.splitlines() (and so many JSON Lines readers) splits lines at
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def write_rejects(out: Path, rejects: list[dict[str, Any]]) -> None:
    """rejects.jsonl: one JSON object per line, under any line splitter (record text can hold U+0085...)."""
    tmp = out / (REJECTS_FILE + ".tmp")
    with names_path(out / REJECTS_FILE), open(tmp, "w", encoding="utf-8") as f:
        for r in rejects:
            f.write(json.dumps(r, ensure_ascii=False).translate(_LINE_BREAKS) + "\n")
    os.replace(tmp, out / REJECTS_FILE)


def remove_temps(out: Path) -> None:
    """Remove the build's temporary files and folders (`*.tmp`) from `out`, after an error."""
    for p in out.glob("*.tmp"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
