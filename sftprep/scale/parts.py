"""Parts of a build: `--part i/N` keeps the records whose global index is i modulo N.

The global index is the record's position in the whole input (every input file, in order, as a single
build numbers them: it is the sample id), so a part does not depend on file sizes or on how files are
split, and parts 0..N-1 hold every record exactly once. Interleaving (rather than N contiguous ranges)
needs no count of the records up front and spreads long and short records evenly over the parts.

A part is a normal build folder (shards, samples.feather, rejects.jsonl, tokenizer/) whose manifest has

    "part": {"index": i, "count": N, "of_build": <build_id of the whole build>}

`sftprep merge` (sftprep.scale.merge) checks that parts 0..N-1 of one `of_build` are all there, once each,
and packs their samples again as one build.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..pack.packing import MODES

PartSpec = tuple[int, int]


def parse_part(value: Any) -> PartSpec | None:
    """`"2/8"` (as typed after --part or in YAML), `[2, 8]` or `(2, 8)` -> `(2, 8)`; None stays None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        i, n = value
    else:
        i, sep, n = str(value).partition("/")
        if not sep:
            raise ConfigError.listing("build config", [f"part={value!r} is not i/N (e.g. --part 0/4, the first of "
                                                       "4 parts; parts count from 0)"])
    try:
        return int(i), int(n)
    except (TypeError, ValueError):
        raise ConfigError.listing("build config", [f"part={value!r} is not i/N with whole numbers (e.g. "
                                                   "--part 0/4)"]) from None


def check_part(part: PartSpec, packing: str) -> list[str]:
    """Problems with a `part` setting, for `BuildConfig`'s checks."""
    i, n = part
    problems = []
    if n < 1:
        problems.append(f"part={i}/{n}: the number of parts must be at least 1")
    elif not 0 <= i < n:
        problems.append(f"part={i}/{n}: the part index counts from 0 to {n - 1} (e.g. "
                        "--part $SLURM_ARRAY_TASK_ID/N with --array=0-(N-1))")
    if packing in MODES and MODES[packing].splits:
        problems.append(f"part: --packing {packing} cannot be built in parts: its rows cut samples, and the "
                        "label of the token a cut lands on is lost (-100), so merge could not rebuild them; "
                        "use a packing that keeps samples whole (bfd, none), or build on one machine")
    return problems


def part_size(total: int, part: PartSpec) -> int:
    """How many of `total` records (numbered 0..total-1) part `(i, N)` holds."""
    i, n = part
    return len(range(i, total, n))


def describe(part: PartSpec) -> str:
    """Which records a part holds, for messages: `records 1, 5, 9, ... (index = 1 mod 4)`."""
    i, n = part
    if n == 1:
        return "all records"
    return f"records {i}, {i + n}, {i + 2 * n}, ... of the inputs (index = {i} mod {n})"
