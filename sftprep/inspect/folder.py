"""A build folder read back: its manifest and side tables (no shard data, no tokenizer).

    OUT/manifest.json     read_build(OUT) -> (folder, manifest)
    OUT/samples.feather   read_sample_info -> sample_id, source, num_tokens, num_trained, truncated
    OUT/rejects.jsonl     read_rejects -> every dropped record with its source, reason and message
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from ..errors import InputError
from ..write.manifest import member, read_manifest
from ..write.shards import open_table

SAMPLE_COLUMNS = ("sample_id", "source", "num_tokens", "num_trained", "truncated")

_SOURCE = re.compile(r"^(.*?)(?::\d+|\[\d+\]|:row \d+)$")


def read_build(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The build folder and its manifest; a clear error when the folder is not a build."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist (expected a folder written by `sftprep build`)")
    manifest = read_manifest(p)
    return (p if p.is_dir() else p.parent), manifest


def read_sample_info(folder: Path, manifest: dict[str, Any]) -> pa.Table | None:
    """`samples.feather` (sample_id, source, num_tokens, num_trained, truncated), if the build has one."""
    path = member(folder, manifest.get("samples_file", "samples.arrow"), "samples_file")
    if not path.exists():
        return None
    table = open_table(path)
    missing = [c for c in SAMPLE_COLUMNS if c not in table.schema.names]
    if missing:
        raise InputError(f"{path} lacks the columns {', '.join(missing)} of a samples file; rebuild with "
                         "`sftprep build --overwrite`")
    return table


def sources_by_id(info: pa.Table | None) -> dict[int, str]:
    if info is None:
        return {}
    return dict(zip(info.column("sample_id").to_pylist(), info.column("source").to_pylist()))


def read_rejects(folder: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every line of `rejects.jsonl`: a JSON object with source, reason and message."""
    return list(iter_rejects(folder, manifest))


def iter_rejects(folder: Path, manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The lines of `rejects.jsonl` one at a time (`read_rejects`)."""
    path = member(folder, manifest.get("rejects_file", "rejects.jsonl"), "rejects_file")
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not a JSON line ({e}); the rejects file was changed after the build")
            if not isinstance(r, dict) or not all(k in r for k in ("source", "reason", "message")):
                raise InputError(f"{path}:{n}: a reject is an object with source, reason and message")
            yield r


def source_file(source: str) -> str:
    """`"data.jsonl:17"` / `"data.json[3]"` / `"t.csv:row 4"` -> the file part."""
    m = _SOURCE.match(source)
    return m.group(1) if m else source
