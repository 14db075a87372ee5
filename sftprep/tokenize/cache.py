"""The sample cache: each input file's tokenized, labelled samples, kept between builds.

    CACHE/entries/KEY.arrow   the samples of one input file under one set of token-deciding settings
    CACHE/entries/KEY.json    written last: size and sha256 of KEY.arrow (an entry without it is not sealed)

KEY hashes what decides a file's tokens and labels: the file's content, the source's format, fields, read
limits, template (all of it), train_on, the tokenizer's files, and the label rules' version (`LABELS`). What
does not decide them is not in it: max_length, truncation side, packing, shard size, seed, mixing, validation
split, dedup, decontamination (`screen`, on samples), other input files. So a build that changes only
those reads each entry instead of the file, and writes the same shards.

An entry holds one row per record of its file, in order: a sample (its ids, and which are trained: labels
are the ids there and -100 elsewhere), a reject (reason and message), or `again` (a record the build cut
to max_length, or dropped for its length, or whose template ran into a time limit: what it gives depends on
the settings, so it is tokenized again by each build that reads the entry). Ids are uint16 for vocabularies
under 65,536, else int32; the trained flags are bits: about 2.1 bytes a token for a 32k vocabulary.

Entries are written under a temporary name and renamed, the sidecar last; reading checks the size and the
sha256 first, so a damaged or half-written entry is never used (it is removed, with a warning, and the file
is tokenized again). Two builds filling one entry write the same bytes; the last rename wins.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from .. import __version__
from ..config import Source
from ..errors import ConfigError
from .arrow import as_numpy, numpy_array, string_array
from .encode import Encoded
from .labels import IGNORE_INDEX

LABELS = 1
"""The label rules' version: raise it when a change to rendering or labelling changes what a build trains
(entries of another version are never read)."""
FORMAT = 2
DEFAULT_MAX_SIZE = 20 << 30
"""The cache's size bound when none is given: 20 GiB (about 9 billion tokens of a 32k vocabulary)."""

SAMPLE, REJECT, AGAIN = 0, 1, 2
AGAIN_REASONS = ("too_long", "no_trained_tokens_after_truncation", "template_limit")
"""Rejects whose cause is a setting the key leaves out (max_length, truncation) or the clock: tokenized again."""


