"""`sftprep merge`: parts 0..N-1 of one build (`sftprep build --part i/N`) -> the whole build.

Nothing is tokenized again. Every part's shards are memory-mapped, each kept sample is located in them
(by its row's `seq_lens`), the samples of all parts are put back in input order (by sample id), and the
build's own packing and shard writer run over them: the same best-fit-decreasing over every length, the
same seeded row order. Samples in input order are exactly what a single build holds before it packs, so
the merged shards, samples.feather and rejects.jsonl are the single build's, byte for byte, and the
manifest differs only in `config.out`, `config.workers` (as the parts were built) and `merged_from`.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import mmap
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from .. import __version__
from ..config import DEFAULT_SOURCE, BuildConfig, config_from_dict, shard_settings
from ..errors import InputError
from ..inspect.diff import flat_items
from ..inspect.folder import iter_rejects, read_sample_info
from ..tokenize.arrow import as_numpy, numpy_array
from ..write.files import overlaps
from ..write.manifest import MANIFEST, read_manifest, shard_path, tokenizer_dir, write_manifest
from ..write.output import (SOURCE_KEYS, OutLock, build_key, build_manifest, check_rejects, empty_inputs, prepare_out,
                            remove_temps, write_build)
from ..write.rejects import Rejects
from ..write.shards import SCHEMA, check_rows, flatten
from ..write.store import SAMPLE_SCHEMA, Samples

# what every part of one build must agree on (besides `part.of_build`, which covers them all); a part's
# warnings are its template's (an input with no record kept is only known, and warned of, at the merge)
_SAME = ("template", "warnings", "max_length", "packing")
SIDE_ROWS = 1 << 16  # samples table rows taken from the parts' maps into memory at a time


@dataclasses.dataclass
class Part:
    """One part folder and its manifest."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def index(self) -> int:
        return self.manifest["part"]["index"]

    @property
    def count(self) -> int:
        return self.manifest["part"]["count"]


def merge(part_dirs: list[str | Path], out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Merge the parts in `part_dirs` (any order) into one build in `out`; return its manifest.

    Raises:
        InputError / FileNotFoundError: a folder is not a part, a part is missing or given twice, or
            the parts are not of the same build (nothing is written).
        BuildError: too many records rejected over all parts (rejects are left, no manifest).
    """
    parts = check_parts([open_part(d) for d in part_dirs])
    for p in parts:
        if overlaps(p.folder, Path(out)) and not _hidden_inside(p.folder, Path(out)):
            raise InputError(f"--out {out} is the part {p.folder}, or inside or around it: merge reads every part "
                             "while it writes; merge into another folder")
    first = parts[0].manifest
    config = _whole_config(first["config"], out, overwrite)
    lock = OutLock(Path(out))
    try:
        lock.acquire()
        folder = prepare_out(Path(out), first["part"]["of_build"], overwrite)
        try:
            return _merge(parts, config, folder)
        except BaseException:
            remove_temps(folder)  # a failed write (disk full...) leaves no *.tmp behind, as a build
            raise
    finally:
        lock.release()


def _hidden_inside(part: Path, out: Path) -> bool:
    """Whether `part` lies in a hidden folder of `out` (`OUT/.parts`, where --executor ray puts its parts):
    a build never writes, replaces or removes a dot-folder."""
    part, out = part.resolve(), out.resolve()
    return out in part.parents and part.relative_to(out).parts[0].startswith(".")


def open_part(folder: str | Path) -> Part:
    folder = Path(folder)
    manifest = read_manifest(folder)
    if "part" not in manifest:
        raise InputError(f"{folder} is a whole build, not a part (it was built without --part i/N)")
    return Part(folder, manifest)


def check_parts(parts: list[Part]) -> list[Part]:
    """Parts 0..N-1 of one build, each once, sorted by index; else a one-line InputError."""
    if not parts:
        raise InputError("no part to merge: give the folders that `sftprep build --part i/N` wrote")
    for p in parts:
        _check_of_build(p)
    head = parts[0]
    for p in parts[1:]:
        if p.count != head.count:
            raise InputError(f"{p.folder} is part {p.index}/{p.count} but {head.folder} is part "
                             f"{head.index}/{head.count}: parts of different splits cannot be merged")
        if p.manifest["part"]["of_build"] != head.manifest["part"]["of_build"]:
            raise InputError(f"{p.folder} is not a part of the same build as {head.folder}: "
                             f"{_difference(head.manifest, p.manifest)}")
        for key in _SAME:
            if p.manifest.get(key) != head.manifest.get(key):
                raise InputError(f"{p.folder} is not a part of the same build as {head.folder}: {key} "
                                 f"differs ({p.manifest.get(key)!r} vs {head.manifest.get(key)!r})")
    by_index: dict[int, Part] = {}
    for p in parts:
        if p.index in by_index:
            raise InputError(f"part {p.index}/{p.count} is given twice: {by_index[p.index].folder} and {p.folder}")
        by_index[p.index] = p
    missing = [i for i in range(head.count) if i not in by_index]
    if missing:
        raise InputError(f"part(s) {', '.join(map(str, missing))} of {head.count} missing (given: "
                         f"{', '.join(map(str, sorted(by_index)))}); merge needs parts 0..{head.count - 1}")
    version = head.manifest["tool"]["version"]
    if version != __version__:
        raise InputError(f"{head.folder} was built by sftprep {version}, this is {__version__}: merge parts "
                         "with the version that built them (rows depend on its packing)")
    return [by_index[i] for i in range(head.count)]


def _difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    """What differs between two parts' manifests that `of_build` hashes, for the message."""
    ca, cb = (flat_items({k: v for k, v in shard_settings(m["config"]).items() if k != "part"}) for m in (a, b))
    # as in `output.build_id`: inputs and tokenizer count by content (below), wherever their files lie
    changed = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k)
                     and k not in ("read.inputs", "tokenize.tokenizer"))
    if changed:
        key = changed[0]
        return f"setting {key} differs ({cb.get(key)!r} vs {ca.get(key)!r})"
    ha, hb = [i["sha256"] for i in a["inputs"]], [i["sha256"] for i in b["inputs"]]
    if ha != hb:
        return "their inputs differ (content hashes, in order: the same files must be read by every part)"
    if a["tokenizer"].get("vocab_hash") != b["tokenizer"].get("vocab_hash"):
        return "their tokenizers differ (vocabulary hash)"
    if a["tokenizer"].get("files_sha256") != b["tokenizer"].get("files_sha256"):
        return "their tokenizer files differ (same vocabulary; e.g. another chat template or normalizer)"
    if a["tool"]["version"] != b["tool"]["version"]:
        return f"sftprep version differs ({b['tool']['version']} vs {a['tool']['version']})"
    return "nothing in their settings, inputs or tokenizer differs: a manifest's part.of_build was edited"


