"""File safety for the folders sftprep writes, below every stage (it imports nothing of the build).

    names_path(p)   a failed write re-raised as an OSError naming `p` (the OS says "No space left" but not where)
    fsync_dir(d)    a rename made durable
    claim(p)        records `p`'s name in its folder's ledger, `.ledger`, *before* `p` is created
    ledger(d)       the names a build ever claimed in `d`
    overlaps(a, b)  whether one path is, contains or lies inside the other

The ledger is what lets `--overwrite` be safe: a build removes only files that the previous build's
manifest or this ledger proves sftprep wrote. A name is claimed before its file exists, so a build killed
at any moment leaves nothing behind that the next build cannot prove it wrote, and nothing of the user's
(a file or a folder of the same name made by hand) is ever in the ledger.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LEDGER = ".ledger"


@contextmanager
def names_path(path: Path) -> Iterator[None]:
    """Re-raise a failed write (disk full, file-size limit, I/O error) as an `OSError` naming `path`:
    the OS reports `No space left on device` without saying where, and `shutil` names the source."""
    try:
        yield
    except OSError as e:
        if e.errno is None or isinstance(e, (FileNotFoundError, PermissionError, NotADirectoryError)):
            raise
        raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def claim(*paths: Path) -> None:
    """Record the names of `paths` (files or folders directly inside one folder) in that folder's
    ledger, durably, before they are created."""
    if not paths:
        return
    folder = paths[0].parent
    with names_path(folder / LEDGER), open(folder / LEDGER, "a", encoding="utf-8") as f:
        f.write("".join(p.name + "\n" for p in paths))
        f.flush()
        os.fsync(f.fileno())


def ledger(folder: Path) -> set[str]:
    """The names claimed in `folder` (empty if it has no ledger), plain names only (`plain_name`)."""
    try:
        lines = (folder / LEDGER).read_text(encoding="utf-8", errors="replace").splitlines()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return set()
    return {n for n in lines if plain_name(n)}


def plain_name(name: object) -> bool:
    """Whether `name` is a file name directly inside a folder: an edited ledger or manifest line with a path
    separator or `..` proves nothing about what sftprep wrote there."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def rewrite_ledger(folder: Path, names: set[str]) -> None:
    """Replace the ledger by `names` (those still in the folder), atomically."""
    tmp = folder / (LEDGER + ".tmp")
    with names_path(folder / LEDGER), open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(n + "\n" for n in sorted(names)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / LEDGER)


def overlaps(a: Path, b: Path) -> bool:
    """Whether `a` and `b` (resolved, links followed) are the same path or one lies inside the other."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents
