"""Normalize + render + tokenize + label + truncate, one batch of records at a time.

One fast-tokenizer call per batch (`encode_batch` on the rendered strings, with offsets); labels
are computed for the whole batch at once on the concatenated text (see `labels.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import BuildConfig
from .formats import FormatError, as_fields, normalize
from .labels import IGNORE_INDEX, char_codes, span_mask, trained_tokens
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

    def __call__(self, batch: list[tuple[int, Record]]) -> Encoded:
        out = Encoded()
        texts, spans, kept = [], [], []
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
                self._reject(out, sid, rec.source, e.reason, str(e))
                continue
            texts.append(text)
            spans.append(sp)
            kept.append((sid, rec.source))
        if texts:
            self._tokenize(out, texts, spans, kept)
        return out

    def _reject(self, out: Encoded, sid: int, source: str, reason: str, message: str) -> None:
        if self.fail_fast:
            raise RecordError(f"{source}: {message}")
        out.rejects.append({"sample_id": sid, "source": source, "reason": reason, "message": message})

    def _tokenize(self, out: Encoded, texts: list[str], spans: list, kept: list) -> None:
        encs = self.backend.encode_batch(texts, add_special_tokens=False)
        counts = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        tok_base = np.concatenate([[0], np.cumsum(counts)])
        char_base = np.concatenate([[0], np.cumsum([len(t) for t in texts])])
        ids = np.fromiter((i for e in encs for i in e.ids), dtype=np.int32, count=int(tok_base[-1]))
        off = np.fromiter((o for e in encs for pair in e.offsets for o in pair), dtype=np.int64,
                          count=2 * int(tok_base[-1])).reshape(-1, 2)
        shift = np.repeat(char_base[:-1], counts)
        codes = char_codes("".join(texts))
        all_spans = [(a + b, c + b) for sp, b in zip(spans, char_base[:-1].tolist()) for a, c in sp]
        mask = trained_tokens(off[:, 0] + shift, off[:, 1] + shift, codes, span_mask(len(codes), all_spans))
        labels = np.where(mask, ids, IGNORE_INDEX).astype(np.int32)
        for k, (sid, source) in enumerate(kept):
            a, b = tok_base[k], tok_base[k + 1]
            s_ids, s_labels = ids[a:b], labels[a:b]
            if self.bos_id is not None and not texts[k].startswith(self.bos):
                s_ids = np.concatenate([[self.bos_id], s_ids]).astype(np.int32)
                s_labels = np.concatenate([[IGNORE_INDEX], s_labels]).astype(np.int32)
            else:
                s_labels = s_labels.copy()
            if len(s_labels):
                s_labels[0] = IGNORE_INDEX
            self._add(out, sid, source, s_ids, s_labels)

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
