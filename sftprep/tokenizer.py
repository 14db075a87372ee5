"""Load a local fast tokenizer and describe its identity (what shards are tied to).

`load_fast` reads `tokenizer.json` with the `tokenizers` library alone (no transformers, no torch:
a build starts in a fraction of a second); `load_tokenizer` gives the full `transformers`
tokenizer (for chat templates, decoding, saving next to an adapter). Both expose the same
`backend_tokenizer` and special tokens, so `tokenizer_identity` is the same for either.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _folder(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        hub = len(p.parts) == 2 and not str(path).startswith((".", "/", "~"))
        raise FileNotFoundError(f"tokenizer folder {p} does not exist" + (
            f"; it looks like a Hub id, but sftprep reads local folders only (nothing is downloaded): get one "
            f"with `hf download {path} --include 'tokenizer*' --include '*.jinja' --include generation_config.json "
            f"--local-dir tokenizers/{p.name}`" if hub else ""))
    if p.is_file() and p.name == "tokenizer.json":
        p = p.parent
    if not (p / "tokenizer.json").exists():
        raise ConfigError(f"{p} has no tokenizer.json: sftprep needs a fast (Rust) tokenizer; convert a "
                          "slow one with `AutoTokenizer.from_pretrained(path).save_pretrained(path)`")
    return p


class FastTokenizer:
    """The parts of a tokenizer a build needs, read from `tokenizer.json` and
    `tokenizer_config.json` / `special_tokens_map.json` / `chat_template.jinja`."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        p = self.path = _folder(path)
        self.name_or_path = str(path)
        try:
            self.backend_tokenizer = Tokenizer.from_file(str(p / "tokenizer.json"))
        except Exception as e:
            raise ConfigError(f"cannot load {p / 'tokenizer.json'}: {e}") from None
        config = _read_json(p / "tokenizer_config.json")
        special = _read_json(p / "special_tokens_map.json")
        for kind in ("bos", "eos", "pad", "unk"):
            value = config.get(f"{kind}_token", special.get(f"{kind}_token"))
            setattr(self, f"{kind}_token", value.get("content") if isinstance(value, dict) else value)
        template = config.get("chat_template")
        if template is None and (p / "chat_template.jinja").exists():
            template = (p / "chat_template.jinja").read_text(encoding="utf-8")
        self.chat_template = template
        generation = _read_json(p / "generation_config.json").get("eos_token_id")
        self.generation_eos_ids = [generation] if isinstance(generation, int) else list(generation or [])
        self._full = None

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    bos_token_id = property(lambda self: self._id(self.bos_token))
    eos_token_id = property(lambda self: self._id(self.eos_token))
    pad_token_id = property(lambda self: self._id(self.pad_token))
    unk_token_id = property(lambda self: self._id(self.unk_token))

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, *args, **kwargs):
        """Jinja chat templates are rendered by transformers, loaded on first use."""
        if self._full is None:
            self._full = load_tokenizer(self.path)
        return self._full.apply_chat_template(*args, **kwargs)


def chat_variables(tok) -> dict[str, str]:
    """The special tokens a chat template may read (`bos_token`, `eos_token`, ...), as transformers
    passes them."""
    names = ("bos", "eos", "unk", "pad")
    return {f"{k}_token": getattr(tok, f"{k}_token") for k in names if getattr(tok, f"{k}_token", None)}


def added_strings(tok, special_only: bool = False) -> list[str]:
    """The tokenizer's added tokens (only those marked special, with `special_only`: end-of-turn
    markers are among them)."""
    added = tok.backend_tokenizer.get_added_tokens_decoder()
    return [t.content for t in added.values() if t.special or not special_only]


def stop_strings(tok, extra: tuple[str, ...] = ()) -> list[str]:
    """What ends an assistant turn, first = the one appended where a template writes none: the
    tokenizer's EOS, then `generation_config.json`'s eos_token_id list, then `extra`."""
    backend = tok.backend_tokenizer
    ids = getattr(tok, "generation_eos_ids", [])
    out = [tok.eos_token] + [backend.id_to_token(i) for i in ids] + list(extra)
    return [s for s in dict.fromkeys(out) if s]


def install_chat_template(folder: Path, template: str) -> None:
    """Make `template` the chat template of the tokenizer folder `folder` (a build's copy): its
    `chat_template.jinja` and the `chat_template` of its `tokenizer_config.json`, the two places
    transformers and sfttrain read it from."""
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    config = {**_read_json(config_file), "chat_template": template}
    config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def load_fast(path: str | Path) -> FastTokenizer:
    """The tokenizer a build uses: `tokenizers` only, no transformers import."""
    return FastTokenizer(path)


def load_tokenizer(path: str | Path):
    """A `transformers` fast tokenizer from a local folder; never touches the network."""
    p = _folder(path)
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
    backend = tok.backend_tokenizer
    tokens = tokens_by_id(backend)
    if None in tokens or len(set(tokens)) != len(tokens):  # ids without a token, or a token at two ids
        pairs = sorted(backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    else:  # the same pairs, without building get_vocab's dict (0.3 s at 129k tokens)
        pairs = list(zip(tokens, range(len(tokens))))
    special = {f"{k}_token": getattr(tok, f"{k}_token") for k in ("bos", "eos", "pad", "unk")}
    h = hashlib.sha256()
    h.update(json.dumps(pairs, ensure_ascii=False).encode())
    h.update(json.dumps(special, sort_keys=True).encode())
    return {
        "path": str(path),
        "name": getattr(tok, "name_or_path", str(path)),
        "vocab_size": len(tok),
        "vocab_hash": h.hexdigest(),
        "bos_id": tok.bos_token_id,
        "eos_id": tok.eos_token_id,
        "pad_id": pad_id(tok),
        "special_tokens": special,
    }


_last_tokens: tuple[Any, list[str | None]] = (None, [])
_tokens_lock = threading.Lock()


def tokens_by_id(backend) -> list[str | None]:
    """Each id's token (None where an id has none), up to the vocabulary size with added tokens: read once per
    tokenizer object, for the last one asked (a build's identity and its token byte table both need them)."""
    global _last_tokens
    with _tokens_lock:
        if _last_tokens[0] is not backend:
            size = backend.get_vocab_size(with_added_tokens=True)
            _last_tokens = backend, [backend.id_to_token(i) for i in range(size)]
        return _last_tokens[1]


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
    ids = tok.backend_tokenizer.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == tok.bos_token_id
