"""`sftprep diff A B`: what changed between two builds, reviewable like a code change.

Compares the resolved configs key by key, the inputs' content hashes, the tokenizer identity and
the totals, then matches samples by `sample_id` and shows the first ones whose tokens or labels
differ as a unified diff of their decoded text (trained text inside ⟦…⟧, as `sftprep inspect
--plain` shows it).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import shard_settings
from .decode import decode_segments, load_build_tokenizer
from .folder import read_build, read_sample_info, sources_by_id
from .unpack import unpack_build
from .view import marked

TOKENIZER_KEYS = ("name", "vocab_size", "vocab_hash", "bos_id", "eos_id", "pad_id", "special_tokens")


@dataclass(slots=True)
class Side:
    """One build, unpacked: samples in sample_id order."""
    folder: Path
    manifest: dict[str, Any]
    sids: np.ndarray
    off: np.ndarray
    ids: np.ndarray
    labels: np.ndarray

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.ids[self.off[i]:self.off[i + 1]], self.labels[self.off[i]:self.off[i + 1]]


@dataclass(slots=True)
class Diff:
    """Everything that differs; empty lists mean "the same"."""
    a: Side
    b: Side
    config: list[tuple[str, Any, Any]] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    tokenizer: list[tuple[str, Any, Any]] = field(default_factory=list)
    totals: list[tuple[str, Any, Any]] = field(default_factory=list)
    sources: list[tuple[str, str, Any, Any]] = field(default_factory=list)  # (source, key, A, B)
    only_a: list[int] = field(default_factory=list)
    only_b: list[int] = field(default_factory=list)
    tokens_differ: list[int] = field(default_factory=list)   # sample ids whose input_ids differ
    labels_differ: list[int] = field(default_factory=list)   # same input_ids, different labels
    common: int = 0

    @property
    def same(self) -> bool:
        return not (self.config or self.inputs or self.tokenizer or self.totals or self.sources or self.only_a
                    or self.only_b or self.tokens_differ or self.labels_differ)


def _side(path: str | Path) -> Side:
    folder, manifest = read_build(path)
    sids, off, ids, labels = unpack_build(folder, manifest)
    return Side(folder, manifest, sids, off, ids, labels)


def flat_items(d: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists stay values)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat_items(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _changes(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    missing = object()
    keys = sorted(set(a) | set(b))
    return [(k, a.get(k, "(unset)"), b.get(k, "(unset)")) for k in keys
            if a.get(k, missing) != b.get(k, missing)]


def diff(path_a: str | Path, path_b: str | Path) -> Diff:
    """Compare two builds (see the module docstring)."""
    a, b = _side(path_a), _side(path_b)
    d = Diff(a, b)
    d.config = _changes(flat_items(_settings(a.manifest)), flat_items(_settings(b.manifest)))
    d.inputs = _input_changes(a.manifest, b.manifest)
    ta, tb = a.manifest["tokenizer"], b.manifest["tokenizer"]
    d.tokenizer = [(k, ta.get(k), tb.get(k)) for k in TOKENIZER_KEYS if ta.get(k) != tb.get(k)]
    d.totals = _changes(flat_items(a.manifest.get("totals", {})), flat_items(b.manifest.get("totals", {})))
    d.sources = _source_changes(a.manifest, b.manifest)
    _compare_samples(d)
    return d


def _settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The settings that change shards, a recipe's sources keyed by name (`sources.c4.proportion`)."""
    cfg = shard_settings(manifest["config"])
    if isinstance(cfg.get("sources"), list):
        cfg = {**cfg, "sources": {s.get("name"): {k: v for k, v in s.items() if k != "name"}
                                  for s in cfg["sources"] if isinstance(s, dict)}}
    return cfg


