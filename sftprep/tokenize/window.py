"""Cut a text far longer than `max_length` to a window before tokenizing it.

Truncation keeps the first (`keep_start`) or last (`keep_end`) `max_length` tokens of a sample, so a
50 MB record with `max_length` 2048 needs a few thousand tokens, not fifty million. `Window.cut`
returns a slice of the rendered text whose tokenization yields exactly those tokens, ids and
character offsets alike (so the labels, computed per token from its characters, are the same too):
the result equals tokenize-then-truncate.

Tokenizers are not local in general (a BPE without pre-tokenization, as Llama/Mistral, merges over
the whole text, and a run such as `=====` can be grouped differently depending on where it starts),
so the window is never trusted on its size alone. It is checked: the text is tokenized in two windows
cut at different places (the second `d` characters further, `d` a prime at least the window's width,
so no periodic regrouping can line up), and the tokens kept (one more than needed, which also proves
the text is too long) must be identical in both and lie at least `MARGIN` characters from either cut.
When they are not, the window is widened; when the window is no longer much smaller than the text,
`cut` gives up and the whole text is tokenized, as before.

    text     |<------------------------- 50 MB ------------------------->|
    keep_end                                        |<-- d --|<-- w -->|   two windows, same tail
"""

from __future__ import annotations

from typing import Callable, Sequence

CHARS_PER_TOKEN = 8  # first window: this many characters per needed token (real text: 2-5) ...
MARGIN = 512  # ... plus this many, and kept tokens lie at least this far from every cut
SAVING = 4  # windows are tried while the text is at least this many times longer


def _prime_at_least(n: int) -> int:
    n = max(n, 2)
    while any(n % p == 0 for p in range(2, int(n ** 0.5) + 1)):
        n += 1
    return n


class Window:
    """Cuts long texts for one tokenizer and truncation side.

    Args:
        encode: `text -> tokenizers.Encoding` without special tokens (the build's own call).
        max_length: the sample length kept.
        keep: "keep_start" or "keep_end".
        bos, bos_id: the BOS token the build puts in front of a sample (None when it adds none).
    """

    def __init__(self, encode: Callable, max_length: int, keep: str, bos: str | None, bos_id: int | None) -> None:
        self.encode, self.max_length, self.keep = encode, max_length, keep
        self.bos, self.bos_id = bos, bos_id

    def cut(self, text: str, spans: Sequence[tuple[int, int]], head: int) -> tuple[str, list, int]:
        """The text to tokenize, its trained spans and its head (1: BOS goes in front): the window
        when one is proven to give the same kept tokens, else `text`, `spans`, `head` unchanged."""
        if len(text) < SAVING * (self.max_length * CHARS_PER_TOKEN + MARGIN):
            return text, list(spans), head
        if self.keep == "keep_end" and head == 0 and self.bos_id is not None and self.bos and text.startswith(self.bos):
            # the text's own first token is BOS, kept in front by keep_end: the window gets it as a head
            if self.encode(text[:len(self.bos) + MARGIN]).ids[:1] != [self.bos_id]:
                return text, list(spans), head
            head = 1
            bounds = self._bounds(text, self.max_length - head + 1)
            head = 1 if bounds is not None else 0
        else:
            bounds = self._bounds(text, self.max_length - head + 1)
        if bounds is None:
            return text, list(spans), head
        a, b = bounds
        cut = [(max(s, a) - a, min(e, b) - a) for s, e in spans if min(e, b) > max(s, a)]
        return text[a:b], cut, head

    def _bounds(self, text: str, need: int) -> tuple[int, int] | None:
        """`[a, b)` such that tokenizing `text[a:b]` gives the `need` first (keep_start) or last
        (keep_end) tokens of the whole text; None when no window much shorter than the text is proven."""
        n = len(text)
        w = need * CHARS_PER_TOKEN + MARGIN
        while SAVING * w <= n:
            d = _prime_at_least(w)
            if self.keep == "keep_start":
                if self._same_head(text[:w], text[:w + d], need, w):
                    return 0, w
            elif self.bos is None or not text.startswith(self.bos, n - w):
                if self._same_tail(text[n - w:], text[n - w - d:], need, d):
                    return n - w, n
            w *= SAVING
        return None

    def _same_head(self, short: str, long: str, need: int, w: int) -> bool:
        a, b = self.encode(short), self.encode(long)
        if len(a.ids) < need or len(b.ids) < need:
            return False
        if a.offsets[need - 1][1] > w - MARGIN:
            return False
        return a.ids[:need] == b.ids[:need] and a.offsets[:need] == b.offsets[:need]

    def _same_tail(self, short: str, long: str, need: int, d: int) -> bool:
        a, b = self.encode(short), self.encode(long)
        if len(a.ids) < need or len(b.ids) < need:
            return False
        if a.offsets[-need][0] < MARGIN:
            return False
        shifted = [(s + d, e + d) for s, e in a.offsets[-need:]]
        return a.ids[-need:] == b.ids[-need:] and shifted == b.offsets[-need:]
