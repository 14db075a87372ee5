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
import re
import shutil
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import __version__
from ..config import BuildConfig, shard_settings
from ..errors import BuildError, ConfigError, InputError
from ..pack.packing import fill_ratio, mode, pack, piece_arrays
from .files import LEDGER, claim, fsync_dir, ledger, names_path, plain_name, rewrite_ledger
from .manifest import MANIFEST, read_manifest
from ..mix.recipe import Plan, plan, source_index
from ..tokenize.arrow import as_numpy, numpy_array, string_array
from .rejects import REJECTS_FILE, Rejects
from .shards import SPLITS, ShardSetWriter, sha256_file, write_batches
from .store import SAMPLE_SCHEMA, Samples, Selected

SAMPLES_FILE = "samples.feather"  # Arrow IPC file too, but no `*.arrow` glob meets it
OLD_SAMPLES_FILE = "samples.arrow"  # older builds: still read, as their manifest names it
TOKENIZER_DIR = "tokenizer"  # a copy of the build's tokenizer: the folder is usable anywhere
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


class OutLock:
    """One build per output folder at a time, and none while a training run reads it: an advisory lock
    on OUT/.lock, exclusive for a build (taken before any work, so a second build is refused at once, not
    after hashing its inputs, and held until the build ends), shared for each reader (`reading`, held by
    `sfttrain run` for the whole run): a rebuild never changes the data under a run.

    A build refused before it wrote anything (no `.build_id` in the folder) leaves nothing behind: the
    `.lock` it created, and the folder if it made it, are removed on `release`."""

    def __init__(self, out: Path) -> None:
        self.out, self.fd = out, None
        self.made: list[Path] = []  # what acquire created: removed on release if the build wrote nothing

    def acquire(self) -> None:
        import fcntl

        out = self.out
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file, not a folder")
        missing = [p for p in (out, *out.parents) if not p.exists()]
        out.mkdir(parents=True, exist_ok=True)
        lock = out / ".lock"
        try:
            self.fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            self.made = [lock, *missing]
        except FileExistsError:
            self.fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
            self.made = missing
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            readers = self._readers()
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            self.made = []  # the holder's
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
        if self.fd is None:
            return
        if self.made and not (self.out / ".build_id").exists():
            for p in self.made:  # the lock file, then the folders it made, innermost first
                try:
                    p.unlink() if p.name == ".lock" else p.rmdir()
                except OSError:
                    break
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

    def _readers(self) -> list[str]:
        """After a refused exclusive lock: the pids of the readers holding it, [] when a build holds it (a
        shared lock is granted only beside readers); pids from Linux' /proc/locks, "?" elsewhere."""
        import fcntl

        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released with the descriptor
        except BlockingIOError:
            return []
        st, me = os.fstat(self.fd), str(os.getpid())
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        try:
            entries = [line.split() for line in Path("/proc/locks").read_text().splitlines() if "->" not in line]
        except OSError:
            entries = []
        pids = {e[4] for e in entries if len(e) > 5 and e[1] == "FLOCK" and e[3] == "READ" and e[5] == key}
        return sorted(pids - {me}) or ["?"]


# the names a build writes in its folder (`*.tmp`: while writing); a file or folder of such a name that
# sftprep cannot prove it wrote is never replaced, removed or written into
_BUILD_NAME = re.compile(r"(manifest\.json|shard-[^/]*\.arrow|samples\.(feather|arrow)|rejects\.jsonl|tokenizer)"
                         r"(\.tmp)?|tokens\.spill\.[^/]*\.tmp")
_MARKERS = (".build_id", ".lock", LEDGER)  # kept: the folder's identity, lock and ledger


