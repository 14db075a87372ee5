"""The manifest: written last and atomically; a build is complete iff it exists."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any
from ..errors import InputError
from .files import claim, fsync_dir, names_path

VERSION = 1
MANIFEST = "manifest.json"


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest.json` via a temporary file, fsync and rename (atomic on POSIX)."""
    tmp = out / (MANIFEST + ".tmp")
    claim(out / MANIFEST, tmp)
    try:
        with names_path(out / MANIFEST), open(tmp, "w", encoding="utf-8") as f:
            json.dump({"version": VERSION, **manifest}, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # never a partial manifest.json.tmp left behind
        raise
    os.replace(tmp, out / MANIFEST)
    fsync_dir(out)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check a build's manifest; `path` is the build folder or the manifest itself."""
    p = Path(path)
    if p.is_file() and p.name != MANIFEST:
        kind = "one shard of a build" if p.suffix == ".arrow" else "a file"
        raise InputError(f"{p} is {kind}, not a build folder: pass the folder `sftprep build --out` wrote"
                         + (f" ({p.parent})" if p.suffix == ".arrow" else
                            f"; to build one from it: sftprep build -i {p} -t TOKENIZER -o shards/"))
    m = p / MANIFEST if p.is_dir() else p
    if not m.exists():
        if p.is_dir() and any(p.glob("shard-*.arrow")):
            raise FileNotFoundError(f"{p} has shards but no {MANIFEST}: the build did not finish; "
                                    "run `sftprep build` again")
        raise FileNotFoundError(f"{p} is not a sftprep build (no {MANIFEST})")
    try:
        data = json.loads(m.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{m} is not valid JSON ({e}); rebuild with `sftprep build --overwrite`") from None
    version = data.get("version") if isinstance(data, dict) else None
    if version != VERSION:
        raise InputError(f"{m} has manifest version {version!r}; this sftprep reads version {VERSION} "
                         "(upgrade sftprep or rebuild the shards)")
    return data


def tokenizer_dir(folder: str | Path, manifest: dict[str, Any]) -> Path | None:
    """The build's tokenizer folder: `OUT/tokenizer/` (the manifest's `tokenizer.path`, relative to the
    manifest), wherever the build folder now lies; None if it has none.

    Builds made before the tokenizer was copied recorded the path as given to `sftprep build`; that
    path is tried as it stands (it works from the folder the build was made in).
    """
    given = (manifest.get("tokenizer") or {}).get("path")
    if not given:
        return None
    for p in (Path(folder) / given, Path(given)):
        if (p / "tokenizer.json").is_file():
            return p
    return None


def shard_path(folder: str | Path, name: Any) -> Path:
    """The file a manifest's shard entry names, confined to the build folder (`member`)."""
    return member(folder, name, "shard file")


def member(folder: str | Path, name: Any, what: str) -> Path:
    """A file the manifest names (`what`: "shard file", "samples_file"...), confined to the build folder:
    a manifest is input like any other, and a hand-edited `"../../etc/passwd"`, an absolute path, a
    symbolic link leading out of the folder, or a FIFO or device in place of a file (reading it would
    hang or never end) is refused, never opened. The path may not exist (callers say so).

    Raises:
        InputError: the name is not a relative path to a regular file inside `folder`.
    """
    folder = Path(folder)
    where = f"{folder / MANIFEST}: {what} {name!r}"
    if not isinstance(name, str) or not name:
        raise InputError(f"{where} is not a file name")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise InputError(f"{where} points outside the build folder; the build's files are inside it: rebuild "
                         "with `sftprep build --overwrite`")
    target = folder / p
    if not target.resolve().is_relative_to(folder.resolve()):
        raise InputError(f"{where} is a link that leads outside the build folder ({target.resolve()}); "
                         "copy the file into the folder instead")
    if target.exists() and not stat.S_ISREG(target.stat().st_mode):
        raise InputError(f"{where} is not a regular file (a FIFO, device or folder): sftprep does not open it; "
                         "rebuild with `sftprep build --overwrite`, or copy the file again")
    return target