def _check_of_build(p: Part) -> None:
    """Refuse a part whose recorded `part.of_build` is not what its own manifest's settings, inputs and
    tokenizer give (an edited or forged manifest), naming both."""
    m = p.manifest
    try:
        own = build_key({k: v for k, v in m["config"].items() if k != "part"}, [i["sha256"] for i in m["inputs"]],
                        m["tokenizer"]["files_sha256"], m["tool"]["version"])
    except (KeyError, TypeError, AttributeError):
        raise InputError(f"{p.folder / MANIFEST}: the part's settings, inputs or tokenizer are missing from its "
                         "manifest; build the part again") from None
    if own != m["part"]["of_build"]:
        raise InputError(f"{p.folder / MANIFEST}: part.of_build is {m['part']['of_build']}, but its own settings, "
                         f"inputs and tokenizer make {own}: the manifest was edited or damaged; build the part again")


def _whole_config(cfg: dict[str, Any], out: str | Path, overwrite: bool) -> BuildConfig:
    """The build config the parts share, as a single build of the same data would have it."""
    data = {k: v for k, v in cfg.items() if k not in ("allow_code", "part", "out", "overwrite")}
    config = config_from_dict(data, {"out": str(out), "overwrite": overwrite}, source="part manifest")
    return dataclasses.replace(config, allow_code=cfg.get("allow_code", False))


def _merge(parts: list[Part], config: BuildConfig, out: Path) -> dict[str, Any]:
    first = parts[0].manifest
    samples = MergedSamples(parts)
    read = sum(p.manifest["totals"]["records_read"] for p in parts)
    sources = [{k: s[k] for k in SOURCE_KEYS} for s in first.get("sources") or []] or \
        [{"name": DEFAULT_SOURCE, "inputs": [i["path"] for i in first["inputs"]], "first_sample_id": 0, "records": read}]
    # every part's rejects, in input order (sample ids are global), spilled as a build's are
    with Rejects(out / "tokens.spill.rejects.tmp") as rejects:
        merged = heapq.merge(*(iter_rejects(p.folder, p.manifest) for p in parts), key=lambda r: r["sample_id"])
        while batch := list(itertools.islice(merged, 10_000)):
            rejects.add(batch)
        check_rejects(config, rejects, read, out)
        tok = tokenizer_dir(parts[0].folder, first)
        if tok is None:
            raise FileNotFoundError(f"{parts[0].folder} has no tokenizer/ folder: build the part again")
        shards, totals, extra = write_build(config, out, samples, rejects, read, sources, first["tokenizer"]["pad_id"],
                                            tok)
        empty = empty_inputs([i["path"] for i in first["inputs"]], samples.sources, rejects, sources)
    manifest = build_manifest(
        config, build_id=first["part"]["of_build"], inputs=first["inputs"], template=first["template"],
        warnings=first["warnings"] + empty, tokenizer=first["tokenizer"],
        max_token_id=max(p.manifest["max_token_id"] for p in parts),  # each is max(its ids, pad): so is this
        shards=shards, totals=totals, **extra,
        merged_from={"count": len(parts), "build_ids": [p.manifest["build_id"] for p in parts]})
    write_manifest(out, manifest)
    return manifest


class MergedSamples(Samples):
    """Every part's kept samples in input order, read in place from the parts' memory-mapped shards: the
    `Samples` that packing, the shard writer and the samples table read, as a build's `SampleStore` is."""

    def __init__(self, parts: list[Part]) -> None:
        super().__init__()
        self._ids: list[np.ndarray] = []  # one flat token array per record batch of every shard
        self._labels: list[np.ndarray] = []
        empty = np.zeros(0, np.int64)
        where, tables = [(empty,) * 4], []
        for p in parts:
            where += [self._locate(shard_path(p.folder, s["file"])) for s in p.manifest["shards"]]
            tables.append(read_sample_info(p.folder, p.manifest))
        sid, chunk, start, length = (np.concatenate(c) for c in zip(*where))
        order = np.argsort(sid, kind="stable")
        sid, length, self._chunk, self._start = sid[order], length[order], chunk[order], start[order]
        if (np.diff(sid) == 0).any():
            raise InputError(f"sample id {int(sid[np.flatnonzero(np.diff(sid) == 0)[0]])} is in two parts: "
                             "the parts overlap (built from different inputs?)")
        # the parts' samples tables stay memory-mapped: `table_batches` interleaves them a batch at a time
        side = pa.concat_tables([t.select(SAMPLE_SCHEMA.names).cast(SAMPLE_SCHEMA) for t in tables if t is not None])
        ids = as_numpy(side.column("sample_id"))
        self._order = np.argsort(ids, kind="stable")
        if not (np.array_equal(sid, ids[self._order])
                and np.array_equal(length, as_numpy(side.column("num_tokens"))[self._order].astype(np.int64))):
            raise InputError("a part's shards and its samples file disagree (a partial copy?): check the parts "
                             "with `sftprep verify PART_DIR`")
        self.lengths = length.astype(np.int32)
        self.sample_ids = sid.astype(np.int64)
        self.num_truncated = int(np.count_nonzero(as_numpy(side.column("truncated"))))
        self._side = side

    def table_batches(self) -> Iterator[pa.RecordBatch]:
        for lo in range(0, len(self._order), SIDE_ROWS):
            yield from self._side.take(numpy_array(self._order[lo:lo + SIDE_ROWS], pa.int64())).to_batches()

    def _locate(self, path: Path) -> tuple[np.ndarray, ...]:
        """(sample id, token array index, start, length) of every sample in a shard, batch by batch (each
        batch's tokens stay a view of the memory-mapped shard)."""
        found = [(np.zeros(0, np.int64),) * 4]
        if path.stat().st_size == 0:
            raise InputError(f"{path} is empty: the part was not copied whole; build or copy it again")
        with open(path, "rb") as f:  # a map of our own, so that `_release` can hand its pages back
            self._maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        try:
            table = pa.ipc.open_file(pa.py_buffer(self._maps[-1])).read_all()
        except pa.ArrowInvalid as e:
            raise InputError(f"{path} is not a complete Arrow file ({e}): the part was not copied whole; build or "
                             "copy it again") from None
        if not table.schema.equals(SCHEMA):
            raise InputError(f"{path} does not have a shard's columns and types; build the part again")
        check_rows(table, str(path))
        for batch in table.to_batches():
            flat = flatten(batch)
            self._ids.append(flat.ids)
            self._labels.append(flat.labels)
            k = np.full(len(flat.sample_ids), len(self._ids) - 1, np.int64)
            found.append((flat.sample_ids, k, flat.piece_start.astype(np.int64), flat.seq_lens))
        return tuple(np.concatenate(c) for c in zip(*found))

    def _tokens_of(self, samples: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        for k, start in zip(self._chunk[samples].tolist(), self._start[samples].tolist()):
            yield self._ids[k], self._labels[k], start


__all__ = ["merge", "check_parts", "open_part", "MergedSamples"]
