"""Shared test helpers: real tokenizers from fixtures/, builds into tmp_path, decoding of labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MISTRAL = str(FIXTURES / "tokenizers" / "mistral")
CHATML_TOK = str(FIXTURES / "tokenizers" / "mistral-chatml")
DATA = FIXTURES / "data"

SLOW_FILES = {  # every test in these trains a model, runs a subprocess or renders real chat templates
    "test_atomic.py", "test_chat_templates.py", "test_chat_sweep.py", "test_portable.py", "test_properties.py", "test_sfttrain_bench.py",
    "test_sfttrain_cli.py", "test_sfttrain_distributed.py", "test_sfttrain_gpu.py", "test_sfttrain_guards.py",
    "test_sfttrain_isolation.py", "test_sfttrain_learns.py", "test_sfttrain_logs.py", "test_sfttrain_quantized.py",
    "test_sfttrain_resume.py", "test_sfttrain_template.py", "test_sfttrain_varlen.py", "test_iterative.py",
    "test_fuzz.py", "test_window.py", "test_sfttrain_manifest.py", "test_sfttrain_first_hour.py",
    "test_sfttrain_safety.py", "test_sfttrain_files.py", "test_sfttrain_moe.py",
}
"""Marked `slow` as whole files (other slow tests carry `@pytest.mark.slow`). `pytest -m "not slow"` does
not even import them: their module-level torch / transformers imports cost seconds."""


@pytest.fixture(autouse=True)
def _own_sample_cache(tmp_path_factory, monkeypatch):
    """Each test starts with an empty sample cache of its own (never the user's ~/.cache/sftprep): a build
    twice in one test reads the first's entries, as a user's second build would."""
    monkeypatch.setenv("SFTPREP_CACHE", str(tmp_path_factory.mktemp("sample-cache")))


def pytest_ignore_collect(collection_path, config):
    if collection_path.name in SLOW_FILES and "not slow" in (config.getoption("markexpr") or ""):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def mistral():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MISTRAL)


@pytest.fixture(scope="session")
def mistral_chatml():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(CHATML_TOK)


def sftprep_cli(*args):
    """Run the `sftprep` CLI in-process (click's CliRunner) with `args` as strings."""
    from click.testing import CliRunner

    from sftprep.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def build_records(tmp_path: Path, records: list, tokenizer: str = MISTRAL, name: str = "out",
                  allow_code: bool = False, **settings):
    """Write `records` as JSONL, build with `settings`, return (manifest, table of rows)."""
    from sftprep import build, config_from_dict, load

    data = write_jsonl(tmp_path / f"{name}.jsonl", records)
    cfg = {"inputs": [str(data)], "tokenizer": tokenizer, "out": str(tmp_path / name),
           "max_length": 256, **settings}
    manifest = build(config_from_dict(cfg), allow_code=allow_code)
    return manifest, load(tmp_path / name)


def samples_of(table) -> list[tuple[list[int], list[int], int]]:
    """Unpack rows into samples: (ids, labels, sample_id), ordered by sample_id."""
    out = []
    for row in table.to_pylist():
        pos = 0
        for n, sid in zip(row["seq_lens"], row["sample_ids"]):
            out.append((row["input_ids"][pos:pos + n], row["labels"][pos:pos + n], sid))
            pos += n
    return sorted(out, key=lambda s: s[2])


def trained_runs(tok, labels: list[int]) -> list[str]:
    """Decode each maximal run of trained labels (what the model is taught to write)."""
    runs, cur = [], []
    for lab in labels + [-100]:
        if lab != -100:
            cur.append(lab)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs
