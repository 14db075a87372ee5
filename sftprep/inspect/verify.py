"""`sftprep verify`: re-check a build against its manifest and the shard contract.

Checks, shard by shard (vectorized over the flattened Arrow arrays, so a shard of millions of
tokens takes a fraction of a second):

- the file exists, opens, has the contract's columns, and its sha256 is the manifest's;
- the manifest's row and token counts for the shard are the shard's;
- `len(input_ids) == len(labels)` in every row; a row is `max_length` long when packed, and holds
  only its samples (no padding, at most `max_length`) when `packing: none`;
- `len(seq_lens) == len(sample_ids)`, every `seq_lens` > 0, `sum(seq_lens)` <= the row length;
- padding (positions past `sum(seq_lens)`) has id `pad_id` and label -100;
- the first token of every sample has label -100; a trained label equals its input id;
- every id lies in `[0, vocab_size)`;

then over the build: sample ids unique (a wrapped sample's pieces sit next to each other), the
samples and their lengths agree with `samples.feather`, and the manifest totals are the sums.

`sftprep.write.shards.row_problem` runs the row checks on one row in O(row): what `sfttrain` checks on every
row it reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import InputError
from ..pack.packing import mode
from ..tokenize.labels import IGNORE_INDEX, mask_sample_starts
from ..write.manifest import member, shard_path
from ..write.shards import SCHEMA, Flat, flatten, list_parts, open_table, sha256_file
from .folder import read_build, read_sample_info

PER_CHECK = 20  # violations listed per check and batch of rows (all are counted)
BATCH_ROWS = 2048  # rows checked at once: about 2048 x max_length x 30 bytes of scratch


@dataclass(slots=True, order=True)
class Violation:
    """One broken promise; `row`/`position` are inside `file` (None where they do not apply)."""
    order: tuple = field(repr=False, compare=True)
    file: str = field(compare=False)
    row: int | None = field(compare=False)
    position: int | None = field(compare=False)
    message: str = field(compare=False)

    def __str__(self) -> str:
        where = self.file
        if self.row is not None:
            where += f" row {self.row}"
        if self.position is not None:
            where += f", position {self.position}"
        return f"{where}: {self.message}"


@dataclass(slots=True)
class Report:
    """What `verify` found: `ok` when there is no violation."""
    folder: str
    shards: int = 0
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    samples: int = 0
    violations: list[Violation] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # violations found per check

    @property
    def ok(self) -> bool:
        return not self.violations

    def add(self, check: str, file_index: int, file: str, message: str, row: int | None = None,
            position: int | None = None, count: int = 1) -> None:
        self.counts[check] = self.counts.get(check, 0) + count
        order = (file_index, -1 if row is None else row, -1 if position is None else position)
        self.violations.append(Violation(order, file, row, position, message))


def verify(path: str | Path) -> Report:
    """Check every shard of the build in `path`; see the module docstring for the checks.

    Raises:
        FileNotFoundError / ValueError: `path` is not a build (missing or unreadable manifest).
    """
    folder, manifest = read_build(path)
    report = Report(str(folder))
    seen: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    entries = [*manifest["shards"], *(manifest.get("validation_shards") or [])]  # train, then validation
    sums = {}  # split -> (rows, tokens, trained tokens, shards read) at its end
    for k, entry in enumerate(entries):
        found = _check_file(report, folder, manifest, k, entry)
        if found is not None:
            seen.append(found[0])
            lengths.append(found[1])
        if k + 1 == len(manifest["shards"]):
            sums["train"] = (report.rows, report.tokens, report.trained_tokens, len(seen))
    report.shards = len(entries)
    _check_build(report, folder, manifest, seen, lengths, sums.get("train", (0, 0, 0, 0)))
    report.violations.sort()
    return report


def _check_file(report: Report, folder: Path, manifest: dict[str, Any], k: int,
                entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """Check one shard; its (sample_ids, seq_lens) flattened, or None when it cannot be read."""
    name = entry["file"]
    try:
        path = shard_path(folder, name)
    except InputError as e:
        report.add("path", k, str(name), str(e))
        return None
    if not path.exists():
        report.add("missing shard", k, name, "the file is missing")
        return None
    digest = sha256_file(path)
    if digest != entry.get("sha256"):
        report.add("checksum", k, name, f"sha256 is {digest[:16]}… but the manifest says "
                   f"{str(entry.get('sha256'))[:16]}…: the file changed after the build")
    try:
        table = open_table(path)
    except Exception as e:  # a corrupt file can fail in many ways inside Arrow
        report.add("unreadable", k, name, f"cannot be read as an Arrow IPC file ({type(e).__name__}: {e})")
        return None
    if not table.schema.equals(SCHEMA):
        report.add("schema", k, name, f"columns are {table.schema.names} "
                   f"({', '.join(str(t) for t in table.schema.types)}); the contract is {SCHEMA.names}")
        return None
    rows = tokens = 0
    sids, lens = [], []
    for batch in table.to_batches(max_chunksize=BATCH_ROWS):  # bounded memory, still vectorized
        part = pa.Table.from_batches([batch])
        flat = flatten(part)
        if _check_rows(report, k, name, part, flat, manifest, rows):
            _check_positions(report, k, name, flat, manifest, rows)
        tokens += int(flat.real_tokens.sum())
        report.trained_tokens += int((flat.labels != IGNORE_INDEX).sum())
        rows += flat.num_rows
        sids.append(flat.sample_ids)
        lens.append(flat.seq_lens)
    if entry.get("rows") != rows:
        report.add("manifest rows", k, name, f"the manifest says {entry.get('rows')} rows, the shard "
                   f"has {rows}")
    if entry.get("tokens") != tokens:
        report.add("manifest tokens", k, name, f"the manifest says {entry.get('tokens')} tokens, the "
                   f"shard's seq_lens sum to {tokens}")
    report.rows += rows
    report.tokens += tokens
    empty = np.zeros(0, np.int64)
    return (np.concatenate(sids) if sids else empty), (np.concatenate(lens) if lens else empty)


def _listed(report: Report, check: str, mask: np.ndarray) -> np.ndarray:
    """The first PER_CHECK hits of `mask` (to list); the rest are only counted."""
    hits = np.flatnonzero(mask)
    if len(hits) > PER_CHECK:
        report.counts[check] = report.counts.get(check, 0) + len(hits) - PER_CHECK
    return hits[:PER_CHECK]


def _check_rows(report: Report, k: int, name: str, table, flat: Flat, manifest: dict[str, Any],
                row0: int) -> bool:
    """Row-level checks; False when rows are malformed so positions cannot be trusted. `row0` is the
    shard row of the first row of `table`."""
    sound = True
    _, lab_off = list_parts(table.column("labels"))
    lab_len = np.diff(lab_off)
    for r in _listed(report, "lengths", lab_len != flat.row_lens):
        report.add("lengths", k, name, f"{flat.row_lens[r]} input_ids but {lab_len[r]} labels",
                   row=row0 + int(r))
        sound = False
    n_seq, n_sid = np.diff(flat.seq_off), np.diff(list_parts(table.column("sample_ids"))[1])
    for r in _listed(report, "lengths", n_seq != n_sid):
        report.add("lengths", k, name, f"{n_seq[r]} seq_lens but {n_sid[r]} sample_ids", row=row0 + int(r))
        sound = False
    for j in _listed(report, "seq_lens", flat.seq_lens <= 0):
        report.add("seq_lens", k, name, f"seq_lens has {flat.seq_lens[j]} (must be > 0)",
                   row=row0 + int(flat.piece_row[j]))
        sound = False
    real, lens, max_length = flat.real_tokens, flat.row_lens, manifest["max_length"]
    for r in _listed(report, "seq_lens", real > lens):
        report.add("seq_lens", k, name, f"sum(seq_lens) = {real[r]} > row length {lens[r]}",
                   row=row0 + int(r))
        sound = False
    if not mode(manifest.get("packing")).padded:
        bad = (lens > max_length) | (lens != real)
        what = "must hold one sample, unpadded, of at most max_length"
    else:
        bad = lens != max_length
        what = "must be max_length long (packed rows are padded)"
    for r in _listed(report, "row length", bad):
        report.add("row length", k, name, f"row length {lens[r]} with sum(seq_lens) = {real[r]}, "
                   f"max_length {max_length}: {what}", row=row0 + int(r))
    return sound


def _check_positions(report: Report, k: int, name: str, flat: Flat, manifest: dict[str, Any],
                     row0: int) -> None:
    tok = manifest["tokenizer"]
    ids, labels = flat.ids, flat.labels
    row = np.repeat(np.arange(flat.num_rows), flat.row_lens)
    pos = np.arange(len(ids)) - flat.row_off[:-1][row]
    is_pad = pos >= flat.real_tokens[row]
    trained = labels != IGNORE_INDEX

    def add(check: str, mask: np.ndarray, message) -> None:
        for i in _listed(report, check, mask):
            report.add(check, k, name, message(i), row=row0 + int(row[i]), position=int(pos[i]))

    pad_id = tok.get("pad_id")
    add("padding id", is_pad & (ids != pad_id), lambda i: f"padding has id {ids[i]}, not pad_id {pad_id}")
    add("padding label", is_pad & trained, lambda i: f"padding has label {labels[i]}, not -100")
    firsts = mask_sample_starts(np.zeros(len(ids), bool), flat.seq_lens, flat.row_off, flat.seq_off, fill=True)
    add("first token", firsts & trained,
        lambda i: f"first token of sample {_sample_at(flat, i)} has label {labels[i]}, not -100 (it would "
                  "train the previous sample to predict this one)")
    add("label != id", trained & (labels != ids),
        lambda i: f"label {labels[i]} differs from input id {ids[i]} at a trained position")
    vocab = tok.get("vocab_size")
    if vocab:
        add("id range", (ids < 0) | (ids >= vocab), lambda i: f"id {ids[i]} is outside the vocabulary "
            f"[0, {vocab})")


def _sample_at(flat: Flat, i: int) -> int:
    j = int(np.searchsorted(flat.piece_start, i, side="right") - 1)
    return int(flat.sample_ids[j]) if j >= 0 else -1


def _whole_samples(manifest: dict[str, Any], seen: list[np.ndarray],
                   lengths: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(sample ids, lengths) of the samples in shards read (a wrapped sample's pieces joined)."""
    sids = np.concatenate(seen) if seen else np.zeros(0, np.int64)
    lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if mode(manifest.get("packing")).splits:  # pieces of one sample are adjacent: count it once
        keep = np.concatenate([[True], sids[1:] != sids[:-1]]) if len(sids) else np.zeros(0, bool)
        cs = np.concatenate([[0], np.cumsum(lens)])
        starts = np.flatnonzero(keep)
        lens = cs[np.append(starts[1:], len(lens))] - cs[starts]
        sids = sids[keep]
    return sids, lens