def default_dir() -> Path:
    """`$SFTPREP_CACHE`, else the platform's user cache folder (`$XDG_CACHE_HOME` or ~/.cache on Linux,
    ~/Library/Caches on macOS, %LOCALAPPDATA% on Windows) + `sftprep`."""
    if os.environ.get("SFTPREP_CACHE"):
        return Path(os.environ["SFTPREP_CACHE"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "sftprep"
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "sftprep" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sftprep"


def parse_size(value: Any) -> int:
    """`20GB`, `512M`, `1.5 TiB` or a number of bytes -> bytes (powers of 1024)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    text = str(value).strip().upper().replace("IB", "").rstrip("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    scale = units.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if text[-1:] in units else text) * scale)
    except ValueError:
        raise ConfigError(f"cache_max_size={value!r} is not a size such as 20GB, 512MB or a number of bytes") \
            from None


def entry_key(file_sha256: str, settings: dict[str, Any], tokenizer_sha256: str) -> str:
    """The key of one input file's entry: its content and the settings that decide its tokens and labels."""
    key = {"file": file_sha256, "settings": settings, "tokenizer": tokenizer_sha256, "labels": LABELS,
           "format": FORMAT, "version": __version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def settings_of(source: Source) -> dict[str, Any] | None:
    """What of a source's settings decides its files' tokens and labels (with the content of the chat template
    it names), or None when its samples cannot come from the cache: `--truncation-unit
    turns` renders a cut conversation again, and a `module:function` template is code that may change."""
    if source.tokenize.truncation_unit == "turns" or (source.template.name and ":" in source.template.name):
        return None
    template = dataclasses.asdict(source.template)
    if source.template.chat_template:
        template["chat_template"] = _sha256(Path(source.template.chat_template))
    read = {k: getattr(source.read, k) for k in ("format", "fields", "max_record_bytes", "max_gzip_ratio",
                                                 "max_blank_lines")}
    return {"read": read, "template": template, "train_on": source.tokenize.train_on}


def _schema(ids: pa.DataType) -> pa.Schema:
    return pa.schema([("record", pa.int64()), ("kind", pa.int8()), ("where", pa.string()),
                      ("reason", pa.string()), ("message", pa.string()), ("ids", pa.list_(ids)),
                      ("trained", pa.list_(pa.bool_()))])


@dataclass
class Cache:
    """The cache folder of a build, and what the build took from it and put in it."""

    folder: Path
    max_size: int = DEFAULT_MAX_SIZE
    warnings: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)  # input files read from their entry
    reused_tokens: int = 0
    tokenized: list[str] = field(default_factory=list)  # input files tokenized (and written, when complete)
    again: int = 0  # records of reused entries tokenized again
    unwritable: bool = False  # the folder refused a write: no more entries are tried

    @property
    def entries(self) -> Path:
        return self.folder / "entries"

    def open(self, key: str) -> pa.Table | None:
        """The sealed entry `key`, checked (size, sha256), as a memory-mapped table; None when there is none.
        A damaged entry is removed, with a warning."""
        arrow, side = self.entries / f"{key}.arrow", self.entries / f"{key}.json"
        if not side.is_file():
            return None
        try:
            seal = json.loads(side.read_text(encoding="utf-8"))
            size = arrow.stat().st_size
            problem = None if size == seal["size"] else f"{size:,} bytes, {seal['size']:,} when sealed"
            if problem is None and _sha256(arrow) != seal["sha256"]:
                problem = "its sha256 differs from the one recorded when it was sealed"
            if problem is None:
                table = pa.ipc.open_file(pa.memory_map(str(arrow))).read_all()
                os.utime(side)  # least recently used goes first (`prune`)
                return table
        except FileNotFoundError:
            problem = "its data file is missing"
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowInvalid) as e:
            problem = f"unreadable ({e})"
        self.warnings.append(f"cache entry {arrow} is damaged ({problem}): removed; its input is tokenized again")
        for p in (side, arrow):
            p.unlink(missing_ok=True)
        return None

    def writer(self, key: str, vocab_size: int, where: str) -> EntryWriter | None:
        """A writer for entry `key`, or None (with a warning, once) when the cache folder cannot be written:
        the build goes on without filling it."""
        if self.unwritable:
            return None
        try:
            self.entries.mkdir(parents=True, exist_ok=True)
            return EntryWriter(self, key, pa.uint16() if vocab_size <= 1 << 16 else pa.int32(), where)
        except OSError as e:
            self.unwritable = True
            self.warnings.append(f"the sample cache {self.folder} cannot be written ({e.strerror or e}): this build "
                                 "fills no entry (--cache-dir DIR for another folder, --no-cache to skip it)")
            return None

    def prune(self, max_size: int | None = None) -> list[Path]:
        """Remove entries, least recently used first, until the cache holds at most `max_size` bytes (its own
        bound by default); also half-written files of builds no longer running (older than a day). Returns
        the entries removed."""
        limit = self.max_size if max_size is None else max_size
        listed = list_entries(self.folder)
        total = sum(e["size"] for e in listed)
        removed = []
        for e in sorted(listed, key=lambda e: e["used"]):
            if total <= limit:
                break
            for p in (e["json"], e["arrow"]):
                p.unlink(missing_ok=True)
            total -= e["size"]
            removed.append(e["arrow"])
        for tmp in self.entries.glob("*.tmp-*") if self.entries.is_dir() else []:
            if time.time() - tmp.stat().st_mtime > 86400:
                tmp.unlink(missing_ok=True)
        return removed

    def report(self) -> dict[str, Any]:
        """What the build took from the cache and put in it (the manifest's `cache`)."""
        return {"folder": str(self.folder), "inputs_reused": len(self.reused), "inputs_tokenized": len(self.tokenized),
                "tokens_reused": self.reused_tokens, "records_tokenized_again": self.again,
                "summary": self.summary()}

    def summary(self) -> str:
        """`3 of 4 inputs from cache, 12.3M tokens; 1 tokenized` (and records tokenized again)."""
        n = len(self.reused) + len(self.tokenized)
        again = f" ({self.again:,} records of them tokenized again: cut, or dropped for length)" if self.again else ""
        return (f"{len(self.reused)} of {n} inputs from cache, {_count(self.reused_tokens)} tokens{again}; "
                f"{len(self.tokenized)} tokenized")


class EntryWriter:
    """One input file's entry, filled batch by batch while it is encoded, then `seal`ed (or `discard`ed)."""

    def __init__(self, cache: Cache, key: str, ids: pa.DataType, where: str) -> None:
        self.cache, self.key, self.where = cache, key, where
        self.schema = _schema(ids)
        self.tmp = cache.entries / f"{key}.arrow.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.sink = pa.OSFile(str(self.tmp), "wb")
        self.out = pa.ipc.new_file(self.sink, self.schema)
        self.tokens = 0

    def add(self, enc: Encoded, first_id: int) -> None:
        """The samples and rejects of one encoded batch of this file (`first_id`: the file's first sample id)."""
        rows: list[tuple[int, int, str, str, str, int]] = []  # record, kind, where, reason, message, sample k
        cut = len(self.where)  # provenance is kept as the part after the file's path: ":12", "[3]", ":row 4"
        for r in enc.rejects:
            kind = AGAIN if r["reason"] in AGAIN_REASONS else REJECT
            rows.append((r["sample_id"] - first_id, kind, r["source"][cut:], r["reason"], r["message"], -1))
        for k, (sid, src, again) in enumerate(zip(enc.sample_ids, enc.sources, enc.truncated)):
            rows.append((sid - first_id, AGAIN if again else SAMPLE, src[cut:], "", "", k if not again else -1))
        if not rows:
            return
        rows.sort()
        picks = [k for *_, k in rows if k >= 0]
        if len(picks) == len(enc.lengths):  # every sample whole (the common case): the batch's arrays as they are
            lengths, ids, trained = enc.lengths, enc.ids, enc.labels != IGNORE_INDEX
        else:
            keep = np.zeros(len(enc.lengths), bool)
            keep[picks] = True
            tokens = np.repeat(keep, enc.lengths)
            lengths, ids, trained = enc.lengths[keep], enc.ids[tokens], enc.labels[tokens] != IGNORE_INDEX
        offsets = np.zeros(len(rows) + 1, np.int32)
        offsets[1:][np.asarray([k >= 0 for *_, k in rows])] = lengths
        offsets = np.cumsum(offsets).astype(np.int32)
        cols = list(zip(*rows))
        self.out.write_batch(pa.record_batch([
            numpy_array(np.asarray(cols[0]), pa.int64()), numpy_array(np.asarray(cols[1]), pa.int8()),
            string_array(cols[2]), string_array(cols[3]), string_array(cols[4]),
            pa.ListArray.from_arrays(numpy_array(offsets, pa.int32()),
                                     numpy_array(ids, self.schema.field("ids").type.value_type)),
            pa.ListArray.from_arrays(numpy_array(offsets, pa.int32()), numpy_array(trained, pa.bool_()))],
            schema=self.schema))
        self.tokens += len(ids)

    def seal(self, records: int) -> None:
        """Finish the entry (`records`: how many its file holds), rename it into place, then its sidecar; a
        failed write (disk full) leaves no entry, and a warning."""
        try:
            self._seal(records)
        except OSError as e:
            self.discard()
            self.cache.warnings.append(f"the sample cache entry for {self.where} could not be written "
                                       f"({e.strerror or e}); the next build tokenizes it again")

    def _seal(self, records: int) -> None:
        self.out.close()
        self.sink.close()
        arrow = self.cache.entries / f"{self.key}.arrow"
        seal = {"size": self.tmp.stat().st_size, "sha256": _sha256(self.tmp), "records": records,
                "tokens": self.tokens, "input": self.where, "format": FORMAT, "labels": LABELS}
        side_tmp = self.cache.entries / f"{self.key}.json.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        side_tmp.write_text(json.dumps(seal) + "\n", encoding="utf-8")
        os.replace(self.tmp, arrow)
        os.replace(side_tmp, self.cache.entries / f"{self.key}.json")

    def discard(self) -> None:
        try:
            self.out.close()
            self.sink.close()
        except (OSError, pa.ArrowException):
            pass
        self.tmp.unlink(missing_ok=True)


def replay(table: pa.Table, first_id: int, path: str, keep, batch_rows: int = 65536
           ) -> Iterator[tuple[int, Any]]:
    """An entry's rows as the build takes them, in record order: `(SAMPLE, (sample ids, sources, ids,
    labels, lengths, num_trained))` batches of untruncated samples, `(REJECT, reject dict)` and `(AGAIN,
    record index)`; only records whose sample id passes `keep` (a part, num_samples). Provenance is rooted
    at `path` (the entry may have been made from a copy of the file elsewhere)."""
    for batch in table.to_batches(max_chunksize=batch_rows):
        record = as_numpy(batch.column(0))
        sid = record + first_id
        wanted = keep(sid)
        kind = as_numpy(batch.column(1))
        where = batch.column(2).to_pylist()
        samples = wanted & (kind == SAMPLE)
        # runs of consecutive samples go out together; a reject or a record tokenized again between them cuts
        cuts = np.flatnonzero(wanted & (kind != SAMPLE))
        lo = 0
        for stop in [*cuts.tolist(), len(kind)]:
            run = np.flatnonzero(samples[lo:stop]) + lo
            if len(run):
                yield SAMPLE, _samples(batch, run, sid, where, path)
            if stop < len(kind):
                if kind[stop] == REJECT:
                    yield REJECT, {"sample_id": int(sid[stop]), "source": path + where[stop],
                                   "reason": batch.column(3)[stop].as_py(), "message": batch.column(4)[stop].as_py()}
                else:
                    yield AGAIN, int(record[stop])
            lo = stop + 1


def _samples(batch: pa.RecordBatch, rows: np.ndarray, sid: np.ndarray, where: list[str], path: str) -> tuple:
    """Rows `rows` (ascending) of an entry batch as (sample ids, sources, ids, labels, lengths, num_trained)."""
    ids_col, trained_col = batch.column(5), batch.column(6)
    if len(rows) == rows[-1] - rows[0] + 1:  # contiguous: slices, no copy
        ids_col, trained_col = ids_col.slice(rows[0], len(rows)), trained_col.slice(rows[0], len(rows))
    else:
        picks = numpy_array(rows, pa.int64())
        ids_col, trained_col = ids_col.take(picks), trained_col.take(picks)
    offsets = as_numpy(ids_col.offsets)
    ids = as_numpy(ids_col.values)[offsets[0]:offsets[-1]].astype(np.int32)
    trained = as_numpy(trained_col.values.slice(offsets[0], offsets[-1] - offsets[0]))
    lengths = np.diff(offsets).astype(np.int64)
    labels = np.where(trained, ids, IGNORE_INDEX).astype(np.int32)
    counts = np.concatenate([[0], np.cumsum(trained, dtype=np.int64)])
    off = offsets - offsets[0]
    return (sid[rows].tolist(), [path + where[r] for r in rows.tolist()], ids, labels, lengths,
            counts[off[1:]] - counts[off[:-1]])


def list_entries(folder: Path) -> list[dict[str, Any]]:
    """Every sealed entry of the cache in `folder`: key, input file it was made from, size, tokens, last use."""
    out = []
    entries = folder / "entries"
    for side in sorted(entries.glob("*.json")) if entries.is_dir() else []:
        try:
            seal = json.loads(side.read_text(encoding="utf-8"))
            arrow = side.with_suffix(".arrow")
            out.append({"key": side.stem, "input": seal.get("input"), "size": int(seal["size"]),
                        "tokens": int(seal.get("tokens", 0)), "records": int(seal.get("records", 0)),
                        "used": side.stat().st_mtime, "arrow": arrow, "json": side})
        except (OSError, ValueError, KeyError):
            continue
    return out


def clear(folder: Path) -> int:
    """Remove every entry (and half-written file) of the cache in `folder`; returns how many files."""
    entries = folder / "entries"
    files = [p for p in entries.iterdir() if p.is_file()] if entries.is_dir() else []
    for p in files:
        p.unlink(missing_ok=True)
    return len(files)


def _count(n: int) -> str:
    """12.3M, 45.6k, 789."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
