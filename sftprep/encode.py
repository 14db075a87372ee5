"""Normalize + render + tokenize + label + truncate, one batch of records at a time.

One fast-tokenizer call per batch (`encode_batch` on the rendered strings, with offsets); labels
are computed for the whole batch at once on the concatenated text (see `labels.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import BuildConfig, ConfigError
from .formats import FormatError, as_fields, normalize
from .labels import IGNORE_INDEX, token_ranges
from .readers import Record
from .templates import Renderer
from .tokenizer import adds_bos


class RecordError(ValueError):
    """A bad record under `--on-error fail`: the message starts with file:line."""


@dataclass(slots=True)
class Encoded:
    """The samples of one batch that survived, and the records that did not."""

    ids: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    sample_ids: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class Rendered:
    """A batch between render and tokenize; `encoded` already holds the batch's rejects."""

    encoded: Encoded
    texts: list[str]
    spans: list[list[tuple[int, int]]]
    kept: list[tuple[int, str]]


class Encoder:
    """Callable on a batch of `(sample_id, Record)`; holds the tokenizer and renderer."""

    def __init__(self, cfg: BuildConfig, tok) -> None:
        self.cfg = cfg
        self.backend = tok.backend_tokenizer
        self.renderer = Renderer(cfg.template, cfg.tokenize.train_on, tok.eos_token, tok)
        self.bos_id = tok.bos_token_id if adds_bos(tok) else None
        self.bos = tok.bos_token
        self.max_length = cfg.tokenize.max_length
        self.truncation = None if cfg.pack.mode == "wrapped" else cfg.tokenize.truncation
        self.fail_fast = cfg.read.on_error == "fail"
        # format strings and callables read the record's fields themselves: no format detection
        self.raw_fields = cfg.template.prompt is not None or self.renderer.fn is not None
        self._check_overhead()

    def _check_overhead(self) -> None:
        """Refuse a max_length that the template's own tokens (plus one trained token) already fill."""
        text = self.renderer.overhead_text()
        if text is None:
            return
        n = len(self.backend.encode(text, add_special_tokens=False).ids) + (self.bos_id is not None)
        if n + 1 >= self.max_length:
            raise ConfigError(f"max_length={self.max_length} leaves no room for text: template "
                              f"{self.cfg.template.name!r} alone takes {n} tokens per turn; raise --max-length")

    def __call__(self, batch: list[tuple[int, Record]]) -> Encoded:
        return self.tokenize(self.render(batch))

    def render(self, batch: list[tuple[int, Record]]) -> Rendered:
        """Normalize and render a batch (pure Python: the part that holds the GIL)."""
        out = Rendered(Encoded(), [], [], [])
        for sid, rec in batch:
            try:
                if rec.error is not None:
                    raise FormatError(rec.error, "unreadable")
                if self.raw_fields:
                    conv = as_fields(rec.fields, self.cfg.read.fields)
                else:
                    conv = normalize(rec.fields, self.cfg.read.format, self.cfg.read.fields)
                text, sp = self.renderer.render(conv)
            except FormatError as e:
                self._reject(out.encoded, sid, rec.source, e.reason, str(e))
                continue
            out.texts.append(text)
            out.spans.append(sp)
            out.kept.append((sid, rec.source))
        return out

    def tokenize(self, rendered: Rendered) -> Encoded:
        """Tokenize a rendered batch (one `encode_batch` call, which releases the GIL) and label it."""
        if rendered.texts:
            self._tokenize(rendered.encoded, rendered.texts, rendered.spans, rendered.kept)
        return rendered.encoded

    def _reject(self, out: Encoded, sid: int, source: str, reason: str, message: str) -> None:
        if self.fail_fast:
            raise RecordError(f"{source}: {message}")
        out.rejects.append({"sample_id": sid, "source": source, "reason": reason, "message": message})

    def _tokenize(self, out: Encoded, texts: list[str], spans: list, kept: list) -> None:
        encs = self.backend.encode_batch(texts, add_special_tokens=False)
        bos = self.bos_id is not None
        for enc, text, sp, (sid, source) in zip(encs, texts, spans, kept):
            tok_ids = enc.ids
            head = 1 if bos and not text.startswith(self.bos) else 0
            ids = np.empty(len(tok_ids) + head, dtype=np.int32)
            if head:
                ids[0] = self.bos_id
            ids[head:] = tok_ids
            labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
            for i, j in token_ranges(enc, text, sp, len(tok_ids)):
                labels[i + head:j + head] = ids[i + head:j + head]
            if len(labels):
                labels[0] = IGNORE_INDEX
            self._add(out, sid, source, ids, labels)

    def _add(self, out: Encoded, sid: int, source: str, ids: np.ndarray, labels: np.ndarray) -> None:
        truncated = False
        if self.truncation and len(ids) > self.max_length:
            n = self.max_length
            if self.truncation == "drop":
                return self._reject(out, sid, source, "too_long",
                                    f"{len(ids)} tokens > max_length {n} (--truncation drop)")
            truncated = True
            if self.truncation == "keep_start":
                ids, labels = ids[:n], labels[:n]
            else:  # keep_end, keeping BOS in front when there is one
                head = 1 if self.bos_id is not None else 0
                ids = np.concatenate([ids[:head], ids[len(ids) - (n - head):]])
                labels = np.concatenate([labels[:head], labels[len(labels) - (n - head):]])
                labels[0] = IGNORE_INDEX
        if not (labels != IGNORE_INDEX).any():
            reason = "no_trained_tokens_after_truncation" if truncated else "no_trained_tokens"
            return self._reject(out, sid, source, reason,
                                "no token left to train on" + (" after truncation" if truncated else ""))
        out.ids.append(ids)
        out.labels.append(labels)
        out.sample_ids.append(sid)
        out.sources.append(source)
        out.truncated.append(truncated)
