"""Normalize + render + tokenize + label + truncate, one batch of records at a time.

    (sample_id, Record)  --render-->  Rendered (texts, trained character spans)    formats, templates
                         --encode-->  tokenizers.Encoding per text (Rust, no GIL)   tokenizer
                         --label--->  Encoded (flat ids/labels + lengths), rejects  labels, boundaries
                                      truncated to max_length, untrained samples dropped

Three steps, so a build can run them as a pipeline: `render` (pure Python), `encode` (one
fast-tokenizer `encode_batch` call, which releases the GIL: ids only for BPE tokenizers whose
token byte lengths locate the tokens, see `boundaries`) and `label` (a few look-ups per trained
span, then numpy over the whole batch). A batch's samples travel as flat arrays plus lengths.
The `Encoder` takes its own config sections (read, template, tokenize); whether to truncate at all
is the caller's choice (`wrapped` packing cuts samples itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from ..config import ReadConfig, TemplateConfig, TokenizeConfig
from ..errors import ConfigError, RecordError
from ..read import Record
from ..read.formats import Conversation, FormatError, normalize
from ..render import Renderer
from ..tokenizer import adds_bos
from .boundaries import ByteBoundaries
from .labels import IGNORE_INDEX, mask_sample_starts, token_ranges
from .window import Window

# Words a BPE model remembers, per tokenizer thread. tokenizers' default, 10,000, fills within the
# first ~1,000 chats and then stops caching: words met after that are merged again at every use.
# 100,000: 8.5 -> 7.4 tokenizer CPU s on 10k multi-turn chats (bench/prep.py --case chat), ~30 MB
# more per thread. (tokenizers keeps these caches in its worker threads after the tokenizer is gone.)
# Only where the pre-tokenizer cuts text into words: one that does not (Mistral's Metaspace, split: false)
# hands BPE each text between special tokens whole, so the cache holds whole texts: even at tokenizers'
# default (10,000) a build's memory grew ~250 bytes a record without bound (tokenizers 0.23, Mistral, 600k
# short records: 71 -> 175 MiB; flat at 52 MiB without the cache, and 74 s of CPU, not 86), for hits on
# repeated texts only. Those run without a cache.
BPE_CACHE_WORDS = 100_000

CHOSEN = ("contaminated", "duplicate")
"""Reject reasons that are the recipe's choices, not faults of a record: never an error under
`--on-error fail`, and not counted against `max_reject_ratio`."""


def _splits_words(backend) -> bool:
    """Whether the tokenizer's pre-tokenizer cuts a text into words (else BPE's "words" are whole texts)."""
    pre = backend.pre_tokenizer
    return pre is not None and len(pre.pre_tokenize_str("one two three")) > 1


@dataclass(slots=True)
class Encoded:
    """The samples of one batch that survived (laid end to end in `ids`/`labels`, cut by
    `lengths`), and the records that did not."""

    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    num_trained: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sample_ids: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def by_sample(self) -> dict[int, Encoded]:
        """This batch cut into one `Encoded` per record (its sample, or its reject), by sample id."""
        out: dict[int, Encoded] = {r["sample_id"]: Encoded(rejects=[r]) for r in self.rejects}
        ends = np.cumsum(self.lengths)
        for k, (sid, src, cut) in enumerate(zip(self.sample_ids, self.sources, self.truncated)):
            a, b = int(ends[k] - self.lengths[k]), int(ends[k])
            out[sid] = Encoded(self.ids[a:b], self.labels[a:b], self.lengths[k:k + 1], self.num_trained[k:k + 1],
                               [sid], [src], [cut])
        return out

    def sample(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """ids and labels of the k-th kept sample."""
        a = int(self.lengths[:k].sum())
        b = a + int(self.lengths[k])
        return self.ids[a:b], self.labels[a:b]


@dataclass(slots=True)
class Rendered:
    """A batch between render and tokenize; `encoded` already holds the batch's rejects."""

    encoded: Encoded
    texts: list[str]
    spans: list[list[tuple[int, int]]]
    kept: list[tuple[int, str]]
    heads: list[int]  # 1 where the tokenizer's BOS goes in front of the text
    convs: list[Conversation]


