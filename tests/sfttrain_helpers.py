"""Shared helpers for the sfttrain tests: real shards from small JSONL, a tiny random Llama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import write_jsonl

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


def pair_records(pairs) -> list[dict[str, str]]:
    """`(prompt, completion)` pairs as prompt/completion records (for `conftest.write_jsonl`)."""
    return [{"prompt": p, "completion": c} for p, c in pairs]


def build_shards(tmp: Path, pairs, name: str = "shards", tokenizer: Path = TOKENIZER, **overrides: Any) -> Path:
    """`sftprep build` of prompt/completion `pairs` into tmp/name; returns the folder."""
    from sftprep import build, config_from_dict

    data = write_jsonl(tmp / f"{name}.jsonl", pair_records(pairs))
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


# -- one tiny model per architecture family ----------------------------------------------------------

WINDOW = 8
"""Sliding window of the tiny windowed models: shorter than the test samples, so it matters."""
CHUNK = 16
"""Attention chunk of the tiny Llama-4: shorter than the test samples, which start off its multiples."""
_SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False)
DROP = object()
"""A `FAMILIES` value that removes the key from the shared shape (Falcon computes its own head_dim)."""
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                  layer_types=["full_attention", "sliding_attention"]),
    "qwen3": {},
    "gemma2": dict(sliding_window=WINDOW, query_pre_attn_scalar=16),  # soft-capping on, no sdpa path
    "gemma3_text": dict(sliding_window=WINDOW, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(sliding_window=WINDOW),
    "cohere": {},
    "olmo2": {},
    "granite": {},
    "stablelm": {},
    "starcoder2": dict(sliding_window=WINDOW),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128,
                        attention_chunk_size=CHUNK, layer_types=["chunked_attention", "full_attention"]),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention"]),  # attention sinks, no sdpa path
    "gpt_neox": {},
    "phi": {},
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "falcon": dict(new_decoder_architecture=True, head_dim=DROP),
    "falcon-alibi": dict(model_type="falcon", alibi=True, head_dim=DROP),
    "bloom": {},
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64, dropout=0.0),
}
"""Keyword arguments of `AutoConfig.for_model(family, ...)` on top of a small shared shape (GQA 4:2);
`model_type` when the key is not one. Dropout off: packed and alone runs must be deterministic."""


def family_config(family: str, **overrides: Any):
    from transformers import AutoConfig

    kwargs = {**_SMALL, **FAMILIES[family], **overrides}
    model_type = kwargs.pop("model_type", family)
    return AutoConfig.for_model(model_type, **{k: v for k, v in kwargs.items() if v is not DROP})


def family_model(family: str, attn_implementation: str, seed: int = 0, **overrides: Any):
    """A random-init tiny model of `family` (see FAMILIES), in fp32, in train mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, **overrides),
                                             attn_implementation=attn_implementation)
    return model.train()


def save_family_model(folder: Path, family: str, tokenizer: Path = TOKENIZER, **overrides: Any) -> Path:
    """`family_model` with the fixture tokenizer's vocabulary, saved with the tokenizer (for `train`)."""
    model = family_model(family, "eager", vocab_size=32000, **overrides)
    model.save_pretrained(folder)
    for f in tokenizer.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


# -- packed rows vs their samples alone ---------------------------------------------------------

IGNORE_INDEX = -100


def packed_row(lengths=(20, 13, 27), vocab=256, seed=0):
    """A row of random samples (each longer than WINDOW by default), 60% of tokens trained."""
    gen = np.random.default_rng(seed)
    n = sum(lengths)
    ids = gen.integers(3, vocab, size=n).astype(np.int32)
    labels = np.where(gen.random(n) < 0.6, ids, IGNORE_INDEX).astype(np.int32)
    return {"input_ids": ids, "labels": labels, "seq_lens": np.array(lengths, np.int32)}


def loss_and_grads(model, **inputs):
    """Summed loss over trained tokens and every parameter's gradient."""
    model.zero_grad()
    loss = model(**inputs, num_items_in_batch=1, use_cache=False).loss  # num_items_in_batch=1: summed loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads_alone(model, row, batch_labels):
    """Loss and gradients summed over the row's samples, each run by itself (the model's own path)."""
    import torch

    total, grads, start = 0.0, {}, 0
    for n in row["seq_lens"].tolist():
        ids = torch.tensor(row["input_ids"][start:start + n], dtype=torch.long)[None]
        loss, g = loss_and_grads(model, input_ids=ids, labels=batch_labels[:, start:start + n])
        total += loss
        for k, v in g.items():
            grads[k] = grads.get(k, 0) + v
        start += n
    return total, grads


def worst_relative(a: dict, b: dict) -> float:
    """The largest relative difference (norm) between two dicts of gradients. A gradient that is zero in
    exact arithmetic (a key bias: softmax ignores what it adds to every score) is float noise, compared
    against 1e-4 of the largest gradient instead of itself."""
    assert a.keys() == b.keys() and a
    floor = 1e-4 * max(float(v.norm()) for v in b.values())
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(max(floor, 1e-12))) for k in a)
