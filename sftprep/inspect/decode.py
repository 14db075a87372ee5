"""Token ids back to text, with the build's own tokenizer.

    ids     [1, 1186, 28747, 330, 28747, 28705, 28781, 2]
    labels  [-100, -100, -100, 330, 28747, 28705, 28781, 2]
    decode_segments -> [("<s> Q:", False), (" A: 4</s>", True)]    (runs of trained / untrained text)
    token_strings   -> ["<s>", "▁Q", ":", "▁A", ...]               (vocabulary entries, for --tokens)
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..tokenize.labels import IGNORE_INDEX
from ..write.manifest import tokenizer_dir


def load_build_tokenizer(folder: str | Path, manifest: dict[str, Any], override: str | Path | None = None):
    """The tokenizer a build was made with (its copy in the build folder, or `override`).

    Raises:
        FileNotFoundError: the build has no tokenizer copy (nor a reachable recorded path) and no
            override was given.
        ValueError: `override` is not the tokenizer the shards were built with.
    """
    from ..tokenizer import tokenizer_identity

    path = override or tokenizer_dir(folder, manifest)
    if path is None:
        raise FileNotFoundError(f"the build in {folder} has no tokenizer/ folder and its recorded tokenizer "
                                f"{manifest['tokenizer'].get('path')} is not found from {Path.cwd()}; pass "
                                "--tokenizer PATH (or rebuild with this sftprep, which copies it into the build)")
    tok = _load_tokenizer(path)
    want = manifest["tokenizer"].get("vocab_hash")
    if override is not None and want and tokenizer_identity(tok, path)["vocab_hash"] != want:
        raise InputError(f"--tokenizer {path} is not the tokenizer these shards were built with "
                         f"({manifest['tokenizer'].get('name')}, vocab hash {want[:12]}); "
                         "decoding with it would show the wrong text")
    return tok


def _load_tokenizer(path: str | Path):
    """`load_fast` (the `tokenizers` library alone: decoding needs no transformers), remembered
    while the folder's tokenizer.json is unchanged (`samples()` then `diff` loads it once)."""
    from ..tokenizer import load_fast

    p = Path(path).resolve()
    f = p if p.is_file() else p / "tokenizer.json"
    if not f.exists():
        return load_fast(path)  # its error message says what is missing
    stat = f.stat()
    return _cached_tokenizer(str(p), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str, mtime_ns: int, size: int):
    from ..tokenizer import load_fast

    return load_fast(path)


def token_strings(tok, ids) -> list[str]:
    """The vocabulary entry of each id (`"▁Paris"`, `"<0x0A>"`, `"<|im_end|>"`)."""
    backend = tok.backend_tokenizer
    return [backend.id_to_token(int(i)) or f"<id {int(i)}?>" for i in ids]


_CONTEXT = 8  # tokens decoded before a segment so it keeps its leading space ("▁Paris" -> " Paris")


def decode_segments(tok, ids: np.ndarray, labels: np.ndarray) -> list[tuple[str, bool]]:
    """Decode one sample as runs of `(text, trained)`; concatenated they give the sample's text.

    Special tokens are kept literally. Each run is decoded with a few tokens of left context and
    the context's text cut off, because SentencePiece-style decoders drop the leading space of a
    sequence that starts mid-text.
    """
    ids = np.asarray(ids).tolist()
    trained = np.asarray(labels) != IGNORE_INDEX
    if not ids:
        return []
    cuts = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
    bounds = [0, *cuts.tolist(), len(ids)]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out.append((_decode_in_context(tok, ids, a, b), bool(trained[a])))
    return out


def _decode_in_context(tok, ids: list[int], a: int, b: int) -> str:
    c = max(0, a - _CONTEXT)
    if c == a:
        return tok.decode(ids[a:b], skip_special_tokens=False)
    before = tok.decode(ids[c:a], skip_special_tokens=False)
    both = tok.decode(ids[c:b], skip_special_tokens=False)
    if both.startswith(before) and "\ufffd" not in before[-1:]:
        return both[len(before):]
    return tok.decode(ids[a:b], skip_special_tokens=False)


TRAINED_SEPARATOR = "\n"  # between the trained runs of `samples()`'s trained_text