def _check_build(report: Report, folder: Path, manifest: dict[str, Any], seen: list[np.ndarray],
                 lengths: list[np.ndarray], train: tuple[int, int, int, int]) -> None:
    """Over every shard of both splits: unique sample ids, the samples file, the manifest totals (`train`:
    rows, tokens, trained tokens and shards read, counted to the last train shard)."""
    n = report.shards
    sids, lens = _whole_samples(manifest, seen, lengths)
    uniq, counts = np.unique(sids, return_counts=True)
    for s in uniq[_listed(report, "unique sample ids", counts > 1)]:
        report.add("unique sample ids", n, "shards", f"sample id {s} appears {counts[uniq == s][0]} times")
    report.samples = len(uniq)
    if len(seen) == n:  # with a shard unreadable, every count below would differ: noise
        _check_samples_file(report, folder, manifest, sids, lens)
        in_train = len(_whole_samples(manifest, seen[:train[3]], lengths[:train[3]])[0])
        _check_totals(report, manifest, (*train[:3], in_train))


def _check_samples_file(report: Report, folder: Path, manifest: dict[str, Any], sids: np.ndarray,
                        lens: np.ndarray) -> None:
    try:
        member(folder, manifest.get("rejects_file", "rejects.jsonl"), "rejects_file")
    except InputError as e:
        report.add("rejects file", len(manifest["shards"]) + 1, str(manifest.get("rejects_file")), str(e))
    name = manifest.get("samples_file", "samples.arrow")
    try:
        info = read_sample_info(folder, manifest)
    except InputError as e:
        report.add("samples file", len(manifest["shards"]) + 1, str(name), str(e))
        return
    if info is None:
        report.add("samples file", len(manifest["shards"]) + 1, name, "the file is missing")
        return
    want = dict(zip(info.column("sample_id").to_pylist(), info.column("num_tokens").to_pylist()))
    have = dict(zip(sids.tolist(), lens.tolist()))
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = [s for s in sorted(set(want) & set(have)) if want[s] != have[s]]
    at = report.shards + 1
    if missing:
        report.add("samples file", at, name, f"{len(missing)} sample(s) listed here are in no shard "
                   f"(first: {missing[:5]})")
    if extra:
        report.add("samples file", at, name, f"{len(extra)} sample(s) in the shards are not listed here "
                   f"(first: {extra[:5]})")
    for i in _listed(report, "samples file", np.ones(len(wrong), bool)):
        s = wrong[i]
        report.add("samples file", at, name, f"sample {s} has {want[s]} tokens here, {have[s]} in the shards")


