"""Render plans: a chat template rendered once per conversation *shape*, message texts filled in after.

Most datasets hold a handful of shapes (roles in order, system message or not) and thousands of
conversations. A template that only writes a message's text, joins it to other strings, tests
whether it is empty or trims its whitespace renders every conversation of a shape as the same
template text with the message texts in the same places. So the template is rendered once per
shape with each text replaced by a `Slot`, an opaque stand-in that supports exactly those
operations.

Templates also ask questions of a text: Qwen3 tests `'</think>' in content` and splits it there,
DeepSeek-R1 too, gpt-oss looks for channel tags in it. A slot answers such a question from the text
it stands for in the conversation being planned, and the plan records the question and its answer
(a *guard*): questions whose answer is a value (`in`, `==`, `startswith`, `| length > 0`: a length is
only compared, `Length`), text operations that give the text back unchanged (`split('</think>')` on a
text without `</think>` is `[text]`, `replace(a, b)` on one without `a` is the text), and splits of
a text joined to the template's strings at separators that only those strings hold (Nemotron splits
`"<think></think>" ~ content` at `</think>`). The template's path through the render
depends on nothing else, so the plan is exact for every conversation of the shape whose texts give
the same answers; one that answers differently gets a plan of its own (`Planning`, `guards_hold`),
up to a few per shape. Anything else (indexing, iterating, converting to a string, JSON, escaping,
an operation that changes the text) raises `Unsupported`: the conversations that take that path are
rendered one by one (`ChatTemplate`), as are conversations a slot cannot stand for: tool calls or
schemas (their values are template input too), an empty or all-whitespace text (a trimmed text's
truth could differ).

Texts of one shape share their edge whitespace (it is part of the shape), so a slot is that
whitespace around a stand-in for the text's core: trimming acts on the whitespace as it would on
any text of the shape, and the core, filled in per conversation, is the text stripped. Where the
whitespace is written, it is plain template text to `ChatTemplate`'s turn finding, as it is when
rendering: a plan gives the same segments as rendering, not only the same text. Output a template
captures (macros, `{% set %}` blocks) comes back to it as `Joined` strings and slots, opaque too.
"""

from __future__ import annotations

import operator
import re
import threading
from typing import Any


class Unsupported(Exception):
    """The template did something with a message text that a slot cannot stand for."""


def _refuse(*_args: Any, **_kwargs: Any):
    raise Unsupported("the template inspects a message text")


_ACTIVE = threading.local()  # .planning: the `Planning` whose render is in progress on this thread


class Planning:
    """One planning render: the cores of the texts its slots stand for, in slot order (those of the
    conversation being planned), and the questions the template asked of them with their answers."""

    def __init__(self) -> None:
        self.cores: list[str] = []
        self.guards: list[tuple] = []

    def slot(self, text: str) -> Slot:
        """A slot for `text` (neither empty nor all whitespace), number `len(cores)`."""
        self.cores.append(text.strip())
        return Slot(len(self.cores) - 1, *edges(text))

    def __enter__(self) -> Planning:
        _ACTIVE.planning = self
        return self

    def __exit__(self, *_exc) -> None:
        _ACTIVE.planning = None

    def ask(self, subject: _Opaque, fn, args: tuple):
        """`fn(subject, *args)` (a string method, or a question about the length) on the texts being
        planned, recorded: the slot or `Joined` for an operation that gives the text back, the answer
        where it is a value, the pieces of a split at separators written by the template; else refused."""
        question = _question(fn, subject, args)
        answer = question(self.cores)
        if answer is None or isinstance(answer, (bool, int, float)):
            return self._answered(question, answer, answer)
        text = value(subject, self.cores)
        if answer == text or answer == [text]:  # the text given back (`replace`, `split` where nothing matches)
            same, get = answer == text, reader(subject)
            return self._answered(lambda cores: question(cores) == (get(cores) if same else [get(cores)]), True,
                                  subject if same else [subject])
        if fn is str.split and isinstance(subject, Joined) and len(args) == 1 and type(args[0]) is str:
            where = _separators(subject.parts, args[0], self.cores)
            if where is not None:
                return self._answered(lambda cores: _separators(subject.parts, args[0], cores), where,
                                      _cut(subject.parts, args[0], where))
        _refuse()

    def _answered(self, question, answer, result):
        self.guards.append((question, answer))
        return result


def _separators(parts: tuple, sep: str, cores: list[str]) -> tuple | None:
    """Where `str.split(sep)` cuts the text of `parts`: (part, offset) of each separator found, each
    inside one of the template's strings; None where one overlaps a text (or there is none)."""
    values = [value(p, cores) for p in parts]
    text = "".join(values)
    ends, at = [], 0
    for v in values:
        at += len(v)
        ends.append(at)
    found, i, j = [], text.find(sep), 0
    while i >= 0 and sep:
        while ends[j] <= i:
            j += 1
        start = ends[j] - len(values[j])
        if not isinstance(parts[j], str) or i + len(sep) > ends[j]:
            return None
        found.append((j, i - start))
        i = text.find(sep, i + len(sep))
    return tuple(found) or None


def _cut(parts: tuple, sep: str, where: tuple) -> list:
    """`parts` split at the separators `where` (`_separators`): strings and `Joined` pieces."""
    pieces, current = [], []
    for j, p in enumerate(parts):
        pos = 0
        for jj, offset in where:
            if jj == j:
                current.append(p[pos:offset])
                pieces.append(current)
                current, pos = [], offset + len(sep)
        current.append(p[pos:] if isinstance(p, str) else p)
    pieces.append(current)
    out = []
    for piece in pieces:
        piece = [x for x in piece if not (isinstance(x, str) and not x)]
        out.append("".join(piece) if all(isinstance(x, str) for x in piece) else Joined(tuple(piece)))
    return out


def edges(text: str) -> tuple[str, str]:
    """The leading and trailing whitespace of a text that is not all whitespace."""
    core = text.strip()
    lead = text.index(core[0])
    return text[:lead], text[lead + len(core):]


def value(x: Any, cores: list[str]) -> Any:
    """What a slot, or strings and slots joined, stands for given the texts' cores; anything else as is."""
    if isinstance(x, Slot):
        return x.lead + cores[x.k] + x.trail
    if isinstance(x, Joined):
        return "".join([value(p, cores) for p in x.parts])
    return x


def reader(x: Any):
    """`value` as a function of the cores alone, made once per question: a plan's guards are asked for
    every conversation of its shape (Qwen3: a question per assistant turn), so what each reads is
    resolved when it is planned, not walked again per conversation."""
    if isinstance(x, Slot):
        k, lead, trail = x.k, x.lead, x.trail
        return operator.itemgetter(k) if not (lead or trail) else lambda cores: lead + cores[k] + trail
    if isinstance(x, Joined):
        parts = [reader(p) for p in x.parts]
        return lambda cores: "".join([p(cores) for p in parts])
    return lambda _cores: x


def _question(fn, subject: _Opaque, args: tuple):
    """`fn(subject, *args)` as a function of the cores (`reader`)."""
    get = reader(subject)
    if not any(isinstance(a, _Opaque) for a in args):  # the template's own strings or numbers
        return lambda cores: fn(get(cores), *args)
    gets = [reader(a) for a in args]
    return lambda cores: fn(get(cores), *[g(cores) for g in gets])


def guards_hold(guards: list[tuple], cores: list[str]) -> bool:
    """Whether texts with these cores give every recorded question the planned texts' answer."""
    for question, answer in guards:
        try:
            got = question(cores)
        except Exception:  # (`index` of what another text lacks): planning it again says what to do
            return False
        if got != answer or type(got) is not type(answer):
            return False
    return True


def _ask(subject: _Opaque, fn, *args):
    planning = getattr(_ACTIVE, "planning", None)
    if planning is None:
        _refuse()
    return planning.ask(subject, fn, args)


def _compare(name: str):
    fn = getattr(str, name)

    def method(self, other):
        if isinstance(other, (str, _Opaque)):  # the answer depends on the text: recorded
            return _ask(self, fn, other)
        if name in ("__eq__", "__ne__"):  # a string equals no value of another type (Cohere: `!= false`)
            return name == "__ne__"
        _refuse()
    return method


def _length_is(op):
    return lambda text, n: op(len(text), n)


class Length:
    """`text | length` in a planning render: compared with a number, the comparison is asked (so
    texts of other lengths share the plan where the answer is the same); any other use refused."""

    __slots__ = ("subject",)

    def __init__(self, subject: _Opaque) -> None:
        self.subject = subject

    def _compare(op):
        fn = _length_is(op)

        def method(self, n):
            if type(n) is not int:
                _refuse()
            return _ask(self.subject, fn, n)
        return method

    __eq__, __ne__, __lt__, __le__, __gt__, __ge__ = map(_compare, (operator.eq, operator.ne, operator.lt, operator.le,
                                                                     operator.gt, operator.ge))
    del _compare

    def __bool__(self) -> bool:  # the real texts are never empty
        return True

    __hash__ = __int__ = __index__ = __float__ = __str__ = __add__ = __radd__ = __sub__ = __rsub__ = _refuse
    __mul__ = __rmul__ = __truediv__ = __floordiv__ = __mod__ = __neg__ = __format__ = __repr__ = _refuse


