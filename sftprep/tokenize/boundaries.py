"""Trained token ranges from token byte lengths, for BPE tokenizers whose tokens cover fixed bytes.

Two kinds of tokenizer cut a text into tokens that each cover a fixed string of its UTF-8 bytes:
byte-level BPE (GPT-2 style: Llama-3, Qwen, DeepSeek, gpt-oss, GLM, Phi-4), whose vocabulary entries
are bytes through a 256-character alphabet, and SentencePiece-style BPE with a `Metaspace`
pre-tokenizer (Mistral), whose entries are text with `▁` for a space and `<0xNN>` for a byte. When
the normalizer leaves text as it is and the pre-tokenizers only split (never drop), token `i` covers
bytes `[ends[i] - nbytes[ids[i]], ends[i])` where `ends` is the running sum of `nbytes[ids]` (an
added token covers its content). The one byte that is not the text's, Metaspace's `▁` put in front
of a text that starts with neither a space nor an added token (`prepend_scheme: first`), is taken off
the text's first token. So ids alone say where every token starts, and a build asks the tokenizer for
ids only (`encode_batch_fast`: no offsets, no token strings; freeing millions of those strings while
the next batch is tokenized costs more than labelling itself).

The rule stays `labels.first_token_from`'s: a trained span `[a, b)` trains tokens `[i, j)` where `i`
is the first token whose first non-whitespace character is at or after `a`. Where a span boundary
is a token start, that token is the answer; where a token straddles the boundary (`"\\n\\n"`
merged across it, `" It"` whose space the template wrote), the answer depends on the token's
characters, read from the text around the boundary (`_straddled`); where those bytes are not whole
characters, the sample is labelled from a full offsets encoding instead (`ByteBoundaries.ranges`
lists it). So are samples this
module cannot vouch for: a token with no fixed bytes (unk), a text holding `▁` itself (Metaspace),
a text the NFC normalizer would change, a byte count that does not add up. (A lone leading `▁` token
is left with no byte: it still starts the text, as its offsets say.) Other tokenizers (WordPiece,
Unigram, a normalizer that rewrites text, a `▁` put before every section) get `None` from
`ByteBoundaries.of`: offsets always.
"""

from __future__ import annotations

import json
import re
import unicodedata
from functools import cached_property
from typing import Sequence

import numpy as np

from ..tokenizer import tokens_by_id

# pre-tokenizers that split text without dropping or adding any of it (Split's "Removed" drops)
_SPLITTERS = {"Split", "Digits", "Punctuation", "ByteLevel"}
_IDENTITY_NORMALIZERS = ({"type": "Sequence", "normalizers": []},)


def byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte in a byte-level vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _state(component) -> dict | None:
    return None if component is None else json.loads(component.__getstate__())


def _kind(pre: dict | None) -> tuple[str, bool] | None:
    """("byte_level" | "metaspace", whether Metaspace puts `▁` before the text) for a pre-tokenizer
    that only cuts text (nothing dropped, nothing added but that `▁`), else None."""
    if pre is None:
        return None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds, lead = set(), False
    for step in steps:
        kind = step.get("type")
        if kind == "Metaspace":
            if step.get("prepend_scheme") not in ("first", "never") or step.get("replacement", "▁") != "▁":
                return None
            lead = step["prepend_scheme"] == "first"
        elif kind not in _SPLITTERS or str(step.get("behavior", "")).lower() == "removed":
            return None
        elif kind == "ByteLevel" and step.get("add_prefix_space"):
            return None
        kinds.add(kind)
    if kinds & {"Metaspace", "ByteLevel"} == {"Metaspace"}:
        return "metaspace", lead
    if kinds & {"Metaspace", "ByteLevel"} == {"ByteLevel"}:
        return "byte_level", False
    return None


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _straddled(text: str, c: int, before: int, after: int) -> int | None:
    """The offsets rule at character `c` of `text` for the token that holds `before` bytes before it and `after`
    from it on: 1 (the next token) where the token's first character that is not white space comes before `c`
    or it has none (it anchors at its start), 0 (this token) where that character is at or after `c`; None
    where its bytes are not whole characters (it begins or ends inside one: offsets decide)."""
    data = text[max(0, c - before):c].encode("utf-8", "surrogatepass")
    try:
        head = data[len(data) - before:].decode("utf-8") if len(data) >= before else None
    except UnicodeDecodeError:
        head = None  # the token begins inside a character
    if head is None:
        return None
    if head.strip():
        return 1
    data = text[c:c + after].encode("utf-8", "surrogatepass")[:after]
    tail = data.decode("utf-8", "ignore")
    if tail.strip():
        return 0
    return 1 if len(tail.encode("utf-8", "surrogatepass")) == after else None


