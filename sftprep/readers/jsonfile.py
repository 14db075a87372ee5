"""JSON Lines (streamed line by line) and JSON arrays (one document, parsed whole)."""

from __future__ import annotations

import gzip
import json
import re
import zlib
from pathlib import Path
from typing import Iterator

from . import Record
from ..errors import InputError


def _as_record(value, source: str, surrogates: bool = False) -> Record:
    """`surrogates`: the text had a \\uD800-\\uDFFF escape, so a string may hold a lone surrogate."""
    if isinstance(value, dict):
        if surrogates:
            try:
                json.dumps(value, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as e:
                return Record(None, source, f"a string holds a lone UTF-16 surrogate ({e.object[e.start:e.end]!a}), "
                                            "which is not Unicode text (often scraped data cut mid-character)")
        return Record(value, source)
    return Record(None, source, f"expected a JSON object, got {type(value).__name__}")


# a \uD800-\uDFFF escape: only then can a parsed string hold a lone surrogate (pairs become one character)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse(text: str | bytes, source: str) -> Record:
    """One JSON value as a record, or the reason it cannot be one (never an exception)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        return Record(None, source, _json_error(e))
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    return _as_record(value, source, _SURROGATE_ESCAPE.search(raw) is not None)


def _json_error(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON: {e.msg} (column {e.colno})"
    if isinstance(e, RecursionError):
        return "invalid JSON: nested too deeply (more levels than Python can parse)"
    return f"invalid JSON: {e}"  # e.g. an integer of more than 4300 digits


def read_lines(path: Path) -> Iterator[Record]:
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                source = f"{path}:{lineno}"
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
                    raw = raw[3:]
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield Record(None, source, f"invalid UTF-8 at byte {e.start} of the line")
                    continue
                record = parse(line, source)
                record.size = len(raw)
                yield record
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"{path}: the gzip stream is truncated or corrupt after line {lineno} ({e}); "
                         "nothing was built from it: fix or re-download the file") from None


def read_json(path: Path) -> Iterator[Record]:
    """A `.json` file: an array of objects (records numbered from 0), or JSON Lines misnamed."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield Record(None, f"{path}", f"invalid UTF-8 at byte {e.start} of the file")
        return
    if text.lstrip().startswith("{"):  # JSON Lines saved as .json, as `datasets.to_json` does
        yield from read_lines(path)
        return
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        yield Record(None, f"{path}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else str(path), _json_error(e))
        return
    if not isinstance(value, list):
        yield Record(None, str(path), f"expected a JSON array of objects, got {type(value).__name__}")
        return
    surrogates = _SURROGATE_ESCAPE.search(text.encode("utf-8", "surrogatepass")) is not None
    for i, item in enumerate(value):
        yield _as_record(item, f"{path}[{i}]", surrogates)
