"""Bounds on a chat template's render: wall time (`max_render_seconds`) and the size of any string or
list it builds or writes (`max_render_chars`), so a runaway template costs one record, not the build.

The Jinja sandbox already refuses attribute tricks and list mutation; what it leaves unbounded is
time and size. Here every place a template can spend either is checked against the render's
`Budget` (per thread, set by `ChatTemplate` around one conversation's renders):

    loops                 {% for %} iterates through `sftprep_iter` (time every 256 items)
    calls, filters        time before; an integer argument past the size (`'x'.ljust(4e9)`); the result's size
    `*` `**` `+`          the result's size before it is built (`'x' * 4e9`, `10 ** 10 ** 9`)
    `~`, `{% set %}`,     the result's size (a string doubled in a namespace stops at twice the bound)
      namespace attributes
    the output            its size and the time, piece by piece (`ChatTemplate.render`)
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from typing import Any, Iterable, Iterator


class TemplateLimit(Exception):
    """A render ran past `max_render_seconds` ("time") or built more than `max_render_chars` ("size")."""


class Budget(threading.local):
    """The bounds of the render in progress on this thread (none outside one)."""

    active = False
    deadline: float | None = None
    chars: int | None = None

    @contextlib.contextmanager
    def bound(self, seconds: float | None, chars: int | None) -> Iterator[None]:
        """Bound the renders inside (one conversation's, however many renders it takes); inside a
        bound already, the outer one holds."""
        if self.active:
            yield
            return
        self.active = True
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.chars = chars
        try:
            yield
        finally:
            self.active, self.deadline, self.chars = False, None, None

    def check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TemplateLimit("time")

    def check_size(self, n: int) -> None:
        if self.chars is not None and n > self.chars:
            raise TemplateLimit("size")

    def check_value(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple)):
            self.check_size(len(value))
        return value


BUDGET = Budget()
ITER, SIZE = "sftprep_iter", "sftprep_size"  # the globals the guarded tree calls


def _iterate(iterable: Iterable) -> Iterator:
    for i, item in enumerate(iterable):
        if not i & 255:
            BUDGET.check_time()
        yield item


def _check_args(args: tuple, kwargs: dict) -> None:
    BUDGET.check_time()
    for a in (*args, *kwargs.values()):
        if type(a) is int:  # a width or count: 'x'.ljust(4e9), 'x'|center(4e9) would build it first
            BUDGET.check_size(a)


def _product_size(operator: str, left: Any, right: Any) -> int:
    """The size of `left OP right` where it can be large, known before it is built (0 otherwise)."""
    if operator == "*":
        seq, n = (left, right) if type(right) is int else (right, left)
        if isinstance(seq, (str, list, tuple)) and type(n) is int:
            return len(seq) * n
    elif operator == "**" and type(left) is int and type(right) is int and right > 0:
        return right * max(abs(left).bit_length() - 1, 0) // 8  # bytes of the integer
    elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        return len(left) + len(right)
    return 0


def guarded_sandbox(base: type) -> type:
    """`base` (a Jinja sandbox class) with every way a template spends time or memory checked
    against `BUDGET`; the filters, globals and namespace of an instance are guarded by `guard`."""
    from jinja2 import nodes
    from jinja2.visitor import NodeTransformer

    def call_of(name: str, node: nodes.Node) -> nodes.Node:
        return nodes.Call(nodes.Name(name, "load"), [node], [], None, None).set_lineno(node.lineno or 1)

    class Guard(NodeTransformer):
        def visit_For(self, node: nodes.For) -> nodes.Node:
            self.generic_visit(node)
            node.iter = call_of(ITER, node.iter)
            return node

        def visit_Assign(self, node: nodes.Assign) -> nodes.Node:
            self.generic_visit(node)
            node.node = call_of(SIZE, node.node)
            return node

        def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
            self.generic_visit(node)
            return call_of(SIZE, node)

    class Guarded(base):
        intercepted_binops = frozenset({"*", "**", "+"})

        def _parse(self, source, name, filename):  # Jinja's one parse step (from_string, parse)
            tree = Guard().visit(super()._parse(source, name, filename))
            tree.set_environment(self)
            return tree

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
            _check_args(args, kwargs)
            return BUDGET.check_value(super().call(__context, __obj, *args, **kwargs))

        def call_binop(self, context, operator, left, right):
            BUDGET.check_size(_product_size(operator, left, right))
            return BUDGET.check_value(super().call_binop(context, operator, left, right))

    return Guarded


def guard(env) -> None:
    """Guard `env`'s filters (their arguments and results), namespaces' attributes, and give its
    guarded tree the globals it calls."""
    from jinja2.utils import Namespace, pass_context

    class Checked(Namespace):
        def __setitem__(self, name: str, value: Any) -> None:
            super().__setitem__(name, BUDGET.check_value(value))

    def checked(fn):
        # a pass_context function, so Jinja never runs it while compiling (it folds constant filters:
        # `'x'|center(4e9)` would be built there, outside any render's budget); the context passes
        # `fn` what it asks for (Context.call)
        @pass_context
        @functools.wraps(fn)
        def run(context, *args, **kwargs):
            _check_args(args, kwargs)
            return BUDGET.check_value(context.call(fn, *args, **kwargs))
        return run

    env.filters.update({name: checked(fn) for name, fn in env.filters.items()})
    env.globals.update({ITER: _iterate, SIZE: BUDGET.check_value, "namespace": Checked})
