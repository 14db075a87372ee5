"""JSON Lines (streamed line by line) and JSON arrays (one document, parsed whole)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

from . import Record


def _as_record(value, source: str) -> Record:
    if isinstance(value, dict):
        return Record(value, source)
    return Record(None, source, f"expected a JSON object, got {type(value).__name__}")


def read_lines(path: Path) -> Iterator[Record]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            source = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Record(None, source, f"invalid UTF-8 at byte {e.start} of the line")
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                yield Record(None, source, f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            yield _as_record(value, source)


def read_json(path: Path) -> Iterator[Record]:
    """A `.json` file: an array of objects (records numbered from 0), or JSON Lines misnamed."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        yield Record(None, f"{path}", f"invalid UTF-8 at byte {e.start} of the file")
        return
    if text.lstrip().startswith("{"):  # JSON Lines saved as .json, as `datasets.to_json` does
        yield from read_lines(path)
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        yield Record(None, f"{path}:{e.lineno}", f"invalid JSON: {e.msg} (column {e.colno})")
        return
    if not isinstance(value, list):
        yield Record(None, str(path), f"expected a JSON array of objects, got {type(value).__name__}")
        return
    for i, item in enumerate(value):
        yield _as_record(item, f"{path}[{i}]")
