"""Shared helpers for the sfttrain tests: real shards from small JSONL, a tiny random Llama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "fixtures" / "tokenizers" / "mistral"
CHATML_TOKENIZER = ROOT / "fixtures" / "tokenizers" / "mistral-chatml"
TINY_LLAMA = ROOT / "fixtures" / "models" / "tiny-llama" / "config.json"

SPANISH = [
    ("How do you say cat in Spanish?", " gato"),
    ("How do you say dog in Spanish?", " perro"),
    ("How do you say house in Spanish?", " casa"),
    ("How do you say water in Spanish?", " agua"),
    ("How do you say book in Spanish?", " libro"),
]


def write_jsonl(path: Path, pairs) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for p, c in pairs:
            f.write(json.dumps({"prompt": p, "completion": c}) + "\n")
    return path


def build_shards(tmp: Path, pairs, name: str = "shards", tokenizer: Path = TOKENIZER, **overrides: Any) -> Path:
    """`sftprep build` of prompt/completion `pairs` into tmp/name; returns the folder."""
    from sftprep import build, config_from_dict

    data = write_jsonl(tmp / f"{name}.jsonl", pairs)
    cfg = {"inputs": [str(data)], "tokenizer": str(tokenizer), "max_length": 64, "packing": "bfd",
           "out": str(tmp / name), "overwrite": True, **overrides}
    build(config_from_dict(cfg))
    return tmp / name


def make_tiny_model(folder: Path, tokenizer: Path | None = TOKENIZER, seed: int = 0, **config: Any) -> Path:
    """A random-init Llama from the fixture config (optionally changed), saved with a tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads(TINY_LLAMA.read_text())
    cfg.update(config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(folder)
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copy(f, folder / f.name)
    return folder


def train_config(shards: Path, model: Path, out: Path, **flat: Any):
    """A small, fast TrainConfig; `flat` uses the same keys as the CLI flags (lora_r, max_steps, ...)."""
    from sfttrain import config_from_dict

    base = {"shards": str(shards), "model": str(model), "output_dir": str(out), "max_steps": 4,
            "per_device_batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 1000,
            "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "seed": 0}
    return config_from_dict({**base, **flat})


@pytest.fixture
def one_thread():
    """Train on one CPU thread: on a shared 2-core machine, two OpenMP threads fighting other
    processes make tiny steps many times slower (and the result is the same)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Tiny Llama (32002 vocab, hidden 64, 2 layers) with the mistral tokenizer in its folder."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def spanish_shards(tmp_path_factory) -> Path:
    return build_shards(tmp_path_factory.mktemp("spanish"), SPANISH)