class _Opaque:
    """What slots and their concatenations share: truth, `+` with strings, whitespace trims, questions
    (`Planning.ask`), and nothing else."""

    __slots__ = ()

    def __bool__(self) -> bool:  # the real texts are never empty nor all whitespace
        return True

    def __add__(self, other):
        return Joined((self, other)) if isinstance(other, (str, _Opaque)) else NotImplemented

    def __radd__(self, other):
        return Joined((other, self)) if isinstance(other, str) else NotImplemented

    __eq__, __ne__ = _compare("__eq__"), _compare("__ne__")
    __lt__, __le__, __gt__, __ge__ = _compare("__lt__"), _compare("__le__"), _compare("__gt__"), _compare("__ge__")

    def __contains__(self, item) -> bool:
        return _ask(self, str.__contains__, item)

    def __len__(self) -> int:
        return _ask(self, str.__len__)

    def __getattr__(self, name: str):
        """A string method (`startswith`, `split`, ...): asked (`Planning.ask`)."""
        fn = getattr(str, name, None)
        if name.startswith("_") or not callable(fn):
            _refuse()
        return lambda *args: _ask(self, fn, *args)

    def strip(self, chars: str | None = None):
        return self._trim(True, True, chars)

    def lstrip(self, chars: str | None = None):
        return self._trim(True, False, chars)

    def rstrip(self, chars: str | None = None):
        return self._trim(False, True, chars)

    def _trim(self, left: bool, right: bool, chars: str | None):
        raise NotImplementedError

    __str__ = __repr__ = __format__ = __iter__ = __getitem__ = _refuse
    __hash__ = __mul__ = __rmul__ = __mod__ = __rmod__ = _refuse


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
        # trimming that reaches the core (chars beyond whitespace) depends on the text: asked
        if chars is not None and not chars.isspace() and ((left and not lead) or (right and not trail)):
            return _ask(self, str.strip if left and right else str.lstrip if left else str.rstrip, chars)
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


def planning_environment(env, base: int, marks: re.Pattern) -> None:
    """Make a template environment write slots (`written`), give back output it captures as `Joined`
    where slots were written in it (`marks`: a pattern capturing the characters slots are written as),
    join `~` as `+`, and give the tests and filters that would silently treat a slot unlike a string the
    string's answer (or `Unsupported`)."""
    def finalize(value):
        if isinstance(value, Slot):
            return written(base, value)
        if isinstance(value, Joined):
            return "".join(p if isinstance(p, str) else written(base, p) for p in value.parts)
        return value

    def concat(pieces):  # a macro's, call's or `{% set %}` block's output
        text = "".join(pieces)
        if not marks.search(text):
            return text
        split = marks.split(text)  # text, slot, text, slot, ..., text
        return Joined(tuple(Slot(ord(p) - base, "", "") if j % 2 else p for j, p in enumerate(split) if p))

    def str_join(seq):  # `a ~ b`: as `+`, where a slot is joined
        seq = list(seq)
        if not any(isinstance(x, _Opaque) for x in seq):
            return "".join(map(str, seq))
        return Joined(tuple(x if isinstance(x, (str, _Opaque)) else str(x) for x in seq))

    def guarded(fn, answer=_refuse):
        return lambda value, *a, **kw: (answer if isinstance(value, _Opaque) else fn)(value, *a, **kw)

    env.code_generator_class = _code_generator()
    env.str_join = str_join
    env.finalize = finalize
    env.concat = concat
    env.filters["trim"] = guarded(env.filters["trim"], lambda value, chars=None: value.strip(chars))
    env.filters["string"] = guarded(env.filters["string"], lambda value: value)  # a slot stands for a string
    for name in ("length", "count"):
        env.filters[name] = guarded(env.filters[name], Length)
    for name in ("int", "float"):  # they answer 0 for a value they cannot convert
        env.filters[name] = guarded(env.filters[name])
    for name in ("string", "sequence", "iterable"):  # a slot stands for a string
        env.tests[name] = guarded(env.tests[name], lambda *_: True)
    env.tests["sameas"] = guarded(env.tests["sameas"])


def _code_generator():
    from jinja2.compiler import CodeGenerator

    class JoiningCodeGenerator(CodeGenerator):
        """Compiles `a ~ b` to `environment.str_join` (`planning_environment`) where the template does
        not autoescape; Jinja's own joins with `str()`, which a slot refuses."""

        def visit_Concat(self, node, frame) -> None:
            if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
                return super().visit_Concat(node, frame)
            self.write("environment.str_join((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    return JoiningCodeGenerator