def _source_changes(ma: dict[str, Any], mb: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """What changed in each recipe source's accounting (a source only in one build: all its numbers)."""
    def by_name(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {s["name"]: flat_items({k: v for k, v in s.items() if k not in ("inputs", "first_sample_id")})
                for s in m.get("sources") or [] if isinstance(s, dict) and "name" in s}
    sa, sb = by_name(ma), by_name(mb)
    names = [n for n in sa] + [n for n in sb if n not in sa]
    return [(n, k, va, vb) for n in names for k, va, vb in _changes(sa.get(n, {}), sb.get(n, {})) if k != "name"]


def _input_changes(ma: dict[str, Any], mb: dict[str, Any]) -> list[str]:
    ha = {Path(i["path"]).name: i["sha256"] for i in ma.get("inputs", [])}
    hb = {Path(i["path"]).name: i["sha256"] for i in mb.get("inputs", [])}
    out = [f"{n}: only in A" for n in sorted(set(ha) - set(hb))]
    out += [f"{n}: only in B" for n in sorted(set(hb) - set(ha))]
    out += [f"{n}: content changed (sha256 {ha[n][:12]} -> {hb[n][:12]})"
            for n in sorted(set(ha) & set(hb)) if ha[n] != hb[n]]
    return out


def _compare_samples(d: Diff) -> None:
    a, b = d.a, d.b
    common, ia, ib = np.intersect1d(a.sids, b.sids, assume_unique=True, return_indices=True)
    d.common = len(common)
    d.only_a = np.setdiff1d(a.sids, b.sids, assume_unique=True).tolist()
    d.only_b = np.setdiff1d(b.sids, a.sids, assume_unique=True).tolist()
    for sid, i, j in zip(common.tolist(), ia.tolist(), ib.tolist()):
        (ids_a, lab_a), (ids_b, lab_b) = a.sample(i), b.sample(j)
        if not np.array_equal(ids_a, ids_b):
            d.tokens_differ.append(sid)
        elif not np.array_equal(lab_a, lab_b):
            d.labels_differ.append(sid)


# -- output --------------------------------------------------------------------------------------

def format_diff(d: Diff, show: int = 3, tokenizer: str | None = None) -> str:
    """The review: settings, tokenizer, totals, sample counts, then `show` decoded sample diffs."""
    a, b = d.a, d.b
    lines = [f"--- A {a.folder}", f"+++ B {b.folder}"]
    if d.same:
        return "\n".join(lines + ["no differences: same settings, tokenizer, totals and samples"]) + "\n"
    lines.append("config:" if d.config else "config: same")
    lines += [f"  {k}: {va!r} -> {vb!r}" for k, va, vb in d.config]
    lines.append("inputs:" if d.inputs else "inputs: same content")
    lines += [f"  {x}" for x in d.inputs]
    ta = a.manifest["tokenizer"]
    if d.tokenizer:
        lines.append("tokenizer: CHANGED (token ids of A and B are not comparable)" if any(
            k in ("vocab_hash", "vocab_size") for k, _, _ in d.tokenizer) else "tokenizer: changed")
        lines += [f"  {k}: {va!r} -> {vb!r}" for k, va, vb in d.tokenizer]
    else:
        lines.append(f"tokenizer: same ({Path(str(ta.get('name'))).name}, vocab {ta.get('vocab_size'):,}, "
                     f"hash {str(ta.get('vocab_hash'))[:12]})")
    lines.append("totals:" if d.totals else "totals: same")
    lines += [f"  {k}: {_fmt(va)} -> {_fmt(vb)}{_delta(va, vb)}" for k, va, vb in d.totals]
    if d.sources:
        lines.append("sources:")
        lines += [f"  {n}: {k}: {_fmt(va)} -> {_fmt(vb)}{_delta(va, vb)}" for n, k, va, vb in d.sources]
    lines.append(f"samples: {d.common:,} in both, {len(d.only_a):,} only in A, {len(d.only_b):,} only in B; "
                 f"{len(d.tokens_differ):,} differ in tokens, {len(d.labels_differ):,} in labels only")
    if d.only_a:
        lines.append(f"  only in A: {_ids(d.only_a)}")
    if d.only_b:
        lines.append(f"  only in B: {_ids(d.only_b)}")
    changed = sorted(d.tokens_differ + d.labels_differ)
    if changed and show > 0:
        lines.append(f"first {min(show, len(changed))} changed sample(s), trained text inside ⟦…⟧:")
        lines += _sample_diffs(d, changed[:show], tokenizer)
    return "\n".join(lines) + "\n"


def _sample_diffs(d: Diff, sids: list[int], tokenizer: str | None) -> list[str]:
    a, b = d.a, d.b
    tok_a = load_build_tokenizer(a.folder, a.manifest, tokenizer)
    same_tok = a.manifest["tokenizer"].get("vocab_hash") == b.manifest["tokenizer"].get("vocab_hash")
    tok_b = tok_a if same_tok else load_build_tokenizer(b.folder, b.manifest, tokenizer)
    src_a = sources_by_id(read_sample_info(a.folder, a.manifest))
    src_b = sources_by_id(read_sample_info(b.folder, b.manifest))
    pos_a = {s: i for i, s in enumerate(a.sids.tolist())}
    pos_b = {s: i for i, s in enumerate(b.sids.tolist())}
    out = []
    for sid in sids:
        ta = marked(decode_segments(tok_a, *a.sample(pos_a[sid])))
        tb = marked(decode_segments(tok_b, *b.sample(pos_b[sid])))
        what = "labels only" if sid in d.labels_differ else "tokens"
        out += difflib.unified_diff(ta.splitlines(), tb.splitlines(), lineterm="", n=2,
                                    fromfile=f"A sample {sid} ({src_a.get(sid, '?')})",
                                    tofile=f"B sample {sid} ({src_b.get(sid, '?')}) [{what} differ]")
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return repr(v) if isinstance(v, str) else str(v)


def _delta(va: Any, vb: Any) -> str:
    if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
        dv = vb - va
        return f" ({dv:+,})" if isinstance(dv, int) else f" ({dv:+.4f})"
    return ""


def _ids(ids: list[int], most: int = 10) -> str:
    more = f" … ({len(ids) - most:,} more)" if len(ids) > most else ""
    return ", ".join(map(str, ids[:most])) + more