def _check_totals(report: Report, manifest: dict[str, Any], train: tuple[int, int, int, int]) -> None:
    """The manifest's totals are the train shards' sums (`train`: rows, tokens, trained tokens, samples), and
    its `totals.validation` the validation shards'."""
    totals = manifest.get("totals", {})
    at = report.shards + 2
    held = (report.rows - train[0], report.tokens - train[1], report.trained_tokens - train[2],
            report.samples - train[3])
    checks = [(totals, "totals", train)]
    if isinstance(totals.get("validation"), dict):
        checks.append((totals["validation"], "totals.validation", held))
    for where, name, have in checks:
        for key, value in zip(("rows", "tokens", "trained_tokens", "samples_kept" if name == "totals" else "samples"),
                              have):
            if key in where and where[key] != value:
                report.add("manifest totals", at, "manifest.json", f"{name}.{key} is {where[key]}, the shards "
                           f"hold {value}")


def format_report(report: Report, limit: int = 20) -> str:
    """The human report: OK line, or the first `limit` violations and a count per check."""
    if report.ok:
        return (f"OK: {report.folder}: {report.shards} shard(s), {report.rows:,} rows, {report.tokens:,} "
                f"tokens ({report.trained_tokens:,} trained), {report.samples:,} samples; checksums, "
                "manifest counts and the shard contract hold\n")
    lines = [str(v) for v in report.violations[:limit]]
    total = sum(report.counts.values())
    by_check = ", ".join(f"{k}: {v}" for k, v in sorted(report.counts.items()))
    more = f"; first {limit} listed above" if total > limit else ""
    lines.append(f"FAILED: {report.folder}: {total} violation(s) ({by_check}){more}")
    return "\n".join(lines) + "\n"