def prepare_out(out: Path, build_id: str, overwrite: bool) -> Path:
    """Make `out` ready: refuse a folder holding another build unless `overwrite`, and any file of a name
    the build writes that sftprep cannot prove it wrote (`owned`); then remove the previous build's files,
    manifest first (so the folder never claims a finished build mid-way). Nothing else in the folder is
    touched. The folder exists and is locked (`OutLock`)."""
    if out.exists():
        links = sorted(p.name for p in out.iterdir() if p.is_symlink())
        if links:
            raise ConfigError(f"--out {out} holds symbolic links ({', '.join(links)}); sftprep never writes "
                              "through a link: remove them or choose another folder")
        ours = owned(out)
        _refuse_foreign_names(out, ours)
        previous = _previous_build_id(out)
        foreign = previous is None and any(p.name not in ours for p in out.iterdir() if not p.name.startswith("."))
        # a build that failed before writing a shard (e.g. everything rejected) left nothing to protect
        failed = not (out / MANIFEST).exists() and not any(out.glob("shard-*.arrow"))
        if not overwrite and (foreign or (previous is not None and previous != build_id and not failed)):
            if foreign:
                raise ConfigError(f"--out {out} already holds files that are not a sftprep build; pass --overwrite "
                                  "to write the build beside them (sftprep removes only files it wrote), or "
                                  "choose another folder")
            raise ConfigError(f"--out {out} already holds a different build; pass --overwrite to replace it, "
                              "or choose another folder")
    else:
        ours = set()
    out.mkdir(parents=True, exist_ok=True)
    if MANIFEST in ours:
        (out / MANIFEST).unlink(missing_ok=True)
    claim(out / ".build_id")
    with names_path(out / ".build_id"):
        (out / ".build_id").write_text(build_id + "\n")
    for name in sorted(ours - set(_MARKERS)):
        remove_owned(out / name)
    rewrite_ledger(out, {".build_id"})
    fsync_dir(out)
    return out


def owned(out: Path) -> set[str]:
    """The names in `out` that sftprep provably wrote: those its ledger claims, and those the folder's
    manifest lists (builds made before the ledger), as plain names inside the folder."""
    names = ledger(out)
    try:
        m = read_manifest(out) if (out / MANIFEST).is_file() else None
    except (InputError, FileNotFoundError):
        m = None
    if isinstance(m, dict):
        listed = [MANIFEST, m.get("samples_file"), m.get("rejects_file"), (m.get("tokenizer") or {}).get("path")]
        listed += [s.get("file") for key in ("shards", "validation_shards") for s in m.get(key) or []
                   if isinstance(s, dict)]
        names |= {n for n in listed if plain_name(n)}
    return names


def _refuse_foreign_names(out: Path, ours: set[str]) -> None:
    """Refuse a folder holding files of the names a build writes that sftprep did not write, and a
    tokenizer folder of ours holding anything but the tokenizer files it copied."""
    clash = sorted(p.name for p in out.iterdir() if _BUILD_NAME.fullmatch(p.name) and p.name not in ours)
    for name in (TOKENIZER_DIR, TOKENIZER_DIR + ".tmp"):
        if name in ours and (out / name).is_dir():
            clash += sorted(f"{name}/{p.name}" for p in (out / name).iterdir()
                            if p.name not in TOKENIZER_FILES or not p.is_file() or p.is_symlink())
    if clash:
        listed = ", ".join(clash[:5]) + (f" and {len(clash) - 5} more" if len(clash) > 5 else "")
        raise ConfigError(f"--out {out} holds {listed}, which no sftprep build wrote there (no manifest or "
                          "ledger of this folder lists them), under names a build writes; sftprep never "
                          "replaces what it did not write: move them, or choose another folder")