class ByteBoundaries:
    """Per token id, how many bytes of text it covers (-1: not fixed; such samples use offsets).

    `of` decides from the tokenizer's shape alone; the table (a pass over the vocabulary, ~0.1 s on
    129k tokens) is made on first use, so a build's first batch goes to the tokenizer without it.

    Args:
        backend: the `tokenizers.Tokenizer`.
        kind: "byte_level" or "metaspace" (a `▁` in the text is not one byte: such texts use offsets).
        nfc: the tokenizer NFC-normalizes text (an identity on text already in NFC, checked per text).
        lead: Metaspace puts a `▁` (one byte, as a space) before a text that starts with neither a
            space nor an added token.
    """

    def __init__(self, backend, kind: str, nfc: bool = False, lead: bool = False) -> None:
        self.backend = backend
        self.kind = kind
        self.nfc = nfc
        self.lead = lead
        self.metaspace = kind == "metaspace"

    @classmethod
    def of(cls, backend) -> ByteBoundaries | None:
        """For a `tokenizers.Tokenizer` whose token byte lengths fix its offsets, else None."""
        norm = _state(backend.normalizer)
        nfc = norm in ({"type": "NFC"}, {"type": "Sequence", "normalizers": [{"type": "NFC"}]})
        if not (norm is None or norm in _IDENTITY_NORMALIZERS or nfc):
            return None
        found = _kind(_state(backend.pre_tokenizer))
        if found is None or '"trim_offsets": true' in json.dumps(_state(backend.post_processor)):
            return None
        model = backend.model
        if type(model).__name__ != "BPE" or model.continuing_subword_prefix or model.end_of_word_suffix:
            return None
        kind, lead = found
        return cls(backend, kind, nfc, lead)

    nbytes = property(lambda self: self._table[0], doc="Bytes per token id (-1: not fixed).")
    added = property(lambda self: self._table[1], doc="Per token id, whether it is an added token.")

    @cached_property
    def _table(self) -> tuple[np.ndarray, np.ndarray]:
        backend = self.backend
        model = backend.model
        added = backend.get_added_tokens_decoder()
        tokens = [t or "" for t in tokens_by_id(backend)[:backend.get_vocab_size(with_added_tokens=False)]]
        for i in added:  # their bytes are their content (below)
            if i < len(tokens):
                tokens[i] = ""
        if self.kind == "byte_level":
            known = set(byte_alphabet())
            if not known.issuperset("".join(tokens)):  # some tokens are not byte strings: leave them unfixed
                tokens = [t if known.issuperset(t) else "" for t in tokens]
            sizes = map(len, tokens)  # one character per byte
        else:  # `▁` is a space; `<0xNN>` one byte (byte fallback); other characters their UTF-8 bytes
            fallback = bool(model.byte_fallback)
            sizes = (1 if fallback and t.startswith("<0x") and _BYTE_TOKEN.fullmatch(t)
                     else len(t.replace("▁", " ").encode("utf-8", "surrogatepass")) for t in tokens)
        nbytes = np.full(max(len(tokens), max(added, default=-1) + 1), -1, dtype=np.int64)
        nbytes[:len(tokens)] = np.fromiter(sizes, np.int64, len(tokens))
        for i, tok in added.items():  # matched in the raw text, content as written
            nbytes[i] = -1 if (tok.lstrip or tok.rstrip or not tok.content) else len(tok.content.encode())
        unk = backend.token_to_id(model.unk_token) if model.unk_token is not None else None
        if unk is not None:
            nbytes[unk] = -1  # stands for whatever bytes the vocabulary lacks
        nbytes[nbytes == 0] = -1
        is_added = np.zeros(len(nbytes), dtype=bool)
        is_added[list(added)] = True
        return nbytes, is_added

    def ranges(self, ids: np.ndarray, n_tok: Sequence[int], texts: Sequence[str],
               spans: Sequence[Sequence[tuple[int, int]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """Trained token ranges of a batch whose ids lie end to end in `ids` (`n_tok` per text).

        Returns (sample, start, end) arrays, one entry per non-empty range (token indices within
        each sample), and the samples whose ranges need offsets instead (see module doc)."""
        sizes = self.nbytes[ids]
        first = np.cumsum(n_tok) - n_tok  # each sample's first token in `ids`
        if self.lead:  # Metaspace's `▁` in front is no byte of the text: off the first token
            bare = np.fromiter((not t.startswith(" ") for t in texts), bool, len(texts))
            f = first[bare & (np.asarray(n_tok) > 0)]
            f = f[~self.added[ids[f]]]
            sizes[f] = np.where(sizes[f] > 0, sizes[f] - 1, sizes[f])  # a lone `▁` is left with none
        ends = np.cumsum(np.maximum(sizes, 0))  # non-decreasing, whatever other samples hold
        last = first + n_tok
        before = np.concatenate([[0], ends])  # bytes before token t: before[t]
        unfixed = np.concatenate([[0], np.cumsum(sizes < 0)])
        sample_bytes = before[last] - before[first]
        sample_unfixed = unfixed[last] - unfixed[first]
        base = before[first].tolist()
        who: list[int] = []
        at: list[int] = []
        redo: list[int] = []
        pos: list[int] = []  # each boundary's character in its text
        for k, (text, sp) in enumerate(zip(texts, spans)):
            if sample_unfixed[k] or not sp:
                if sp:
                    redo.append(k)
                continue
            b = base[k]
            if text.isascii():  # a byte per character
                if len(text) != sample_bytes[k]:
                    redo.append(k)
                    continue
                for s, e in sp:
                    at += (b + s, b + e)
                    pos += (s, e)
            else:
                if (self.nfc and not unicodedata.is_normalized("NFC", text)) or (self.metaspace and "▁" in text) or \
                        len(text.encode("utf-8", "surrogatepass")) != sample_bytes[k]:
                    redo.append(k)
                    continue
                done = 0
                for s, e in sp:
                    b += len(text[done:s].encode("utf-8", "surrogatepass"))
                    at.append(b)
                    b += len(text[s:e].encode("utf-8", "surrogatepass"))
                    at.append(b)
                    pos += (s, e)
                    done = e
            who += (k, k) * len(sp)
        if not at:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty, redo
        who_a = np.asarray(who, np.int64)
        at_a = np.asarray(at, np.int64)
        # the token holding byte `at` (last[k] at the sample's end)
        tok = np.minimum(np.searchsorted(ends, at_a, side="right"), last[who_a])
        # a text's start is its first token's, even one with no byte of its own (a lone leading `▁`)
        tok = np.where(at_a == before[first[who_a]], first[who_a], tok)
        straddles = (tok < last[who_a]) & (before[tok] != at_a)
        for x in np.flatnonzero(straddles).tolist():
            k = int(who_a[x])
            answer = _straddled(texts[k], pos[x], int(at_a[x] - before[tok[x]]), int(ends[tok[x]] - at_a[x]))
            if answer is not None:
                tok[x] += answer
                straddles[x] = False
        if straddles.any():
            bad = set(who_a[straddles].tolist())
            redo = sorted(set(redo) | bad)
            keep = ~np.isin(who_a, list(bad))
            who_a, tok = who_a[keep], tok[keep]
        local = tok - first[who_a]
        k, i, j = who_a[0::2], local[0::2], local[1::2]
        nonempty = j > i
        return k[nonempty], i[nonempty], j[nonempty], redo
