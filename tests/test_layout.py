"""The architecture the folders promise: the read side never imports the build side."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sftprep"
# packing.py is not among them: it is pure, and its modes say how a row reads back (padded, split samples)
BUILD_SIDE = {"api", "encode", "pipeline", "templates", "formats", "readers", "store", "output", "parts",
              "merge", "executors"}


def _sftprep_imports(path: Path) -> set[str]:
    """The sftprep modules a file of sftprep/inspect/ imports: `labels` for sftprep.labels, `inspect.unpack`
    for a sibling."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # a sibling inside sftprep/inspect/
                found.add("inspect." + (node.module or "").split(".")[0])
            elif node.level == 2 or (node.level == 0 and (node.module or "").startswith("sftprep")):
                parts = (node.module or "").split(".")
                names = parts[1:] if node.level == 0 else parts
                found |= {names[0]} if names and names[0] else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sftprep.")}
    return found


def test_the_inspection_package_never_imports_the_build_side():
    files = sorted((PACKAGE / "inspect").glob("*.py"))
    modules = {f.stem for f in files}
    assert len(files) >= 6
    for f in files:
        imported = _sftprep_imports(f)
        assert not imported & BUILD_SIDE, f"{f.name} imports {imported & BUILD_SIDE}"
        known = {p.stem for p in PACKAGE.glob("*.py")} | {f"inspect.{m}" for m in modules}
        assert imported <= known, f"{f.name} imports what does not exist: {imported - known}"


# sftprep's public modules: what a user's script (and so sfttrain, a client like any other) may import
PUBLIC = {"sftprep", "sftprep.api", "sftprep.config", "sftprep.errors", "sftprep.cli", "sftprep.shards",
          "sftprep.manifest", "sftprep.labels", "sftprep.packing", "sftprep.tokenizer"}


def test_sfttrain_uses_sftprep_through_its_public_modules_only():
    trainer = Path(__file__).resolve().parents[1] / "sfttrain"
    files = sorted(trainer.glob("*.py"))
    assert len(files) >= 10
    for f in files:
        used = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("sftprep"):
                used.add(node.module)
            elif isinstance(node, ast.Import):
                used |= {a.name for a in node.names if a.name.startswith("sftprep")}
        assert used <= PUBLIC, f"sfttrain/{f.name} reaches into {sorted(used - PUBLIC)}"
