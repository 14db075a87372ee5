"""JSON Lines (streamed line by line) and JSON arrays (streamed item by item over a sliding buffer)."""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import re
import stat
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from . import Record
from ..errors import InputError

if TYPE_CHECKING:
    from ..config import ReadConfig


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
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse(text: str, source: str) -> Record:
    """One JSON value as a record, or the reason it cannot be one (never an exception)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        return Record(None, source, _json_error(e))
    return _as_record(value, source, _SURROGATE_ESCAPE.search(text) is not None)


def _json_error(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON: {e.msg} (column {e.colno})"
    if isinstance(e, RecursionError):
        return "invalid JSON: nested too deeply (more levels than Python can parse)"
    return f"invalid JSON: {e}"  # e.g. an integer of more than 4300 digits


def read_lines(path: Path, limits: ReadConfig | None = None) -> Iterator[Record]:
    """JSON Lines, one record a line; memory is bounded by `limits` (`ReadConfig`) whatever the file
    holds: a line longer than `max_record_bytes` is rejected as `too_large` without being held."""
    limits = limits or _default_limits()
    lineno = 0
    try:
        with _open(path, limits) as f:
            for lineno, raw, size in _lines(f, path, limits):
                source = f"{path}:{lineno}"
                if raw is None:
                    yield Record(None, source, too_large(limits), size=size, reason="too_large")
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield Record(None, source, f"invalid UTF-8 at byte {e.start} of the line")
                    continue
                record = parse(line, source)
                record.size = size
                yield record
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"{path}: the gzip stream is truncated or corrupt after line {lineno} ({e}); "
                         "nothing was built from it: fix or re-download the file") from None


def _default_limits() -> ReadConfig:
    from ..config import ReadConfig

    return ReadConfig()


def too_large(limits: ReadConfig, what: str = "it was skipped unread") -> str:
    """A `too_large` reject's message."""
    return (f"the record is longer than max_record_bytes ({limits.max_record_bytes:,} bytes); {what}: "
            "raise --max-record-bytes if it is real")


class _Inflated(io.RawIOBase):
    """A gzip file's decompressed bytes, refusing to inflate more than `max_gzip_ratio` times the
    compressed bytes read so far (past the first GZIP_FREE bytes): a 4 MB gzip bomb stops at once."""

    def __init__(self, path: Path, ratio: float) -> None:
        self.path, self.ratio, self.out = path, ratio, 0
        self.raw = open(path, "rb")
        self.gz = gzip.GzipFile(fileobj=self.raw)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.gz.readinto(b)
        self.out += n
        read = max(self.raw.tell(), 1)
        if self.out > GZIP_FREE and self.out > self.ratio * read:
            raise InputError(f"{self.path}: inflates more than max_gzip_ratio ({self.ratio:g}) times its "
                             f"compressed size ({self.out:,} bytes from {read:,}): a gzip bomb, or data "
                             "this repetitive is real: then raise --max-gzip-ratio")
        return n

    def close(self) -> None:
        self.gz.close()
        self.raw.close()
        super().close()


GZIP_FREE = 64 << 20  # any gzip file may inflate this far, whatever its ratio


def _open(path: Path, limits: ReadConfig):
    if path.suffix == ".gz":
        return io.BufferedReader(_Inflated(path, limits.max_gzip_ratio), CHUNK)
    return open(path, "rb")


def _no_bom(raw: bytes, lineno: int) -> bytes:
    return raw[3:] if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else raw  # a UTF-8 byte order mark


