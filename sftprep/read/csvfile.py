"""CSV / TSV with a header row, streamed; provenance is the physical line number.

Every row is read: a field of any size is a field (csv's default 128 KiB limit would end the file
there), and a row that cannot be read (invalid UTF-8, a malformed row) is rejected alone, at its own
line, and reading goes on with the next row. A row longer than `max_record_bytes` is rejected as
`too_large` without being held: csv is handed lines one at a time (`_Lines`), and a row's lines stop
there, the rest of the row skipped unread (up to the newline that closes its quotes).
"""

from __future__ import annotations

import csv
import os
import re
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from . import Record
from ..errors import InputError
from .jsonfile import CHUNK, _default_limits, too_large

if TYPE_CHECKING:
    from ..config import ReadConfig

# the text is decoded with errors="surrogateescape": an invalid byte becomes one of these, in its own row
_BAD_BYTE = re.compile("[\udc80-\udcff]")


def read(path: Path, limits: ReadConfig | None = None) -> Iterator[Record]:
    limits = limits or _default_limits()
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(sys.maxsize)  # no silent end of the file at a long field (max_record_bytes bounds rows)
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        lines = _Lines(f, path, limits.max_record_bytes)
        reader = csv.DictReader(lines, delimiter=delimiter)
        try:
            header = reader.fieldnames  # reads the header, so line numbers below count from the first row
        except csv.Error as e:
            yield Record(None, f"{path}:1", f"unreadable CSV header: {e}")
            return
        if lines.too_large:
            yield Record(None, f"{path}:1", f"unreadable CSV header: {too_large(limits)}", reason="too_large")
            return
        bad = _invalid_utf8(dict(zip(header or [], header or [])))
        if bad:
            yield Record(None, f"{path}:1", f"unreadable CSV header: {bad}")
            return
        line = lines.lineno
        while True:
            lines.next_row()
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                start, line = line + 1, lines.lineno
                yield Record(None, f"{path}:{start}", f"malformed CSV: {e}")
                continue
            start, line = line + 1, lines.lineno
            if lines.too_large:
                yield Record(None, f"{path}:{start}", too_large(limits), size=lines.size, reason="too_large")
            elif None in row:
                yield Record(None, f"{path}:{start}", f"row has {len(row) - 1 + len(row[None])} cells, "
                             f"the header has {len(row) - 1}", size=lines.size)
            else:
                bad = _invalid_utf8(row)
                yield (Record(None, f"{path}:{start}", bad, size=lines.size) if bad
                       else Record(dict(row), f"{path}:{start}", size=lines.size))


class _Lines:
    """The lines of a CSV file, handed to csv one at a time, each row's lines at most `most` bytes
    together. A row that grows past it sets `too_large`: the rest of it is skipped, read CHUNK characters
    at a time, up to the line end where its quote characters are balanced (a quoted field may span
    lines), and csv is handed one short line that ends the row, so that the row comes back to be rejected.
    `lineno` counts the lines of the file read so far; `next_row()` starts a row."""

    def __init__(self, f, path: Path, most: int) -> None:
        self.f, self.path, self.most = f, path, most
        self.regular = stat.S_ISREG(os.fstat(f.fileno()).st_mode)
        self.lineno = 0
        self.next_row()

    def next_row(self) -> None:
        self.size = 0  # bytes of the row so far
        self.quotes = 0  # quote characters handed to csv in this row
        self.too_large = False

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        text = self.f.readline(self.most + 1 - self.size)  # characters: at least as many bytes
        if not text:
            raise StopIteration
        size = len(text.encode("utf-8", "surrogateescape"))
        if self.size + size <= self.most:  # a whole line: readline stopped at its end, within the limit
            self.size += size
            self.quotes += text.count('"')
            self.lineno += 1
            return text
        if not self.regular:
            raise InputError(f"{self.path}:{self.lineno + 1}: a line longer than max_record_bytes ({self.most:,} "
                             "bytes) in a stream that is not a regular file: stopped there (a device or pipe may "
                             "never end the line); raise --max-record-bytes if it is real")
        inside = self.quotes % 2 == 1  # csv is in a quoted field that the row's lines so far opened
        self.too_large = True
        self._skip(text)
        return '"\n' if inside else "-\n"  # ends the row csv is in (a one-cell row if none): rejected as too_large

    def _skip(self, text: str) -> None:
        """Read past the rest of a too large row, from `text` (read, not handed to csv) on."""
        quotes = self.quotes
        while text:
            self.size += len(text.encode("utf-8", "surrogateescape"))
            quotes += text.count('"')
            ended = text.endswith(("\n", "\r"))
            self.lineno += ended
            if ended and quotes % 2 == 0:
                return
            text = self.f.readline(CHUNK)
        self.lineno += not ended  # the file's last line, without a newline


def _invalid_utf8(row: dict) -> str | None:
    """The first field holding bytes that are not UTF-8, as a message; None if all are text."""
    for key, value in row.items():
        m = _BAD_BYTE.search(value) if isinstance(value, str) else None
        if m:
            at = len(value[:m.start()].encode("utf-8", "surrogateescape"))
            name = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            return f'field "{name}": invalid UTF-8 at byte {at} of the field'
    return None
