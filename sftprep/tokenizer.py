"""Load a local fast tokenizer and describe its identity (what shards are tied to)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .config import ConfigError


def load_tokenizer(path: str | Path):
    """A `transformers` fast tokenizer from a local folder; never touches the network."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer folder {p} does not exist")
    if p.is_file() and p.name == "tokenizer.json":
        p = p.parent
    if not (p / "tokenizer.json").exists():
        raise ConfigError(f"{p} has no tokenizer.json: sftprep needs a fast (Rust) tokenizer; convert a "
                          "slow one with `AutoTokenizer.from_pretrained(path).save_pretrained(path)`")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # corrupt or unreadable files
        raise ConfigError(f"cannot load the tokenizer in {p}: {type(e).__name__}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"the tokenizer in {p} is not a fast tokenizer (no offsets); sftprep needs one")
    return tok


def tokenizer_identity(tok, path: str | Path) -> dict[str, Any]:
    """Name, sizes, special ids and a hash of the vocabulary and special tokens.

    Two tokenizers with the same hash map every text to the same ids.
    """
    vocab = tok.get_vocab()
    special = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
    h = hashlib.sha256()
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    h.update(json.dumps(special, sort_keys=True).encode())
    return {
        "path": str(path),
        "name": getattr(tok, "name_or_path", str(path)),
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "vocab_hash": h.hexdigest(),
        "bos_id": tok.bos_token_id,
        "eos_id": tok.eos_token_id,
        "pad_id": pad_id(tok),
        "special_tokens": special,
    }


def pad_id(tok) -> int:
    """The id written into padding: the pad token, else EOS, else 0. Padding is never trained,
    so this choice never decides a label."""
    for candidate in (tok.pad_token_id, tok.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def adds_bos(tok) -> bool:
    """Whether the tokenizer's own post-processor puts BOS in front (Llama, Mistral do)."""
    if tok.bos_token_id is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id