class Encoder:
    """Callable on a batch of `(sample_id, Record)`; holds the tokenizer and renderer.

    Args:
        read: how records become conversations (format, field names) and what a bad one does.
        template: how conversations become text and trained spans.
        tokenize: max_length, truncation and which tokens are trained.
        tok: the build's tokenizer (`tokenizer.load_fast`).
        truncate: False keeps samples longer than max_length whole (`wrapped` packing cuts them).
        allow_code: let a `module:function` template import and run Python code.
    """

    def __init__(self, read: ReadConfig, template: TemplateConfig, tokenize: TokenizeConfig, tok, *,
                 truncate: bool = True, allow_code: bool = False) -> None:
        self.read, self.template_name = read, template.name
        self.backend = tok.backend_tokenizer
        if hasattr(self.backend.model, "_resize_cache"):  # BPE
            self.backend.model._resize_cache(BPE_CACHE_WORDS if _splits_words(self.backend) else 0)
        self.boundaries = ByteBoundaries.of(self.backend)
        self.renderer = Renderer(template, tokenize.train_on, tok.eos_token, tok, allow_code)
        self.bos_id = tok.bos_token_id if adds_bos(tok) else None
        self.bos = tok.bos_token
        self.max_length = tokenize.max_length
        self.truncation = tokenize.truncation if truncate else None
        self.by_turns = tokenize.truncation_unit == "turns" and self.truncation in ("keep_start", "keep_end")
        self.fail_fast = read.on_error == "fail"
        # a record far beyond max_length is cut to a proven window first: the tokens kept (keep_start /
        # keep_end), or the first max_length + 1 that prove it too long (drop; a turn-cut chat, whose fitting
        # turns are then found by re-rendering): a 200 MB record costs a window's tokens, never its own
        self.window = Window(lambda text: self.backend.encode(text, add_special_tokens=False), self.max_length,
                             "keep_start" if self.truncation == "drop" else self.truncation, self.bos,
                             self.bos_id) if self.truncation else None
        # format strings and callables read the record's fields themselves: no format detection
        self.format = "fields" if self.renderer.reads_fields else read.format
        self._check_overhead()

    def _check_overhead(self) -> None:
        """Refuse a max_length that the template's own tokens (plus one trained token) already fill."""
        text = self.renderer.overhead_text()
        if text is None:
            return
        n = len(self.backend.encode(text, add_special_tokens=False).ids) + (self.bos_id is not None)
        if n + 1 >= self.max_length:
            raise ConfigError(f"max_length={self.max_length} leaves no room for text: template "
                              f"{self.template_name!r} alone takes {n} tokens per turn; raise --max-length")

    def __call__(self, batch: list[tuple[int, Record]]) -> Encoded:
        rendered = self.render(batch)
        return self.label(rendered, self.encode(rendered))

    def render(self, batch: list[tuple[int, Record]]) -> Rendered:
        """Normalize and render a batch (pure Python: the part that holds the GIL)."""
        out = Rendered(Encoded(), [], [], [], [], [])
        for sid, rec in batch:
            try:
                if rec.error is not None:
                    raise FormatError(rec.error, rec.reason)
                conv = normalize(rec.fields, self.format, self.read.fields)
                self._add(out, conv, sid, rec.source)
            except FormatError as e:
                self.reject(out.encoded, sid, rec.source, e.reason, str(e))
        return out

    def _add(self, out: Rendered, conv: Conversation, sid: int, source: str) -> None:
        text, spans = self.renderer.render(conv)
        whole = self.bos_id is None or text.startswith(self.bos) or self.renderer.uses_chat_template(conv)
        head = 0 if whole else 1
        if self.window is not None:
            cut, spans, head = self.window.cut(text, spans, head)
            if self.truncation == "drop" and len(cut) < len(text):  # proven longer than max_length
                raise FormatError(f"{len(text):,} characters, {self.max_length + 1}+ tokens > max_length "
                                  f"{self.max_length} (--truncation drop)", "too_long")
            text = cut
        out.texts.append(text)
        out.spans.append(spans)
        out.kept.append((sid, source))
        out.heads.append(head)
        out.convs.append(conv)

    def _cuts_turns(self, conv: Conversation) -> bool:
        """Whether a too long `conv` loses whole turns (`--truncation-unit turns`) rather than tokens."""
        return self.by_turns and conv.kind != "text"

    def reject(self, out: Encoded, sid: int, source: str, reason: str, message: str) -> None:
        """Add a reject to `out`, or raise it under `--on-error fail` (not for the recipe's own choices)."""
        if self.fail_fast and reason not in CHOSEN:
            raise RecordError(f"{source}: {message}")
        out.rejects.append({"sample_id": sid, "source": source, "reason": reason, "message": message})

    def encode(self, rendered: Rendered) -> list:
        """One `encode_batch` call (Rust, multi-threaded, releases the GIL); ids only where token
        byte lengths locate the tokens (`boundaries`)."""
        if not rendered.texts:
            return []
        if self.boundaries is not None:
            return self.backend.encode_batch_fast(rendered.texts, add_special_tokens=False)
        return self.backend.encode_batch(rendered.texts, add_special_tokens=False)

    def label(self, rendered: Rendered, encs: list) -> Encoded:
        """Labels for a tokenized batch, then truncation and the no-trained-token filter."""
        out = rendered.encoded
        if not rendered.texts:
            return out
        ids, labels, lengths, base, num_trained = self._label_arrays(rendered, encs)
        self._keep(out, rendered, ids, labels, lengths, base, num_trained)
        return out

    def _label_arrays(self, rendered: Rendered, encs: list) -> tuple:
        """ids and labels of a batch laid end to end, with each sample's length, start and trained count."""
        n_tok = [len(e) for e in encs]
        heads = rendered.heads
        lengths = np.add(n_tok, heads, dtype=np.int64)
        base = np.cumsum(lengths) - lengths  # where each sample starts in the flat batch
        ids = ids_text = np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=np.int32, count=sum(n_tok))
        if any(heads):
            at = (base - np.cumsum(heads) + heads)[np.asarray(heads, dtype=bool)]
            ids = np.insert(ids, at, self.bos_id)
        k, i, j = self._ranges(rendered, encs, ids_text, n_tok)
        at = (base + heads)[k]  # where each range's sample starts its text's tokens
        delta = np.zeros(len(ids) + 1, dtype=np.int32)
        np.add.at(delta, at + i, 1)
        np.add.at(delta, at + j, -1)
        trained = np.cumsum(delta[:-1]) > 0
        mask_sample_starts(trained, lengths, fill=False)
        labels = np.where(trained, ids, IGNORE_INDEX).astype(np.int32)
        counts = np.concatenate([[0], np.cumsum(trained, dtype=np.int64)])
        num_trained = counts[base + lengths] - counts[base]
        return ids, labels, lengths, base, num_trained

    def _ranges(self, rendered: Rendered, encs: list, ids: np.ndarray, n_tok: list[int]) -> tuple:
        """(sample, start, end) of every trained token range of a batch: from token byte lengths
        where they locate the tokens, else from each text's offsets (`labels.token_ranges`)."""
        texts, spans = rendered.texts, rendered.spans
        if self.boundaries is None:
            found, redo, full = [np.zeros(0, np.int64)] * 3, range(len(texts)), encs
        else:
            *found, redo = self.boundaries.ranges(ids, n_tok, texts, spans)
            full = self.backend.encode_batch([texts[k] for k in redo], add_special_tokens=False) if redo else []
        extra = [(k, i, j) for k, enc in zip(redo, full) for i, j in token_ranges(enc, texts[k], spans[k], n_tok[k])]
        if not extra:
            return found
        return [np.concatenate([f, np.asarray(e, np.int64)]) for f, e in zip(found, zip(*extra))]

    def from_cache(self, sample_ids: list[int], sources: list[str], ids: np.ndarray, labels: np.ndarray,
                   lengths: np.ndarray, num_trained: np.ndarray) -> Encoded:
        """Untruncated samples read back from the sample cache (`cache.replay`), truncated and filtered as
        `label` does a batch it tokenized: the same samples, rejects and flags."""
        out = Encoded()
        rendered = Rendered(out, [], [], list(zip(sample_ids, sources)), [], [None] * len(sample_ids))
        base = np.cumsum(lengths) - lengths
        self._keep(out, rendered, ids, labels, np.asarray(lengths, np.int64), base, np.asarray(num_trained, np.int64))
        return out

    def _fit_turns(self, conv: Conversation) -> tuple[np.ndarray, np.ndarray] | None:
        """The conversation with whole exchanges (a user turn and what follows it) dropped from the end
        (keep_start) or from the start after any system message (keep_end), re-rendered: the most
        exchanges that fit. A longer conversation is never shorter, so the count is found by bisection
        (O(log n) renders, not n); an exchange count that cannot be rendered or trains nothing sends the
        search to the next smaller count, one by one, as a plain scan would."""
        msgs = conv.messages
        system = msgs[:1] if msgs and msgs[0].role == "system" else []
        body = msgs[len(system):]
        starts = [i for i, m in enumerate(body) if m.role == "user"] + [len(body)]
        groups = [body[a:b] for a, b in zip(starts, starts[1:])]
        tried: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}

        def attempt(k: int) -> tuple[np.ndarray, np.ndarray] | None:  # None: no assistant turn, or unrenderable
            if k not in tried:
                kept = groups[:k] if self.truncation == "keep_start" else groups[len(groups) - k:]
                shorter = [m for g in kept for m in g]
                tried[k] = None
                if any(m.role == "assistant" for m in shorter):
                    trial = Rendered(Encoded(), [], [], [], [], [])
                    try:
                        self._add(trial, Conversation(conv.kind, system + shorter, tools=conv.tools,
                                                      fields=conv.fields), 0, "")
                    except FormatError:
                        return None
                    ids, labels, _, _, _ = self._label_arrays(trial, self.encode(trial))
                    tried[k] = ids, labels
            return tried[k]

        lo, hi = 1, len(groups) - 1  # the answer is the largest k in [lo, hi] that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            found = attempt(mid)
            if found is None:
                break  # a hole in the search: scan down from hi
            if len(found[0]) <= self.max_length:
                lo = mid
            else:
                hi = mid - 1
        for k in range(hi, 0, -1):
            found = attempt(k)
            if found is not None and len(found[0]) <= self.max_length:
                return found
        return None

    def _keep(self, out: Encoded, rendered: Rendered, ids, labels, lengths, base, num_trained) -> None:
        """Apply truncation and drop samples with nothing to train; fast when nothing changes."""
        kept, n = rendered.kept, self.max_length
        too_long = (lengths > n) if self.truncation else np.zeros(len(lengths), dtype=bool)
        if not too_long.any() and num_trained.all():
            out.ids, out.labels, out.lengths, out.num_trained = ids, labels, lengths, num_trained
            out.sample_ids += [sid for sid, _ in kept]
            out.sources += [src for _, src in kept]
            out.truncated += [False] * len(kept)
            return
        parts_ids, parts_labels, lens, trained_counts = [], [], [], []
        for k, (sid, source) in enumerate(kept):
            a, b = int(base[k]), int(base[k] + lengths[k])
            s_ids, s_labels, truncated = ids[a:b], labels[a:b], bool(too_long[k])
            if truncated and self._cuts_turns(rendered.convs[k]):
                fitted = self._fit_turns(rendered.convs[k])
                if fitted is None:
                    self.reject(out, sid, source, "too_long", f"{b - a} tokens > max_length {n}, and no whole "
                                 "turn fits (--truncation-unit turns)")
                    continue
                s_ids, s_labels = fitted
            elif truncated:
                if self.truncation == "drop":
                    self.reject(out, sid, source, "too_long", f"{b - a} tokens > max_length {n} (--truncation drop)")
                    continue
                if self.truncation == "keep_start":
                    s_ids, s_labels = s_ids[:n], s_labels[:n]
                else:  # keep_end, keeping BOS in front when there is one
                    head = 1 if self.bos_id is not None and s_ids[0] == self.bos_id else 0
                    s_ids = np.concatenate([s_ids[:head], s_ids[len(s_ids) - (n - head):]])
                    s_labels = np.concatenate([s_labels[:head], s_labels[len(s_labels) - (n - head):]])
                    mask_sample_starts(s_labels, [len(s_labels)])
            count = int((s_labels != IGNORE_INDEX).sum())
            if count == 0:
                reason = "no_trained_tokens_after_truncation" if truncated else "no_trained_tokens"
                self.reject(out, sid, source, reason,
                             "no token left to train on" + (" after truncation" if truncated else ""))
                continue
            parts_ids.append(s_ids)
            parts_labels.append(s_labels)
            lens.append(len(s_ids))
            trained_counts.append(count)
            out.sample_ids.append(sid)
            out.sources.append(source)
            out.truncated.append(truncated)
        if lens:
            out.ids, out.labels = np.concatenate(parts_ids), np.concatenate(parts_labels)
            out.lengths, out.num_trained = np.asarray(lens, np.int64), np.asarray(trained_counts, np.int64)
