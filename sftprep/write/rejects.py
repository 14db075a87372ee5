"""A build's rejected records, spilled to disk as they come: memory holds two numbers a reject, not its dict.

    rejects (batch by batch) --add--> OUT/tokens.spill.rejects.tmp   rejects.jsonl's own lines, in arrival order
                                      sample id + reason code          in memory (10 bytes a reject), for the counts
    write(out) --> OUT/rejects.jsonl  every reject, in sample-id order (a stable sort of the arrival order)

Rejects arrive batch by batch in input order, so the spill is already sorted; those that arrive out of order
(a recipe's duplicates, found after every record is read) are few and kept in memory until written.
"""

from __future__ import annotations

import heapq
import json
import os
from array import array
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..mix.recipe import source_index
from ..tokenize.encode import CHOSEN
from .files import claim, names_path

REJECTS_FILE = "rejects.jsonl"

# characters that JSON leaves raw but str.splitlines() (and so many JSON Lines readers) splits lines at
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def reject_line(r: dict[str, Any]) -> str:
    """One line of rejects.jsonl: a JSON object, one line under any line splitter (record text can hold U+0085)."""
    return json.dumps(r, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"


class Rejects:
    """Rejected records, in the order they are `add`ed, spilled to `path`; iterated (and `write`n) in sample-id
    order. Counts by reason and by sample id range come from memory; a reject's dict is read back from the
    spill only when asked for (`first`, iteration)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        claim(path)
        with names_path(path):
            self._file = open(path, "w", encoding="utf-8", newline="\n")
        self.ids = array("q")  # each spilled reject's sample id, in spill order
        self._codes = array("H")  # and its reason's code
        self._code: dict[str, int] = {}  # reason -> code, in order of first appearance
        self._late: list[dict[str, Any]] = []  # those that came after a later sample id (kept in memory)
        self.first_fault: dict[str, Any] | None = None  # the fault (not `CHOSEN`) of the lowest sample id

    def add(self, rejects: Iterable[dict[str, Any]]) -> None:
        """Add some rejects (a batch: sorted here by sample id)."""
        for r in sorted(rejects, key=lambda r: r["sample_id"]):
            if r["reason"] not in CHOSEN and (self.first_fault is None
                                              or r["sample_id"] < self.first_fault["sample_id"]):
                self.first_fault = r
            if self.ids and r["sample_id"] < self.ids[-1]:
                self._late.append(r)
                continue
            self.ids.append(r["sample_id"])
            self._codes.append(self._code.setdefault(r["reason"], len(self._code)))
            with names_path(self.path):
                self._file.write(reject_line(r))

    def __len__(self) -> int:
        return len(self.ids) + len(self._late)

    def by_reason(self, faults_only: bool = False) -> Counter:
        """How many of each reason (`faults_only`: leaving out the recipe's choices, `CHOSEN`)."""
        counts = Counter(dict(zip(self._code, np.bincount(np.frombuffer(self._codes, np.uint16),
                                                          minlength=len(self._code)).tolist())))
        counts.update(r["reason"] for r in self._late)
        return Counter({k: v for k, v in counts.items() if v and not (faults_only and k in CHOSEN)})

    def by_source(self, first_ids: np.ndarray) -> list[Counter]:
        """Per recipe source (sources hold consecutive sample ids from `first_ids`), how many of each reason."""
        k, m = len(first_ids), len(self._code)
        cell = source_index(first_ids, np.frombuffer(self.ids, np.int64)).astype(np.int64) * m \
            + np.frombuffer(self._codes, np.uint16)  # (source, reason code), one number each
        grid = np.bincount(cell, minlength=k * m).reshape(k, m).tolist()
        out = [Counter({reason: n for reason, n in zip(self._code, row) if n}) for row in grid]
        for r, source in zip(self._late, source_index(first_ids, [r["sample_id"] for r in self._late]).tolist()):
            out[source][r["reason"]] += 1
        return out

    def count(self, lo: int, hi: int) -> int:
        """Rejects of sample ids in `[lo, hi)`."""
        ids = np.frombuffer(self.ids, np.int64)
        return int(np.count_nonzero((ids >= lo) & (ids < hi))) + sum(lo <= r["sample_id"] < hi for r in self._late)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Every reject, in sample-id order."""
        return (json.loads(line) for _, line in self._lines())

    def _lines(self) -> Iterator[tuple[int, str]]:
        self._file.flush()
        late = [(r["sample_id"], reject_line(r)) for r in sorted(self._late, key=lambda r: r["sample_id"])]
        with open(self.path, encoding="utf-8", newline="\n") as f:
            # ties: the spilled one first, as it came first
            yield from heapq.merge(zip(self.ids, f), late, key=lambda item: item[0])

    def write(self, out: Path) -> None:
        """rejects.jsonl in `out`, atomically (via a temporary file, renamed)."""
        tmp = out / (REJECTS_FILE + ".tmp")
        claim(out / REJECTS_FILE, tmp)
        with names_path(out / REJECTS_FILE), open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for _, line in self._lines():
                f.write(line)
        os.replace(tmp, out / REJECTS_FILE)

    def __enter__(self) -> Rejects:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        try:
            self._file.close()
        except OSError:  # buffered lines that cannot be written (disk full): the file goes anyway
            pass
        self.path.unlink(missing_ok=True)