def remove_owned(path: Path) -> None:
    """Remove a file sftprep wrote, or a tokenizer folder it made (its tokenizer files, then the folder
    if that leaves it empty: never a file of someone else's)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    for name in TOKENIZER_FILES:
        f = path / name
        if f.is_file() and not f.is_symlink():
            f.unlink()
    try:
        path.rmdir()
    except OSError:
        raise ConfigError(f"{path} holds files sftprep did not write ({', '.join(sorted(p.name for p in path.iterdir()))}); "
                          "move them, then build again") from None


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
    return build_key(config.to_dict(), [i["sha256"] for i in inputs], tokenizer_hash, __version__)


def build_key(config: dict[str, Any], input_hashes: list[str], tokenizer_hash: str, version: str) -> str:
    """`build_id` from a config as saved in a manifest (so a manifest's own ids can be checked)."""
    cfg = json.loads(json.dumps(shard_settings(config)))
    cfg["read"].pop("inputs")  # identified by content below, wherever the files lie
    cfg["tokenize"].pop("tokenizer")
    key = {"config": cfg, "inputs": input_hashes, "tokenizer": tokenizer_hash, "version": version}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def build_manifest(config: BuildConfig, *, build_id: str, inputs: list[dict[str, str]], template: Any,
                   warnings: list[str], tokenizer: dict[str, Any], max_token_id: int, shards: list[dict[str, Any]],
                   totals: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The manifest of a build, a merge or a part (`extra`: `part`, `merged_from`): assembled here only.
    `max_token_id` (the largest id stored, or the pad id) lets sfttrain check ids without reading shards."""
    return {
        "tool": {"name": "sftprep", "version": __version__},
        "build_id": build_id,
        "config": config.to_dict(),
        "inputs": inputs,
        "template": template,
        "warnings": warnings,
        "tokenizer": tokenizer,
        "max_length": config.tokenize.max_length,
        "max_token_id": max_token_id,
        "packing": config.pack.mode,
        "shards": [{k: s[k] for k in ("file", "rows", "tokens", "sha256")} for s in shards],
        "samples_file": SAMPLES_FILE,
        "rejects_file": REJECTS_FILE,
        "totals": totals,
        **extra,
    }


SAMPLES_SCHEMA = pa.schema([*SAMPLE_SCHEMA, ("source_name", pa.dictionary(pa.int32(), pa.string())),
                            ("split", pa.dictionary(pa.int32(), pa.string())), ("repeat", pa.int32())])
"""samples.feather: `SAMPLE_SCHEMA`, then each sample's recipe source, split and copy number."""


def write_samples(out: Path, splits: list[tuple[str, Samples]], names: list[str], first_ids: np.ndarray) -> None:
    """Per-sample side table: provenance (file:line, recipe source, copy), split, length and trained tokens
    of every sample in the shards, train then validation, written batch by batch as the samples hand it over
    (`Samples.table_batches`)."""
    def batches():
        for split, store in splits:
            copy = getattr(store, "copy", None)
            origin = getattr(store, "origin", None)
            at = 0
            for batch in store.table_batches():
                n = batch.num_rows
                sid = as_numpy(batch.column(0)) if origin is None else origin[at:at + n]
                yield pa.record_batch([*batch.columns,
                                       pa.DictionaryArray.from_arrays(numpy_array(source_index(first_ids, sid),
                                                                                  pa.int32()), names),
                                       pa.DictionaryArray.from_arrays(
                                           numpy_array(np.full(n, list(SPLITS).index(split), np.int32), pa.int32()),
                                           split_names),
                                       numpy_array(np.zeros(n, np.int32) if copy is None else copy[at:at + n],
                                                   pa.int32())], schema=SAMPLES_SCHEMA)
                at += n
    names, split_names = string_array(names), string_array(list(SPLITS))  # one dictionary a column, file-wide
    write_batches(out / SAMPLES_FILE, SAMPLES_SCHEMA, batches())
    base = splits[0][1]
    getattr(base, "base", base).table_file = out / SAMPLES_FILE  # read from there once the spill is gone


def copy_tokenizer(source: Path, out: Path) -> None:
    """Copy the tokenizer's files to `out/tokenizer/` (via a temporary folder, renamed)."""
    if source.is_file():  # a path to tokenizer.json itself
        source = source.parent
    tmp, final = out / (TOKENIZER_DIR + ".tmp"), out / TOKENIZER_DIR
    claim(final, tmp)
    remove_owned(tmp)
    tmp.mkdir()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            with names_path(tmp / name):  # shutil names the source when the destination's disk is full
                shutil.copyfile(source / name, tmp / name)
    remove_owned(final)
    os.replace(tmp, final)


def remove_temps(out: Path) -> None:
    """Remove the build's temporary files and folders (`*.tmp` that it claimed) from `out`, after an error."""
    for name in ledger(out):
        if name.endswith(".tmp"):
            try:
                remove_owned(out / name)
            except (ConfigError, OSError):  # cleaning up after an error: the first error is the one to report
                pass


# -- the build's files, from its kept samples: used by a build and by a merge -------------------------

def empty_inputs(inputs: list[Path] | list[str], sources: Iterable[pa.Array], rejects: Rejects,
                 recipe: list[dict[str, Any]] | None = None) -> list[str]:
    """A warning per input none of whose records was kept (e.g. a glob that swept in a file of
    another format), and per named source none of whose records was: the build succeeds on the rest,
    so the summary must say so. `sources`: the kept samples' sources, array by array (`Samples.sources`:
    read from disk, so it is read again per input)."""
    out, kept = [], set()
    prefixes = {str(path): (f"{path}:", f"{path}[") for path in inputs}  # file:line, file:row N; file[i] (.json)
    for chunk in sources:  # one pass: the sources are read from disk
        kept |= {path for path, ps in prefixes.items() if path not in kept and
                 any(pc.any(pc.starts_with(chunk, pattern=p)).as_py() for p in ps)}
    empty = {str(path): [] for path in inputs if str(path) not in kept}
    for r in rejects if empty else ():  # one pass: the rejects are read from disk
        for path, dropped in empty.items():
            if r["source"].startswith(prefixes[path]) or r["source"] == path:
                dropped.append(r)
    for path, dropped in empty.items():
        if dropped:
            out.append(f"input {path}: all {len(dropped):,} records rejected ({_reasons(dropped)}); "
                       f"first: {dropped[0]['message']}")
    for s in recipe if recipe and len(recipe) > 1 else []:
        lo, hi = s["first_sample_id"], s["first_sample_id"] + s["records"]
        if s["records"] and rejects.count(lo, hi) == s["records"]:
            dropped = [r for r in rejects if lo <= r["sample_id"] < hi]
            out.append(f"source {s['name']}: all {len(dropped):,} records rejected ({_reasons(dropped)}); "
                       f"first: {dropped[0]['source']}: {dropped[0]['message']}")
    return out


def _reasons(rejects: Counter | list[dict[str, Any]]) -> str:
    """`reason: count, ...` of some rejects (or their counts by reason), the most frequent first."""
    counts = rejects if isinstance(rejects, Counter) else Counter(r["reason"] for r in rejects)
    return ", ".join(f"{k}: {v}" for k, v in counts.most_common())


def check_rejects(config: BuildConfig, rejects: Rejects, read: int, out: Path) -> None:
    """Refuse a build that read no record or rejected more than `max_reject_ratio` of them (rejects.jsonl
    is written for the user to read; no manifest)."""
    if read == 0:
        raise BuildError("the inputs hold no records")
    faults = rejects.by_reason(faults_only=True)  # contaminated records are no fault of theirs
    ratio = faults.total() / read
    if faults and ratio > config.read.max_reject_ratio:
        rejects.write(out)
        first = rejects.first_fault
        raise BuildError(f"{faults.total()} of {read} records rejected ({ratio:.0%} > max_reject_ratio "
                         f"{config.read.max_reject_ratio:.0%}; {_reasons(faults)}); first: {first['source']}: "
                         f"{first['message']}. All are listed in {out / REJECTS_FILE}")


SOURCE_KEYS = ("name", "inputs", "first_sample_id", "records")
"""A manifest's `sources` entry before its accounting: what a merge takes from its parts."""


def source_entries(config: BuildConfig, inputs: list[list[Path]], counts: list[int]) -> list[dict[str, Any]]:
    """The manifest's `sources` before their accounting: name, inputs, and the sample ids their records
    hold (`first_sample_id` and `records` on: sample ids number the records of every source in order)."""
    firsts = np.cumsum([0, *counts])[:-1].tolist()
    return [{"name": s.name, "inputs": [str(p) for p in paths], "first_sample_id": first, "records": n}
            for s, paths, first, n in zip(config.recipe(), inputs, firsts, counts)]


def write_build(config: BuildConfig, out: Path, samples: Samples, rejects: Rejects, read: int,
                sources: list[dict[str, Any]], pad: int,
                tokenizer: Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Everything of a build but its manifest, from its kept `samples` (in input order), `rejects` and
    `sources` (`source_entries`; `read`: records read, a part's share in a part): the recipe applied
    (`mix.recipe.plan`: duplicates, validation split, weights; a part keeps every sample, and its merge applies
    the recipe), shards, samples.feather, rejects.jsonl, tokenizer/ (copied from `tokenizer`). Returns the shards' manifest entries, the
    manifest's totals, and its other entries (`sources`, with their accounting; `validation_shards`)."""
    first_ids = np.asarray([s["first_sample_id"] for s in sources], np.int64)
    recipe = config.recipe()
    if config.part is None and _has_choices(config):
        source_of = source_index(first_ids, np.asarray(samples.sample_ids))
        key, exact = samples.hashes()
        chosen = plan(recipe, config.mix, config.pack.seed, source_of, key, exact, samples.lengths, config.dedups)
        del source_of, key, exact
    else:
        chosen = Plan.identity()
    rejects.add(_duplicate_rejects(samples, chosen, first_ids, recipe))
    tally = _Tally(samples, chosen, first_ids)  # before the samples table is rewritten as samples.feather
    train = samples if chosen.is_identity(len(samples)) else Selected(samples, chosen.train, chosen.repeat, read)
    splits = [("train", train)]
    if len(chosen.validation):
        splits.append(("validation", Selected(samples, chosen.validation, np.zeros(len(chosen.validation)), read)))
    written = {split: _write_shards(config, out, store, pad, split) for split, store in splits}
    write_samples(out, splits, [s.name for s in recipe], first_ids)
    rejects.write(out)
    copy_tokenizer(tokenizer, out)
    totals = _totals(config, written["train"], len(train), tally.truncated_train, rejects, read)
    extra: dict[str, Any] = {"sources": _accounting(sources, rejects, tally)}
    if "validation" in written:
        extra["validation_shards"] = [_entry(s) for s in written["validation"]]
        totals["validation"] = {"samples": len(chosen.validation), **_sums(written["validation"])}
    return written["train"], totals, extra


def _has_choices(config: BuildConfig) -> bool:
    """Whether the recipe may change what a build of every kept sample, once, would write."""
    m = config.mix
    return config.dedups or m.eval_fraction is not None or m.eval_samples is not None or any(
        s.mixing or s.eval_fraction or s.eval_samples for s in config.sources)


def _duplicate_rejects(samples: Samples, chosen: Plan, first_ids: np.ndarray, recipe: list) -> list[dict[str, Any]]:
    """A reject per dropped duplicate, naming the copy kept (and both sources, in a recipe)."""
    if not chosen.duplicate_of:
        return []
    wanted = np.asarray(sorted({i for pair in chosen.duplicate_of.items() for i in pair}), np.int64)
    ids = samples.sample_ids[wanted]
    sids = dict(zip(wanted.tolist(), ids.tolist()))
    source = dict(zip(wanted.tolist(), source_index(first_ids, ids).tolist()))
    at, first = {}, 0
    for chunk in samples.sources:  # the file:line of each sample named, in one pass
        a, b = np.searchsorted(wanted, [first, first + len(chunk)])
        at.update(zip(wanted[a:b].tolist(), chunk.take(numpy_array(wanted[a:b] - first, pa.int64())).to_pylist()))
        first += len(chunk)
    named = len(recipe) > 1
    out = []
    for dup, kept in sorted(chosen.duplicate_of.items()):
        also = f" of source {recipe[source[kept]].name}" if named else ""
        out.append({"sample_id": sids[dup], "source": at[dup], "reason": "duplicate",
                    "message": f"the same tokens and labels as sample {sids[kept]} ({at[kept]}{also}), which is "
                               "kept (--dedup none keeps every copy)",
                    **({"source_name": recipe[source[dup]].name, "kept_source_name": recipe[source[kept]].name}
                       if named else {})})
    return out


def _entry(shard: dict[str, Any]) -> dict[str, Any]:
    return {k: shard[k] for k in ("file", "rows", "tokens", "sha256")}


def _sums(shards: list[dict[str, Any]]) -> dict[str, int]:
    return {k: sum(s[k] for s in shards) for k in ("tokens", "trained_tokens", "rows")}


def _totals(config: BuildConfig, shards: list[dict[str, Any]], kept: int, truncated: int,
            rejects: Rejects, read: int) -> dict[str, Any]:
    sums = _sums(shards)
    return {
        "records_read": read,
        "samples_kept": kept,
        "samples_dropped": len(rejects),
        "dropped_by_reason": dict(sorted(rejects.by_reason().items())),
        "samples_truncated": int(truncated),
        **sums,
        "fill_ratio": round(fill_ratio(sums["tokens"], sums["rows"], config.tokenize.max_length), 6)
        if mode(config.pack.mode).padded else None,
    }


class _Tally:
    """Per recipe source, what became of its kept samples, from one pass over the samples table (no array over
    every sample but the plan's own): kept (unique), held out for validation, selected for training (with
    repeats), their tokens and trained tokens, truncated (of the unique ones); and the truncated samples of
    the train split (with repeats)."""

    def __init__(self, samples: Samples, chosen: Plan, first_ids: np.ndarray) -> None:
        k, n = len(first_ids), len(samples)
        copies = None  # per sample, its copies in the train split (None: one each)
        if not chosen.is_identity(n):
            copies = np.zeros(n, np.int32)
            runs = np.flatnonzero(np.diff(chosen.train) < 0) + 1  # ascending runs: no index twice in one
            for lo, hi in zip([0, *runs.tolist()], [*runs.tolist(), len(chosen.train)]):
                copies[chosen.train[lo:hi]] += 1
        alive = np.ones(n, bool) if chosen.duplicate_of else None
        if alive is not None:
            alive[list(chosen.duplicate_of)] = False
        held = np.zeros(n, bool) if len(chosen.validation) else None
        if held is not None:
            held[chosen.validation] = True
        sums = np.zeros((7, k), np.int64)
        at = 0
        for batch in samples.table_batches():
            m = batch.num_rows
            src = source_index(first_ids, as_numpy(batch.column(0)))
            lengths, trained = as_numpy(batch.column(2)), as_numpy(batch.column(3))
            cut = as_numpy(batch.column(4)).astype(bool)
            w = np.ones(m, np.int64) if copies is None else copies[at:at + m].astype(np.int64)
            live = np.ones(m, bool) if alive is None else alive[at:at + m]
            out = np.zeros(m, bool) if held is None else held[at:at + m]
            for row, values in enumerate((live, out, w, w * lengths, w * trained, live & cut, w * cut)):
                sums[row] += np.bincount(src, values, minlength=k).astype(np.int64)
            at += m
        (self.kept, self.validation, self.selected, self.tokens, self.trained_tokens, self.truncated,
         train_cut) = sums.tolist()
        self.truncated_train = sum(train_cut)


def _accounting(sources: list[dict[str, Any]], rejects: Rejects, tally: _Tally) -> list[dict[str, Any]]:
    """Each source's entry with what became of its records: read, rejected by reason, and its `tally`
    (kept, validation, selected, tokens, trained tokens, truncated), with its share of the build's trained
    tokens."""
    by_reason = rejects.by_source(np.asarray([s["first_sample_id"] for s in sources], np.int64))
    all_trained = sum(tally.trained_tokens) or 1
    return [{**s, "rejected": dict(sorted(by_reason[i].items())), "kept": tally.kept[i],
             "validation": tally.validation[i], "selected": tally.selected[i], "tokens": tally.tokens[i],
             "trained_tokens": tally.trained_tokens[i], "truncated": tally.truncated[i],
             "trained_share": round(tally.trained_tokens[i] / all_trained, 6)} for i, s in enumerate(sources)]


def _write_shards(config: BuildConfig, out: Path, store: Samples, pad: int, split: str) -> list[dict[str, Any]]:
    """Pack the stored samples into rows and write them as shards; one manifest entry per shard."""
    max_length = config.tokenize.max_length
    rows = pack(store.lengths, max_length, config.pack.mode, config.pack.seed)
    width = max_length if mode(config.pack.mode).padded else None
    writer = ShardSetWriter(out, config.pack.shard_size, split=split)
    return writer.write(len(rows), lambda lo, hi: store.rows_batch(piece_arrays(rows, lo, hi), width, pad))