def _lines(f, path: Path, limits: ReadConfig) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, bytes, size) of each non-empty line, read in CHUNK-sized pieces: a line never
    grows past `max_record_bytes` in memory (its bytes are None then, the rest of it skipped). A run
    of more than `max_blank_lines` empty lines, or an over-long line in a stream that may never end
    (a device, a pipe), stops the file with an InputError."""
    most, blank_most = limits.max_record_bytes, limits.max_blank_lines
    regular = path.suffix == ".gz" or stat.S_ISREG(os.fstat(f.fileno()).st_mode)  # a .gz ends: max_gzip_ratio
    lineno, blanks, parts, size = 0, 0, [], 0  # parts: the current line so far (None once it is too long)
    while chunk := f.read(CHUNK):
        pieces = chunk.split(b"\n")
        for i, piece in enumerate(pieces):
            size += len(piece)
            if parts is not None:
                parts.append(piece)
                if size > most:
                    parts = None
                    if not regular:
                        raise InputError(f"{path}:{lineno + 1}: a line longer than max_record_bytes ({most:,} bytes) "
                                         "in a stream that is not a regular file: stopped there (a device or "
                                         "pipe may never end the line); raise --max-record-bytes if it is real")
            if i == len(pieces) - 1:
                break  # the line goes on in the next chunk
            lineno += 1
            size += 1  # its newline
            raw = None if parts is None else _no_bom(b"".join(parts), lineno)
            if raw is not None and not raw.strip():
                blanks += 1
                if blanks > blank_most:
                    raise InputError(f"{path}:{lineno}: more than max_blank_lines ({blank_most:,}) empty lines in "
                                     "a row: stopped there; raise --max-blank-lines if the file is right")
            else:
                yield lineno, raw, size
                blanks = 0
            parts, size = [], 0
    if size:
        lineno += 1
        raw = None if parts is None else _no_bom(b"".join(parts), lineno)
        if raw is None or raw.strip():
            yield lineno, raw, size


def read_json(path: Path, limits: ReadConfig | None = None) -> Iterator[Record]:
    """A `.json` file: an array of objects (records numbered from 0), streamed with bounded memory
    (`_read_array`), or JSON Lines misnamed (as `datasets.to_json` writes)."""
    limits = limits or _default_limits()
    with open(path, "rb") as f:
        head = f.read(4096)
    first = head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1]
    if first == b"{":
        yield from read_lines(path, limits)
    elif first == b"[":
        yield from _read_array(path, limits)
    else:  # not an array (or only whitespace at the start): small or broken, read as one value
        yield from _read_whole(path, limits)


def _read_whole(path: Path, limits: ReadConfig) -> Iterator[Record]:
    with open(path, "rb") as f:
        data = f.read(limits.max_record_bytes + 1)
    if len(data) > limits.max_record_bytes:
        yield Record(None, str(path), too_large(limits), reason="too_large")
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield Record(None, f"{path}", f"invalid UTF-8 at byte {e.start} of the file")
        return
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        yield Record(None, f"{path}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else str(path), _json_error(e))
        return
    if not isinstance(value, list):
        yield Record(None, str(path), f"expected a JSON array of objects, got {type(value).__name__}")
        return
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    for i, item in enumerate(value):
        yield _as_record(item, f"{path}[{i}]", surrogates)


CHUNK = 1 << 20  # bytes read at a time from a .json array
_SPACE = " \t\r\n"


class _Text:
    """A file's text decoded incrementally: `buf[pos:]` is what is not parsed yet; `more()` appends at
    least as much as is buffered (so re-parsing a long value costs O(its size) in all), dropping the
    parsed part. `line` is the line number of `buf[0]`."""

    def __init__(self, f, most: int) -> None:
        self.f, self.buf, self.pos, self.line, self.eof = f, "", 0, 1, False
        self.most = most  # characters of one value, at most (max_record_bytes)
        self.col = 0  # characters of buf[0]'s line before it
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.read_bytes = 0

    def more(self) -> bool:
        if self.eof:
            return False
        if len(self.buf) - self.pos > self.most:
            raise _TooLarge
        chunk = self.f.read(min(max(CHUNK, 4 * (len(self.buf) - self.pos)), self.most + 1))
        self.eof = not chunk
        pending = len(self.decoder.getstate()[0])
        try:
            text = self.decoder.decode(chunk, final=self.eof)
        except UnicodeDecodeError as e:
            raise _BadUtf8(self.read_bytes - pending + e.start) from None
        self.read_bytes += len(chunk)
        self.line += self.buf.count("\n", 0, self.pos)
        nl = self.buf.rfind("\n", 0, self.pos)
        self.col = self.pos - nl - 1 if nl >= 0 else self.col + self.pos
        self.buf, self.pos = self.buf[self.pos:] + text, 0
        return True

    def skip_space(self) -> str:
        """The next non-space character ('' at the end of the file), without consuming it."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _SPACE:
                self.pos += 1
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos:self.pos + 1]

    def line_of(self, index: int) -> int:
        return self.line + self.buf.count("\n", 0, index)

    def column_of(self, index: int) -> int:
        nl = self.buf.rfind("\n", 0, index)
        return index - nl if nl >= 0 else self.col + index + 1


