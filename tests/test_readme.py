"""A newcomer runs the README: every bash and python block, in order, in an empty folder holding only
what the README says is there (the repository's `fixtures/`, and the placeholder files the tour names:
`data.jsonl`, `path/to/tokenizer`, `tok/`, `config.yaml`). A block that needs what a test cannot have (an
install, a Ray or SLURM cluster, GPUs on two nodes) is skipped by name below; nothing else is."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sfttrain_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.slow  # subprocesses that import torch and train a few steps

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)

SKIPPED = {  # the first line of a block -> why it is not run here
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e '.[dev]'":
        "installs the package and runs this whole suite",
    "from sfttrain import IterativeTrainer":
        "`prompts` and `is_correct` are the reader's; examples/iterative_loop.py is the runnable loop",
    "sftprep build build.yaml --part 0/4 --out parts/0      # ... --part 1/4, 2/4, 3/4: anywhere, any order":
        "merges parts 1-3, which the comment only names (test_parts.py builds and merges parts)",
    "ray start --head --port 6379                                   # on the head node": "needs a Ray cluster",
    "cat > parts.sbatch <<'SH'": "needs SLURM",
    "# on each of 2 nodes with 8 GPUs (NODE_RANK=0 on the first, 1 on the second)": "needs two GPU nodes",
}
SHORTENED = {"--max-steps 30": "--max-steps 2"}  # the demo's 30 steps take 20 s here; 2 run the same path


def blocks() -> list[tuple[str, str]]:
    return BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def newcomer_folder(tmp: Path) -> Path:
    """An empty folder with the repository's fixtures and the files the README's tour takes as given."""
    (tmp / "fixtures").symlink_to(ROOT / "fixtures")
    shutil.copy(ROOT / "fixtures" / "data" / "chat_multiturn.jsonl", tmp / "data.jsonl")
    (tmp / "path" / "to").mkdir(parents=True)
    (tmp / "path" / "to" / "tokenizer").symlink_to(ROOT / "fixtures" / "tokenizers" / "mistral-chatml")
    (tmp / "tok").symlink_to(ROOT / "fixtures" / "tokenizers" / "mistral-chatml")
    (tmp / "config.yaml").write_text("inputs: [data.jsonl]\ntokenizer: tok\ntemplate: chatml\nout: shards-yaml/\n")
    return tmp


def test_the_skipped_blocks_are_exactly_those_named():
    firsts = [code.splitlines()[0] for _, code in blocks()]
    assert sorted(f for f in firsts if f in SKIPPED) == sorted(SKIPPED)  # each named block still exists
    assert all(sum(old in code for _, code in blocks()) == 1 for old in SHORTENED)


def test_every_readme_block_runs_as_written(tmp_path, monkeypatch, one_thread):  # noqa: F811
    """bash blocks in a shell; python blocks in this process (each with fresh globals), which saves
    importing torch for each."""
    import datasets

    folder = newcomer_folder(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / ".cache")}
    monkeypatch.chdir(folder)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / ".cache"))
    ran = 0
    for lang, code in blocks():
        if code.splitlines()[0] in SKIPPED:
            continue
        for old, new in SHORTENED.items():
            code = code.replace(old, new)
        if lang == "python":
            exec(compile(code, "README.md python block", "exec"), {"__name__": "__main__"})
        else:
            p = subprocess.run(["bash", "-euo", "pipefail", "-c", code], env=env, capture_output=True, text=True,
                               timeout=600)
            assert p.returncode == 0, f"README block failed:\n{code}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
        ran += 1
    assert ran == len(blocks()) - len(SKIPPED)
    assert (folder / "runs" / "demo-merged" / "config.json").is_file()  # the demo ran to its last line
    assert (folder / "runs" / "trainer").is_dir() and (folder / "runs" / "tiny-chatml" / "tokenizer.json").is_file()
