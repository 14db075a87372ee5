"""Readers: one module per file type, each yielding `Record`s with their provenance.

`expand_inputs(patterns)` resolves files, folders and globs (inputs in the order given, globs sorted);
`reader_for(path)` picks the reader by file type; each reader streams its file's records.
"""

from __future__ import annotations

import functools
import glob
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from ..errors import InputError

if TYPE_CHECKING:
    from ..config import ReadConfig

__all__ = ["Record", "count_records", "expand_inputs", "reader_for"]


@dataclass(slots=True)
class Record:
    """One input record. `fields` is None when the record could not be parsed; `error` says why."""

    fields: dict[str, Any] | None
    source: str  # "file:line" for text formats, "file:row N" for tabular ones
    error: str | None = None
    size: int = 0  # bytes of input it came from, where known (bounds a batch's memory)
    reason: str = "unreadable"  # the reject's category when `fields` is None (`too_large`: past max_record_bytes)


GLOB_PREFIX = "glob:"  # `glob:PATTERN` is always expanded, even where a file has that very name


def expand_inputs(patterns: tuple[str, ...] | list[str]) -> list[Path]:
    """Resolve files, folders and glob patterns to a sorted, de-duplicated list of input paths.

    A path that exists is taken as it is, whatever characters it holds (`[1].jsonl`, `star*.jsonl`); a
    pattern that names no file is expanded (`*`, `?`, `[...]`, `**` across folders); `glob:PATTERN` is
    always expanded. To name a file literally whatever exists, escape the glob characters (`[[]1].jsonl`).
    """
    paths: list[Path] = []
    for pattern in patterns:
        forced = pattern.startswith(GLOB_PREFIX)
        pattern = pattern[len(GLOB_PREFIX):] if forced else pattern
        if forced or (any(ch in pattern for ch in "*?[") and not Path(pattern).exists()):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise FileNotFoundError(f"input pattern {pattern!r} matches no file")
            paths.extend(Path(m) for m in matches)
        else:
            p = Path(pattern)
            if not p.exists():
                raise FileNotFoundError(f"input {pattern} does not exist")
            paths.append(p)
    for p in paths:
        check_name(p)
    seen: set[Path] = set()
    unique = [p for p in paths if not (p in seen or seen.add(p))]
    for p in unique:
        reader_for(p)  # fail early on an unsupported file type
    return unique


def check_name(path: Path) -> None:
    """Refuse a file name that is not UTF-8 (the file system allows any bytes): each record's provenance,
    the rejects file and the manifest name their input in text."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise InputError(f"input {shown}: the file name is not valid UTF-8; rename the file "
                         "(e.g. `convmv -f latin1 -t utf8`) or link it under a UTF-8 name") from None


def reader_for(path: Path, limits: ReadConfig | None = None):
    """The reader module's `read(path)` for a path, by extension (or folder layout); text readers
    keep to `limits` (`ReadConfig`'s max_record_bytes, max_gzip_ratio, max_blank_lines; CSV: max_record_bytes)."""
    from . import arrow, csvfile, hf_disk, jsonfile, parquet

    if path.is_dir():
        if any((path / n).exists() for n in ("state.json", "dataset_dict.json")):
            return hf_disk.read
        raise InputError(f"input folder {path} is not a `datasets.save_to_disk` folder (no state.json); "
                         f"pass the files inside it, or a glob such as '{path}/*.jsonl'")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    by_suffix = {".jsonl": jsonfile.read_lines, ".ndjson": jsonfile.read_lines, ".jsonl.gz": jsonfile.read_lines,
                 ".json": jsonfile.read_json, ".csv": csvfile.read, ".tsv": csvfile.read, ".parquet": parquet.read,
                 ".arrow": arrow.read, ".feather": arrow.read, ".ipc": arrow.read}
    if suffix.lower() not in by_suffix:
        raise InputError(f"input {path}: unsupported file type {suffix or '(none)'!r}; expected one of "
                         f"{', '.join(sorted(by_suffix))} or a `datasets.save_to_disk` folder")
    read = by_suffix[suffix.lower()]
    bounded = (jsonfile.read_lines, jsonfile.read_json, csvfile.read)
    return functools.partial(read, limits=limits) if read in bounded else read


def count_records(path: Path) -> int | None:
    """About how many records `path` holds, where that is cheap to know (for a progress bar's
    total): lines of JSON Lines and CSV (blank lines and quoted newlines make it an estimate), rows
    of Parquet (metadata) and Arrow files; None for compressed, `.json` and `datasets` inputs."""
    name = path.name.lower()
    try:
        if name.endswith((".jsonl", ".ndjson", ".csv", ".tsv")):
            lines, last = 0, b"\n"
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    lines += chunk.count(b"\n")
                    last = chunk[-1:]
            lines += last != b"\n"
            return max(lines - name.endswith((".csv", ".tsv")), 0)
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if name.endswith((".arrow", ".feather", ".ipc")):
            from .arrow import iter_batches

            return sum(b.num_rows for b in iter_batches(path))
    except Exception:  # unreadable: the reader will say why; the bar just has no total
        return None
    return None