class _TooLarge(Exception):
    """An array item past max_record_bytes (`index` set by the array's loop)."""

    index = 0


class _BadUtf8(Exception):
    def __init__(self, byte: int) -> None:
        self.byte = byte


def _read_array(path: Path, limits: ReadConfig) -> Iterator[Record]:
    """Stream the items of a top-level JSON array, one `raw_decode` each over a sliding buffer. A bad
    item (too deep, an integer too long, a lone surrogate, not an object) is one rejected record;
    a syntax error ends the array there: what follows it cannot be told apart into records, so it
    is one rejected entry `file:line` saying so."""
    with open(path, "rb") as f:
        t = _Text(f, limits.max_record_bytes)
        try:
            yield from _array_items(path, t)
        except _BadUtf8 as e:
            yield Record(None, f"{path}", f"invalid UTF-8 at byte {e.byte} of the file; the records after it "
                                          "were not read")
        except _TooLarge as e:
            yield Record(None, f"{path}[{e.index}]", too_large(limits, "it and the records after it were not read"),
                         reason="too_large")


def _array_items(path: Path, t: _Text) -> Iterator[Record]:
    decoder = json.JSONDecoder()
    t.skip_space()
    t.pos += 1  # the '[' read_json saw
    i = 0
    while True:
        c = t.skip_space()
        if c == "]" and i == 0:
            break
        if i > 0:  # after an item: ',' or ']'
            if c == "]":
                break
            if c != ",":
                yield _syntax_error(path, t, t.pos, "Expecting ',' delimiter" if c else "the array is not closed", i)
                return
            t.pos += 1
            t.skip_space()
        try:
            kind, value, end = _next_value(decoder, t)
        except _TooLarge as e:
            e.index = i
            raise
        start = t.pos
        if kind == "syntax":
            yield _syntax_error(path, t, end, value, i)
            return
        if kind == "bad":  # too deep, an integer too long: this item alone is rejected
            yield Record(None, f"{path}[{i}]", value, size=end - start)
        else:
            record = _as_record(value, f"{path}[{i}]", _SURROGATE_ESCAPE.search(t.buf, start, end) is not None)
            record.size = end - start
            yield record
        t.pos, i = end, i + 1
    t.pos += 1  # the closing ']'
    if t.skip_space():
        yield _syntax_error(path, t, t.pos, "Extra data", i)


def _next_value(decoder: json.JSONDecoder, t: _Text) -> tuple[str, Any, int]:
    """The value at `t.pos`, reading more of the file until it is complete: ("value", value, end),
    ("bad", message, end) for a value Python cannot hold, or ("syntax", message, index)."""
    while True:
        try:
            value, end = decoder.raw_decode(t.buf, t.pos)
        except json.JSONDecodeError as e:
            cut = e.pos >= len(t.buf) - 6 or e.msg.startswith("Unterminated string")  # maybe the chunk's end
            if cut and t.more():
                continue
            return "syntax", e.msg, e.pos
        except (ValueError, RecursionError) as e:
            end = _value_end(t.buf, t.pos)
            if end is None and t.more():
                continue
            return ("bad", _json_error(e), end) if end is not None else ("syntax", "the value is not closed", len(t.buf))
        if end == len(t.buf) and t.more():  # a number may go on in the next chunk
            continue
        return "value", value, end


def _value_end(buf: str, pos: int) -> int | None:
    """Where the JSON value at `pos` ends, by brackets and strings alone (for values `json` refuses
    to build); None if it does not end in `buf`."""
    depth, i, n = 0, pos, len(buf)
    while i < n:
        c = buf[i]
        if c == '"':
            i += 1
            while i < n and buf[i] != '"':
                i += 2 if buf[i] == "\\" else 1
        elif c in "[{":
            depth += 1
        elif c in "]}" or (c == "," and depth == 0):
            if depth == 0:
                return i
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _syntax_error(path: Path, t: _Text, index: int, msg: str, i: int) -> Record:
    """A syntax error in the array: it ends there (what follows cannot be split into records)."""
    col = t.column_of(index)
    after = f"; the array is unreadable from record {i} on" if i else ""
    return Record(None, f"{path}:{t.line_of(index)}", f"invalid JSON: {msg} (column {col}){after}")
