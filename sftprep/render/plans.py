"""Render plans: a chat template rendered once per conversation *shape*, message texts filled in after.

Most datasets hold a handful of shapes (roles in order, system message or not) and thousands of
conversations. A template that only writes a message's text, joins it to other strings, tests
whether it is empty or trims its whitespace renders every conversation of a shape as the same
template text with the message texts in the same places. So the template is rendered once per
shape with each text replaced by a `Slot`, an opaque stand-in that supports exactly those
operations and raises `Unsupported` on anything else (comparing, measuring, searching, indexing,
converting to a string, JSON, escaping...). A render that goes through is exact for every
conversation of the shape: the template took the same branches and wrote the same text around
the slots. One that raises falls back to rendering each conversation (`ChatTemplate`), as do
conversations a slot cannot stand for: tool calls or schemas (their values are template input
too), an empty or all-whitespace text (a trimmed text's truth could differ).

Texts of one shape share their edge whitespace (it is part of the shape), so a slot is that
whitespace around a stand-in for the text's core: trimming acts on the whitespace as it would on
any text of the shape, and the core, filled in per conversation, is the text stripped. Where the
whitespace is written, it is plain template text to `ChatTemplate`'s turn finding, as it is when
rendering: a plan gives the same segments as rendering, not only the same text.
"""

from __future__ import annotations

from typing import Any


class Unsupported(Exception):
    """The template did something with a message text that a slot cannot stand for."""


def _refuse(*_args: Any, **_kwargs: Any):
    raise Unsupported("the template inspects a message text")


class _Opaque:
    """What slots and their concatenations share: truth, `+` with strings, whitespace trims, and
    nothing else."""

    __slots__ = ()

    def __bool__(self) -> bool:  # the real texts are never empty nor all whitespace
        return True

    def __add__(self, other):
        return Joined((self, other)) if isinstance(other, (str, _Opaque)) else NotImplemented

    def __radd__(self, other):
        return Joined((other, self)) if isinstance(other, str) else NotImplemented

    def __eq__(self, other) -> bool:
        if isinstance(other, (str, _Opaque)):  # the answer depends on the text
            _refuse()
        return False  # a string equals no value of another type (Cohere: `system_message != false`)

    def __ne__(self, other) -> bool:
        return not self.__eq__(other)

    def strip(self, chars: str | None = None):
        return self._trim(True, True, chars)

    def lstrip(self, chars: str | None = None):
        return self._trim(True, False, chars)

    def rstrip(self, chars: str | None = None):
        return self._trim(False, True, chars)

    def _trim(self, left: bool, right: bool, chars: str | None):
        raise NotImplementedError

    __str__ = __repr__ = __format__ = __len__ = __iter__ = __contains__ = __getitem__ = _refuse
    __lt__ = __le__ = __gt__ = __ge__ = __hash__ = __mul__ = __rmul__ = __mod__ = __rmod__ = _refuse
    __getattr__ = _refuse


class Slot(_Opaque):
    """Message text number `k` in a planning render: the template sees `lead` + core + `trail`,
    the text's edge whitespace (the same for every text of the shape) around its core (which
    differs); it is written as `lead`, one character for the core, `trail`."""

    __slots__ = ("k", "lead", "trail")

    def __init__(self, k: int, lead: str, trail: str) -> None:
        self.k, self.lead, self.trail = k, lead, trail

    def _trim(self, left: bool, right: bool, chars: str | None) -> Slot:
        lead = self.lead.lstrip(chars) if left else self.lead
        trail = self.trail.rstrip(chars) if right else self.trail
        # trimming that reaches the core (chars beyond whitespace) depends on the text
        if chars is not None and not chars.isspace() and ((left and not lead) or (right and not trail)):
            _refuse()
        return Slot(self.k, lead, trail)


class Joined(_Opaque):
    """Strings and slots concatenated (`"<|im_start|>" + message.content`): opaque too, written
    as its parts."""

    __slots__ = ("parts",)

    def __init__(self, parts: tuple) -> None:
        flat: list = []
        for p in parts:
            flat += p.parts if isinstance(p, Joined) else [p]
        self.parts = tuple(flat)

    def _trim(self, left: bool, right: bool, chars: str | None) -> Joined:
        parts = list(self.parts)  # strings trimmed as any string; the first slot reached trims itself
        if left:
            while parts and isinstance(parts[0], str) and not parts[0].lstrip(chars):
                parts.pop(0)
            if parts:
                parts[0] = parts[0].lstrip(chars)
        if right:
            while parts and isinstance(parts[-1], str) and not parts[-1].rstrip(chars):
                parts.pop()
            if parts:
                parts[-1] = parts[-1].rstrip(chars)
        return Joined(tuple(parts))


def written(base: int, slot: Slot) -> str:
    """A slot as the planning render writes it: its whitespace around character `base + k`."""
    return f"{slot.lead}{chr(base + slot.k)}{slot.trail}"


def planning_environment(env, base: int) -> None:
    """Make a template environment write slots (`written`), and give the tests and filters that
    would silently treat a slot unlike a string the string's answer (or `Unsupported`)."""
    def finalize(value):
        if isinstance(value, Slot):
            return written(base, value)
        if isinstance(value, Joined):
            return "".join(p if isinstance(p, str) else written(base, p) for p in value.parts)
        return value

    def guarded(fn, answer=_refuse):
        return lambda value, *a, **kw: (answer if isinstance(value, _Opaque) else fn)(value, *a, **kw)

    env.finalize = finalize
    env.filters["trim"] = guarded(env.filters["trim"], lambda value, chars=None: value.strip(chars))
    for name in ("int", "float"):  # they answer 0 for a value they cannot convert
        env.filters[name] = guarded(env.filters[name])
    for name in ("string", "sequence", "iterable"):  # a slot stands for a string
        env.tests[name] = guarded(env.tests[name], lambda *_: True)
    env.tests["sameas"] = guarded(env.tests["sameas"])
