"""Labels from character spans: the one rule that decides which tokens are trained.

A token is trained iff the first non-whitespace character it covers lies in a trained span (its
first character when it covers only whitespace or nothing). Tokenizers glue a word's leading space
onto the word (`"▁Paris"`), so a completion that starts right after `"Answer: "` still has its
first word trained; a token that merges prompt and completion text starts in the prompt and is
not trained. Because the labels come from the one tokenization of the full text, the tokens
trained on are exactly the tokens the model sees at inference.

Trained positions carry the token id, all others `IGNORE_INDEX`. The first token of every sample
is never trained (labels are unshifted; in a packed row it would otherwise learn to predict the
next sample from the previous one): `mask_sample_starts` is that rule, for the build (labelling,
truncation, writing rows), `sftprep verify` and sfttrain's collator alike.

    text     "Q: 2+2? A: 4</s>"       trained span: "A: 4</s>" (characters 8-16)
    tokens   <s>  ▁Q  :  ▁2+2  ?  ▁A  :  ▁4  </s>
    labels   -    -   -  -     -  ▁A  :  ▁4  </s>     (- = IGNORE_INDEX; position 0 by `mask_sample_starts`)

This module is shared by the build and the read side (`sftprep.inspect`, sfttrain); it imports
nothing else of sftprep.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

IGNORE_INDEX = -100
"""The label of an untrained position (PyTorch's `cross_entropy` default): defined here only."""

# Code points treated as whitespace when finding a token's first real character: exactly the
# characters for which Python's str.isspace() is true (what `first_token_from` uses).
_SPACES = np.array([9, 10, 11, 12, 13, 0x1C, 0x1D, 0x1E, 0x1F, 32, 0x85, 0xA0, 0x1680, 0x2028, 0x2029, 0x202F, 0x205F,
                    0x3000, *range(0x2000, 0x200B)], dtype=np.uint32)


def char_codes(text: str) -> np.ndarray:
    """The code points of `text` (Python string indices = positions in this array)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def span_mask(n_chars: int, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Boolean per character: inside one of `spans` (half-open, any order)."""
    delta = np.zeros(n_chars + 1, dtype=np.int32)
    if len(spans):
        s = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        np.add.at(delta, np.clip(s[:, 0], 0, n_chars), 1)
        np.add.at(delta, np.clip(s[:, 1], 0, n_chars), -1)
    return np.cumsum(delta[:-1]) > 0


def trained_tokens(starts: np.ndarray, ends: np.ndarray, codes: np.ndarray,
                   trained_chars: np.ndarray) -> np.ndarray:
    """Which tokens are trained, given their character offsets into one text (or many texts laid
    end to end: offsets then index the concatenation).

    Args:
        starts, ends: int arrays, the characters each token covers (`[start, end)`).
        codes: code points of the text (`char_codes`).
        trained_chars: bool per character, True inside a trained span.
    """
    n = len(codes)
    if n == 0:
        return np.zeros(len(starts), dtype=bool)
    is_space = np.isin(codes, _SPACES)
    # next_real[i] = first index >= i that is not whitespace (n if none)
    idx = np.where(is_space, n, np.arange(n))
    next_real = np.minimum.accumulate(idx[::-1])[::-1]
    starts = np.clip(starts, 0, n - 1)
    anchor = next_real[starts]
    anchor = np.where(anchor < ends, anchor, starts)
    return trained_chars[anchor]


def first_token_from(enc, text: str, pos: int, n_tokens: int) -> int:
    """Index of the first token whose anchor (see module doc) is at or after character `pos`.

    `enc` is a `tokenizers.Encoding` of `text`; only a few calls into it are made (no offset
    lists are built), which is what keeps labelling cheap next to tokenization.
    """
    c = pos
    while c < len(text):
        t = enc.char_to_token(c)
        if t is not None:
            start, end = enc.token_to_chars(t)
            piece = text[start:end]
            lead = len(piece) - len(piece.lstrip())
            anchor = start + lead if lead < len(piece) else start
            return t if anchor >= pos else t + 1
        c += 1  # a character no token covers (a dropped space): look further
    return n_tokens


def token_ranges(enc, text: str, spans: Sequence[tuple[int, int]], n_tokens: int) -> list[tuple[int, int]]:
    """The trained token ranges `[i, j)` for trained character spans; same rule as
    `trained_tokens`, computed from the span boundaries alone."""
    out = []
    for a, b in spans:
        i, j = first_token_from(enc, text, a, n_tokens), first_token_from(enc, text, b, n_tokens)
        if j > i:
            out.append((i, j))
    return out


def sample_starts(seq_lens: Sequence[int] | np.ndarray, row_offsets: np.ndarray | None = None,
                  seq_offsets: np.ndarray | None = None) -> np.ndarray:
    """Flat positions of each sample's first token: samples laid end to end (`seq_lens`), or, given
    the offsets that cut a batch of rows (`row_offsets` into the tokens, `seq_offsets` into
    `seq_lens`), laid end to end inside each row, each row's padding after its samples."""
    lens = np.asarray(seq_lens, dtype=np.int64)
    ends = np.cumsum(lens)
    starts = ends - lens
    if row_offsets is None:
        return starts
    seq_offsets = np.asarray(seq_offsets, dtype=np.int64)
    row = np.repeat(np.arange(len(seq_offsets) - 1), np.diff(seq_offsets))
    first = np.concatenate([[0], ends])[seq_offsets[:-1]]  # where each row's samples begin in `starts`
    return np.asarray(row_offsets, dtype=np.int64)[:-1][row] + starts - first[row]


def mask_sample_starts(labels: np.ndarray, seq_lens: Sequence[int] | np.ndarray,
                       row_offsets: np.ndarray | None = None, seq_offsets: np.ndarray | None = None,
                       fill: int | bool = IGNORE_INDEX) -> np.ndarray:
    """Set the label of every sample's first token to `fill` (`IGNORE_INDEX`; False on a bool
    "trained" mask), in place, and return `labels`. Samples and rows as in `sample_starts`."""
    starts = sample_starts(seq_lens, row_offsets, seq_offsets)
    lens = np.asarray(seq_lens, dtype=np.int64)
    labels[starts[(lens > 0) & (starts < len(labels))]] = fill
    return labels


def labels_from_spans(ids: Sequence[int], offsets: Sequence[tuple[int, int]], text: str,
                      spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Labels (int32) for one tokenized text: the id where trained, `IGNORE_INDEX` elsewhere,
    and the first token never trained.

    The reference form of the rule, from a full offset list (any tokenizer's). Builds use the
    faster `boundaries.ByteBoundaries.ranges` (tokens of fixed bytes) or `token_ranges`; property
    tests check that each agrees with this one."""
    ids = np.asarray(ids, dtype=np.int32)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    codes = char_codes(text)
    mask = trained_tokens(off[:, 0], off[:, 1], codes, span_mask(len(codes), spans))
    labels = np.where(mask, ids, IGNORE_INDEX).astype(np.int32)
    return mask_sample_starts(labels, [len(labels)])
