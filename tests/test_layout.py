"""The architecture the folders promise: `ls sftprep/` names the build's stages in the order data flows,
no stage reaches into a later one, the read side never imports the build side, and sfttrain is a client
of sftprep's public modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sftprep"
STAGES = ("read", "render", "tokenize", "mix", "pack", "write", "scale")
"""The build's folders, in the order data flows: read -> render -> tokenize+label -> mix -> pack -> write; scale
runs them in parallel and merges parts."""
SURFACE = {"__init__", "api", "cli", "config", "errors", "memory", "tokenizer"}
"""Top-level modules: the public surface, the settings and the tokenizer loader that every stage uses."""
BUILD_SIDE = {"api", "memory", "read", "render", "tokenize.encode", "tokenize.boundaries", "tokenize.window",
              "write.output", "write.store", "scale"}
"""What the read side (`sftprep/inspect/`) must not import: it may use the shard contract (`write.shards`,
`write.manifest`, `tokenize.labels`, `pack.packing`: how rows read back), `tokenizer` and `config`."""
PUBLIC = {"sftprep", "sftprep.api", "sftprep.config", "sftprep.errors", "sftprep.cli", "sftprep.write.shards",
          "sftprep.write.manifest", "sftprep.tokenize.labels", "sftprep.pack.packing", "sftprep.tokenizer"}
"""sftprep's public modules: what a user's script (and so sfttrain, a client like any other) may import."""


def module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def sftprep_imports(path: Path) -> set[str]:
    """The sftprep modules (dotted, relative to sftprep) that `path` imports, relative imports resolved."""
    here = module_of(path).split(".") if path.is_relative_to(PACKAGE) else []
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level and not path.is_relative_to(PACKAGE):
                continue  # a relative import of another package
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = base + ((node.module or "").split(".") if node.module else [])
                found |= ({".".join(target)} if node.module else {".".join(target + [a.name]) for a in node.names})
            elif (node.module or "").startswith("sftprep"):
                found.add(node.module.removeprefix("sftprep").lstrip("."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("sftprep.") for a in node.names if a.name.startswith("sftprep.")}
    return {f for f in found if f}


def test_the_folders_name_the_stages_in_the_order_data_flows():
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__"))
    assert folders == sorted([*STAGES, "inspect"])
    modules = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert set(modules) <= SURFACE, f"top-level modules that belong in a stage folder: {set(modules) - SURFACE}"
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text(encoding="utf-8")))
        assert doc and doc.lower().startswith(stage[:4]), f"sftprep/{stage}/__init__.py says what the stage does"


def test_no_stage_reaches_into_a_later_one():
    for stage_index, stage in enumerate(STAGES):
        for f in sorted((PACKAGE / stage).glob("*.py")):
            for imported in sftprep_imports(f):
                top = imported.split(".")[0]
                if not ((PACKAGE / top).is_dir() or (PACKAGE / f"{top}.py").is_file()):
                    continue  # a name of the package itself (__version__)
                if top in STAGES:
                    assert STAGES.index(top) <= stage_index, f"{stage}/{f.name} imports the later stage {imported}"
                else:
                    # scale runs whole builds (executors: parts as Ray tasks) and reads finished parts
                    # back (merge): it may use the api and the read side
                    assert top in {"config", "errors", "tokenizer", *(["api", "inspect"] if stage == "scale" else [])}, \
                        f"{stage}/{f.name} imports {imported}"


def test_the_inspection_package_never_imports_the_build_side():
    files = sorted((PACKAGE / "inspect").glob("*.py"))
    assert len(files) >= 6
    for f in files:
        for imported in sftprep_imports(f):
            assert not any(imported == b or imported.startswith(b + ".") for b in BUILD_SIDE), \
                f"inspect/{f.name} imports {imported}"


def test_sfttrain_uses_sftprep_through_its_public_modules_only():
    files = sorted((ROOT / "sfttrain").glob("*.py"))
    assert len(files) >= 10
    for f in files:
        used = {("sftprep." + m) if m else "sftprep" for m in sftprep_imports(f)}
        assert used <= PUBLIC, f"sfttrain/{f.name} reaches into {sorted(used - PUBLIC)}"
