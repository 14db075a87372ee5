"""CSV / TSV with a header row, streamed; provenance is the physical line number.

Every row is read: a field of any size is a field (csv's default 128 KiB limit would end the file
there), and a row that cannot be read (invalid UTF-8, a malformed row) is rejected alone, at its own
line, and reading goes on with the next row.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path
from typing import Iterator

from . import Record

# the text is decoded with errors="surrogateescape": an invalid byte becomes one of these, in its own row
_BAD_BYTE = re.compile("[\udc80-\udcff]")


def read(path: Path) -> Iterator[Record]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(sys.maxsize)  # no silent end of the file at a long field
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            header = reader.fieldnames  # reads the header, so line numbers below count from the first row
        except csv.Error as e:
            yield Record(None, f"{path}:1", f"unreadable CSV header: {e}")
            return
        bad = _invalid_utf8(dict(zip(header or [], header or [])))
        if bad:
            yield Record(None, f"{path}:1", f"unreadable CSV header: {bad}")
            return
        line = reader.line_num
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                start, line = line + 1, reader.line_num
                yield Record(None, f"{path}:{start}", f"malformed CSV: {e}")
                continue
            start, line = line + 1, reader.line_num
            if None in row:
                yield Record(None, f"{path}:{start}", f"row has {len(row) - 1 + len(row[None])} cells, "
                             f"the header has {len(row) - 1}")
                continue
            bad = _invalid_utf8(row)
            yield Record(None, f"{path}:{start}", bad) if bad else Record(dict(row), f"{path}:{start}")


def _invalid_utf8(row: dict) -> str | None:
    """The first field holding bytes that are not UTF-8, as a message; None if all are text."""
    for key, value in row.items():
        m = _BAD_BYTE.search(value) if isinstance(value, str) else None
        if m:
            at = len(value[:m.start()].encode("utf-8", "surrogateescape"))
            name = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            return f'field "{name}": invalid UTF-8 at byte {at} of the field'
    return None
