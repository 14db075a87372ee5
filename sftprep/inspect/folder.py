"""A build folder read back: its manifest and side tables (no shard data, no tokenizer).

    OUT/manifest.json     read_build(OUT) -> (folder, manifest)
    OUT/samples.feather   read_sample_info -> sample_id, source, num_tokens, num_trained, truncated
    OUT/rejects.jsonl     read_rejects -> every dropped record with its source, reason and message
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..manifest import read_manifest
from ..shards import open_shard

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
    path = folder / manifest.get("samples_file", "samples.arrow")
    return open_shard(path) if path.exists() else None


def sources_by_id(info: pa.Table | None) -> dict[int, str]:
    if info is None:
        return {}
    return dict(zip(info.column("sample_id").to_pylist(), info.column("source").to_pylist()))


def read_rejects(folder: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    path = folder / manifest.get("rejects_file", "rejects.jsonl")
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def source_file(source: str) -> str:
    """`"data.jsonl:17"` / `"data.json[3]"` / `"t.csv:row 4"` -> the file part."""
    m = _SOURCE.match(source)
    return m.group(1) if m else source
