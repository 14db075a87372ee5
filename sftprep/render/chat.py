"""A model's own Jinja chat template, rendered once per conversation, with its trained spans found.

Each message's text (content, and reasoning) is wrapped in invisible marker characters, the
conversation is rendered once, and the markers are read back out of the output:

    messages   user "Hi"            assistant "Hello!"
    rendered   <|im_start|>user\\n(Hi)<|im_end|>\\n<|im_start|>assistant\\n(Hello!)<|im_end|>\\n
                                                  ^ header H ends here      ^ stop token
    trained                                                  Hello!<|im_end|>

For each assistant turn the trained span runs from the end of its *header* to the end of its
*stop token*:

- the header `H` is what `add_generation_prompt=True` adds after a user turn (found once per
  template); the turn starts where `H` (or the longest prefix of it the template writes, e.g.
  DeepSeek-R1 prefills `<think>\\n` at inference but not in rendered turns) ends. So everything the
  model writes after the prompt is trained: reasoning blocks, gpt-oss channel tags, tool-call syntax.
  A template's empty think block (`<think>\\n\\n</think>\\n\\n`, no reasoning in it) right after
  the header is not trained, none of it, even where the header ends inside it (Nemotron 3 Nano
  prompts `<think>\\n`, writes `<think></think>`); where the header pre-fills an empty block and the
  turn writes reasoning in its place (Gemma 4), the turn starts before the block's opener.
  A template with no generation prompt (Mistral) starts the turn at its first text; a turn with
  neither header nor text (DeepSeek-V3's tool calls after the first) right after the previous message.
- the stop token is the first stop string (the tokenizer's EOS, `generation_config.json`'s
  `eos_token_id` list, `--stop-token`) after the turn's last text and before the next message's,
  else the first special token there (gpt-oss `<|end|>`). The newline after it and the next
  header are not trained. When the last turn ends the text with no stop token (GLM-4.5 writes
  none; its stop token is the next turn's `<|user|>`), the first stop string is appended. A turn the
  template ends with a token that is no stop token (`<|im_end|>` added as a plain token) is rejected
  (`turn_not_located`, naming `--stop-token '<|im_end|>'`), never trained without its end.
- tool results that the template writes inside the assistant's turn, before its text (Gemma 4), are
  cut out: the call is trained up to its stop token, the text after the results from its start.

Templates are free to rewrite text (strip it, drop earlier reasoning, split `<think>` blocks out
of content): markers sit inside any leading/trailing whitespace, so stripping keeps them, and a
turn is located by its header and stop token even where the template cut its text apart. The
marked render, markers removed, must equal the plain render; a template that inspects message
text so that markers change its output gets the record rejected (`template_changes_text`), never
a guess. Where a template marks assistant output with `{% generation %}` blocks, those spans are
used as they are (plus the stop token when the block leaves it out).
"""

from __future__ import annotations

import json
import re
import threading
from datetime import datetime
from typing import Any, Iterator, Mapping, Sequence

from . import limits, plans
from ..config import ConfigError
from ..read.formats import Conversation, FormatError, Message

# Markers: code points of Supplementary Private Use Area-B, two per marked text (open, close).
_MARK0 = 0x100000
_MARK_RE = re.compile("[\U00100000-\U0010FFFD]")
_MARK_SPLIT = re.compile("([\U00100000-\U0010FFFD])")
_MAX_MARKS = 0xFFFD // 2
_EMPTY_THINK = re.compile(r"\s*<(think|thinking|seed:think)>\s*</\1>\s*")
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")

Segment = tuple[str, "int | None"]


def compile_template(source: str, planning: bool = False):
    """Compile a chat template in the sandbox transformers uses (same filters, globals and
    whitespace rules), with `{% generation %}` blocks recorded as character spans; with `planning`,
    for renders with `plans.Slot` texts (written as characters from `_MARK0` on)."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark", []), [], [], body).set_lineno(lineno)

        def _mark(self, caller):  # brackets the block's output with markers of their own
            return f"{_GEN_OPEN}{caller()}{_GEN_CLOSE}"

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Sandbox(limits.guarded_sandbox(ImmutableSandboxedEnvironment)):
        def getattr(self, obj, attribute):
            # `message.content` on a plain dict: the item (or undefined), as the sandbox would return
            # after failing the attribute lookup, without raising and catching errors each time
            if type(obj) is dict and attribute not in _DICT_ATTRS:
                return obj[attribute] if attribute in obj else self.undefined(obj=obj, name=attribute)
            return super().getattr(obj, attribute)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       dict=dict, namespace=jinja2.utils.Namespace)
    if planning:
        plans.planning_environment(env, _MARK0, _MARK_SPLIT)
    limits.guard(env)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"the chat template is not valid Jinja (line {e.lineno}): {e.message}") from None


def _written(pieces: Iterator[str]) -> str:
    """A render's output, its size and time checked piece by piece (`limits.BUDGET`)."""
    out, size = [], 0
    for piece in pieces:
        size += len(piece)
        limits.BUDGET.check_size(size)
        limits.BUDGET.check_time()
        out.append(piece)
    return "".join(out)


_DICT_ATTRS = frozenset(dir(dict))
_GEN_OPEN, _GEN_CLOSE = "\U0010FFFC", "\U0010FFFD"  # reserved: never a text marker (see _MAX_MARKS)


class ChatTemplate:
    """One Jinja chat template, ready to render conversations into segments `(text, group)`.

    Args:
        source: the template text.
        variables: what the template may read besides messages (bos_token, eos_token, ...).
        stop_tokens: strings that end an assistant turn (EOS, generation_config eos ids, --stop-token).
        special_tokens: the tokenizer's special token strings (a turn may end with one).
        added_tokens: all its added tokens (where the header may be cut short).
        kwargs: extra template variables (`--template-kwarg`, e.g. enable_thinking=false).
        max_seconds, max_chars: a render's bounds (`limits`); None: unbounded.
        name: what messages call the template.
    """

    def __init__(self, source: str, variables: Mapping[str, Any], stop_tokens: Sequence[str],
                 special_tokens: Sequence[str], added_tokens: Sequence[str] = (),
                 kwargs: Mapping[str, Any] | None = None, max_seconds: float | None = None,
                 max_chars: int | None = None, name: str = "the tokenizer's chat_template") -> None:
        self.max_seconds, self.max_chars, self.name = max_seconds, max_chars, name
        self.template = compile_template(source)
        self.context = {**self.template.globals, **variables, **(kwargs or {})}
        self.generation_blocks = bool(_GENERATION_RE.search(source))
        self.captures = _captures_output(self.template.environment, source)
        self.stop_tokens = [s for s in dict.fromkeys(stop_tokens) if s]
        self.stop_re = _alternation(self.stop_tokens)
        self.special_re = _alternation(special_tokens)
        self.boundaries = set(special_tokens) | set(added_tokens) | set(self.stop_tokens)
        with self.bound():  # the probes below, as one conversation
            self.header, self.user_tail, self.think_at = self._header()
        self.headers = self._header_prefixes()
        self.source = source
        self._plans: dict[tuple, list[_Plan]] = {}
        self._planning = None  # the template compiled for plans, on first use

    # -- the one render -----------------------------------------------------------------------
    def segments(self, conv: Conversation) -> list[Segment]:
        """The rendered conversation cut into untrained text (group None) and trained assistant
        turns (group = the turn's index among assistant turns).

        From the plan of its shape where there is one (`plans`); else rendered. Tool calls go in the
        Hugging Face form first; a template that fails on it gets the OpenAI form (arguments as text:
        DeepSeek-V3 concatenates them). Content is never made up: a template that fails on a call
        without content fails, as in transformers, and the record is rejected with its error."""
        with self.bound():
            return self._segments_of(conv)

    def _segments_of(self, conv: Conversation) -> list[Segment]:
        if not self.generation_blocks:
            key = _shape(conv)
            if key is not None:
                segments = self._planned(key, conv.messages)
                if segments is not None:
                    return segments
        try:
            return self._segments(conv, openai=False)
        except FormatError as e:
            if e.reason != "template_error" or not any(m.tool_calls for m in conv.messages):
                raise
            try:
                return self._segments(conv, openai=True)
            except FormatError as again:  # say why the form it renders could not be located
                raise (e if again.reason == "template_error" else again) from None

    def _segments(self, conv: Conversation, openai: bool) -> list[Segment]:
        tools = _tool_schemas(conv.tools)
        marked, owners = _marked_messages(conv.messages, openai)
        _WATCH.log = log = []
        try:
            raw = self.render(marked, tools)
        finally:
            _WATCH.log = []
        text, marks, opens, gen = _strip_marks(raw, owners)
        if (log or self.captures) and text != self._plain(conv, tools, openai):
            raise FormatError("the chat template changes its output when message text is marked (it inspects "
                              "the text, e.g. with startswith or ==), so trained spans cannot be located",
                              "template_changes_text")
        if self.generation_blocks:
            spans = self._generation_spans(text, gen)
        else:
            spans = self._turn_spans(text, conv.messages, marks, opens)
        return self._cut(text, spans)

    def _planned(self, key: tuple, messages: list[Message]) -> list[Segment] | None:
        """The segments of a conversation of shape `key` from the first of the shape's plans whose
        guards its texts pass (`plans.guards_hold`), planning it where none does; None where that
        plan is one of a render that failed (the conversation is rendered)."""
        variants = self._plans.get(key)
        if variants is None:
            if len(self._plans) >= _MAX_PLANS:  # beyond that many shapes, new ones are rendered
                return None
            variants = self._plans[key] = []
        cores = None
        for plan in variants:
            cores = cores or plan.cores(messages)
            if plans.guards_hold(plan.guards, cores):
                return plan.segments(cores)
        if len(variants) >= _MAX_VARIANTS:  # texts that the template answers about in too many ways
            return None
        plan = self._plan(messages)
        variants.append(plan)
        return plan.segments(cores or plan.cores(messages))

    def _plan(self, messages: list[Message]) -> _Plan:
        """Render a conversation's shape with slots for its texts (`plans`), the template's questions
        answered from the conversation's texts. The plan has no segments where the template does
        something with a text that a slot cannot stand for, or writes texts out of message order."""
        sources: list[tuple[int, str]] = []
        planning = plans.Planning()

        def slot(i: int, key: str, value: str) -> str | plans.Slot:
            if not value:  # an empty text is part of the shape
                return value
            sources.append((i, _TEXT_KEYS[key]))
            return planning.slot(value)

        chat = _chat_messages(messages, False, slot)
        if len(sources) > _MAX_MARKS:  # rendering says why
            return _Plan(None, sources, [])
        if self._planning is None:
            self._planning = compile_template(self.source, planning=True)
        try:
            with planning:
                text = self.render(chat, None, template=self._planning)
        except Exception:  # plans.Unsupported, or the template's own error (which rendering will report)
            return _Plan(None, sources, planning.guards)
        marks: dict[int, tuple[int, int]] = {}
        owner = -1
        for m in _MARK_RE.finditer(text):
            i = sources[ord(m.group()) - _MARK0][0]
            if i < owner:  # a text written after a later message's: turns are not where they seem
                return _Plan(None, sources, planning.guards)
            owner, at = i, m.start()
            marks[i] = (marks[i][0] if i in marks else at, at + 1)
        try:
            spans = self._turn_spans(text, messages, marks)
        except FormatError:  # rendering will say so, record by record
            return _Plan(None, sources, planning.guards)
        return _Plan(self._cut(text, spans), sources, planning.guards)

    def _plain(self, conv: Conversation, tools: list | None, openai: bool) -> str:
        plain = self.render([m.to_chat(openai) for m in conv.messages], tools)
        return plain.replace(_GEN_OPEN, "").replace(_GEN_CLOSE, "") if self.generation_blocks else plain

    def render(self, messages: list[dict[str, Any]], tools: list | None, add_generation_prompt: bool = False,
               template=None, variables: Mapping[str, Any] | None = None) -> str:
        """`template.render(...)` (the chat template, or `template`: its planning compilation), less its
        per-call copy of the environment's globals (a ChainMap, slow to copy): they are merged once into
        `self.context`, which each render extends."""
        t = template or self.template
        try:
            with self.bound():
                ctx = t.new_context({**self.context, **(variables or {}), "messages": messages, "tools": tools,
                                     "documents": None, "add_generation_prompt": add_generation_prompt}, shared=True)
                return _written(t.root_render_func(ctx))
        except limits.TemplateLimit as e:
            raise FormatError(self._past_limit(str(e)), "template_limit") from None
        except Exception as e:  # Jinja raises anything; report it as a bad record
            raise FormatError(f"{self.name} failed: {type(e).__name__}: {e}", "template_error") from None

    def bound(self):
        """The bounds of one conversation's renders, all of them together (`limits.Budget`)."""
        return limits.BUDGET.bound(self.max_seconds, self.max_chars)

    def _past_limit(self, which: str, where: str = "") -> str:
        """A `template_limit` message; `which`: "time" or "size" (`limits.TemplateLimit`)."""
        if which == "time":
            return (f"{self.name} ran longer than max_render_seconds ({self.max_seconds:g} s){where}; raise "
                    "--max-render-seconds if the template is right, else fix its loops")
        return (f"{self.name} built a string or list of more than max_render_chars ({self.max_chars:,}){where}; "
                "raise --max-render-chars if the template is right, else fix it")

    # -- spans ---------------------------------------------------------------------------------
    def _turn_spans(self, text: str, messages: list[Message], marks: dict[int, tuple[int, int]],
                    opens: dict[int, list[int]] | None = None) -> list[tuple]:
        """(start, end, append_stop, group) per trained piece of each assistant turn, from its header and
        stop token. A turn is one piece, or two where the template writes the tool results that answer
        it inside the turn, before (some of) the turn's own text (Gemma 4): the call up to its stop token,
        then from the turn's first text after the results (`opens`: where each text of a message starts;
        plans, which never interleave messages, need none); the results are never trained."""
        spans, done, group = [], 0, 0
        for i, m in enumerate(messages):
            if m.role != "assistant":
                if i in marks:
                    done = max(done, marks[i][1])
                continue
            if i not in marks and (m.content or "").strip() and not m.tool_calls:
                raise FormatError(f"messages[{i}]: the chat template writes none of this assistant turn's text, so "
                                  "only its end would be trained; a template must render each message's content",
                                  "template_drops_text")
            bound = next((marks[j][0] for j in range(i + 1, len(messages)) if j in marks), len(text))
            first, last = marks.get(i, (bound, None))
            start = self._turn_start(text, done, min(first, bound), bound, i)
            if last is not None and bound < last:  # results written before some of the turn's own text
                cut = self._call_end(text, start, bound)
                if cut > start:
                    spans.append((start, cut, False, group))
                later = [marks[j] for j in range(i + 1, len(messages)) if j in marks]
                results_end = max(b for a, b in later if a < last)
                start = min((o for o in opens[i] if o > results_end), default=results_end)
                bound = min((a for a, _ in later if a > last), default=len(text))
            if last is None:
                last = start
            end, append = self._turn_end(text, last, bound)
            if end < 0:
                raise FormatError(self._not_located(text, i, start, bound, "no stop token (a stop string or special "
                                                    "token) ends this assistant turn"), "turn_not_located")
            if end <= start and not append:
                raise FormatError(self._not_located(text, i, start, bound, "the assistant turn renders no text "
                                                    "of its own"), "turn_not_located")
            spans.append((start, end, append, group))
            done, group = end, group + 1
        return spans

    def _turn_start(self, text: str, done: int, first: int, bound: int, i: int) -> int:
        if not self.header:  # no generation prompt (Mistral): the turn starts with its text,
            if first < bound:  # or, with none (a tool call), after the user turn's end
                return first
            at = text.find(self.user_tail, done, first) if self.user_tail else -1
            if at < 0:
                raise FormatError(self._not_located(text, i, done, bound, "this chat template has no generation "
                                                    "prompt and the turn no text of its own"), "turn_not_located")
            return at + len(self.user_tail)
        for h in self.headers:
            at = text.find(h, done, first)
            if at >= 0:
                return self._past_empty_think(text, at, at + len(h), first)
        if first < bound:  # no header here (DeepSeek writes none after tool outputs): start at its text
            return first
        # neither header nor text (DeepSeek-V3's tool-call turns after the first): the turn is what
        # follows the previous message's text and the token that closes it, if the template writes one
        close = self.special_re.match(text, done) if self.special_re else None
        start = close.end() if close else done
        if not done or not text[start:bound].strip():
            raise FormatError(self._not_located(text, i, done, bound, "the chat template writes neither its "
                                                f"assistant header {self.header!r} nor any text of this turn"),
                              "turn_not_located")
        return start

    @staticmethod
    def _past_empty_think(text: str, at: int, start: int, first: int) -> int:
        """Where a turn whose header ends at `start` begins: after an empty think block that the header
        reaches into or that follows it (trained all or nothing: not)."""
        think = _EMPTY_THINK.search(text, at, first)
        return think.end() if think and think.start() <= start <= think.end() else start

    def _turn_end(self, text: str, last: int, bound: int) -> tuple[int, bool]:
        """Where the turn whose last text ends at `last` ends, and whether the stop token is appended;
        -1 where no stop token ends it: neither a stop string nor a special token follows, but the token
        the template ends its turns with, which is no stop token of this tokenizer (`<|im_end|>` added as a
        plain token)."""
        for pattern in (self.stop_re, self.special_re):
            m = pattern.search(text, last, bound) if pattern else None
            if m:
                return m.end(), False
        if self._unstopped_marker(text, last, bound) in self.boundaries:
            return -1, False
        if bound == len(text) and self.stop_tokens:
            return len(text), True  # the template writes no stop token after the last turn
        return last, False

    def _call_end(self, text: str, start: int, results: int) -> int:
        """The end of a tool call written before its results inside the turn: its stop token (Gemma 4's
        `<|tool_response>`), else the last special token before the results."""
        m = self.stop_re.search(text, start, results) if self.stop_re else None
        if m is None and self.special_re:
            m = next(reversed(list(self.special_re.finditer(text, start, results))), None)
        return m.end() if m else start

    def _not_located(self, text: str, i: int, start: int, bound: int, why: str) -> str:
        """Why turn `i` cannot be located, what the template wrote there, and the fix when there is one:
        the token that ends the template's user turns, written in this turn but not a stop token."""
        a, b = max(0, start - 40), min(len(text), bound + 40)
        around = repr(text[a:b]) if b - a <= 320 else f"{text[a:a + 200]!r} ... {text[b - 100:b]!r}"
        message = f"messages[{i}]: {why}; the template wrote ...{around}... around it"
        end = self._unstopped_marker(text, start, bound)
        if end:
            message += (f"; {end!r} ends the template's turns but is not a stop token of this tokenizer: "
                        f"add --stop-token {end!r}")
        return message

    def _unstopped_marker(self, text: str, start: int, bound: int) -> str | None:
        """The token that ends the template's user turns (`_turn_marker`) where it is written in
        `text[start:bound]` (or runs past `bound`) and is no stop token."""
        end = self._turn_marker()
        return end if end and end not in self.stop_tokens and end in text[start:bound + len(end)] else None

    def _turn_marker(self) -> str | None:
        """The token the template writes right after a user turn's text (`<|im_end|>`), if any."""
        tail = self.user_tail.lstrip()
        if not tail:
            return None
        known = [b for b in self.boundaries if tail.startswith(b)]
        return max(known, key=len) if known else tail.split()[0]

    def _generation_spans(self, text: str, gen: list[tuple[int, int]]) -> list[tuple]:
        """The template's own `{% generation %}` spans; one that holds no stop token takes the stop
        (or special) token right after it, or, at the very end, an appended EOS."""
        spans = []
        for group, (a, b) in enumerate(gen):
            append = False
            if not (self.stop_re and self.stop_re.search(text, a, b)):
                m = next((p.match(text, b) for p in (self.stop_re, self.special_re) if p and p.match(text, b)), None)
                b, append = (m.end(), False) if m else (b, b == len(text) and bool(self.stop_tokens))
            spans.append((a, b, append, group))
        return spans

    def _cut(self, text: str, spans: list[tuple]) -> list[Segment]:
        segs: list[Segment] = []
        pos = 0
        for a, b, append, group in spans:
            segs += [(text[pos:a], None), (text[a:b], group)]
            if append:
                segs.append((self.stop_tokens[0], group))
            pos = b
        segs.append((text[pos:], None))
        return [s for s in segs if s[0]]

    # -- the header, found once ----------------------------------------------------------------
    def _header(self) -> tuple[str, str, int]:
        """What `add_generation_prompt=True` adds after a user turn's text, less what the template
        writes there anyway; that user turn's own end (`[/INST]`); and where, in the header, an empty
        think block the prompt pre-fills starts (`len(header)` if none). A template that writes its
        prompt whether or not it is asked for (Command R7B) has that written prompt as its header, its
        part that turns write too (`_written_header`) as where a pre-filled block starts.

        Rendered without tools, else with an empty list, else with one tool (Hermes' tool-use
        template iterates `tools` unguarded)."""
        probe = f"{_open(0)}x{_close(0)}"
        for tools in _PROBE_TOOLS:
            for msgs in ([{"role": "user", "content": probe}],
                         [{"role": "system", "content": "s"}, {"role": "user", "content": probe}]):
                try:
                    header, tail = self._prompt_after(msgs, tools)
                except FormatError as e:
                    if e.reason == "template_limit":  # on a one-message conversation: on every record
                        which = "time" if "max_render_seconds" in str(e) else "size"
                        raise ConfigError(self._past_limit(which, " on a one-message conversation, so it would "
                                                                  "on every record (nothing was built)")) from None
                    continue
                if not header:  # the prompt adds nothing: Mistral writes no header, Command R7B always writes it
                    written = self._written_header(msgs, tools, tail)
                    return (tail, tail, len(written)) if written else ("", tail, 0)
                return header, tail, self._prefilled_think(msgs, tools, header)
        return "", "", 0  # fails on [user]: records say why; any that render start turns at their text

    def _written_header(self, msgs: list[dict], tools: list | None, tail: str) -> str:
        """The header of a template whose generation prompt adds nothing because it writes one anyway
        (Command R7B): what it writes after a user turn's text both where the conversation ends (`tail`)
        and before an assistant turn's text, up to a token or line boundary, where that is less than the
        tail (`<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>`, then an empty thinking
        block or the response's opener). "" where the tail is the user turn's end alone (Mistral's
        `[/INST]`): turns start at their text."""
        answer = {"role": "assistant", "content": f"{_open(1)}y{_close(1)}"}
        try:
            text = self.render([*msgs, answer], tools)
        except FormatError:
            return ""
        between = _MARK_RE.sub("", text.split(_close(0), 1)[-1].split(_open(1), 1)[0])
        n = _common_prefix(tail, between)
        return "" if n == len(tail) else tail[:max(c for c in self._cuts(tail) | {0} if c <= n)]

    def _prompt_after(self, msgs: list[dict], tools: list | None, **variables) -> tuple[str, str]:
        with_prompt = self.render(msgs, tools, True, variables=variables)
        without = self.render(msgs, tools, False, variables=variables)
        a, b = with_prompt.rsplit(_close(0), 1)[-1], without.rsplit(_close(0), 1)[-1]
        return _MARK_RE.sub("", a[_common_prefix(a, b):]), _MARK_RE.sub("", b)

    def _prefilled_think(self, msgs: list[dict], tools: list | None, header: str) -> int:
        """Where the empty think block that the header pre-fills starts (Qwen3 with thinking off
        `<think>\\n\\n</think>\\n\\n`, Gemma 4 `<|channel>thought\\n<channel|>`): the end of the header
        with thinking switched the other way where that is a prefix of it, else of an empty
        `<think></think>` block at its end; `len(header)` where there is none."""
        for switch in _THINKING_SWITCHES:
            for value in (True, False):
                try:
                    other, _ = self._prompt_after(msgs, tools, **{switch: value})
                except FormatError:
                    continue
                if other and len(other) < len(header) and header.startswith(other):
                    return len(other)
        m = _EMPTY_THINK.search(header)
        return header.index("<", m.start()) if m and m.end() == len(header) else len(header)

    def _header_prefixes(self) -> list[str]:
        """The header, then its prefixes that end at a token or line boundary, longest first; none
        that ends inside the empty think block the header pre-fills (a turn that writes its own
        reasoning there starts before the block's opener, which is then trained)."""
        h = self.header
        cuts = self._cuts(h) | {len(h)}
        return [h[:c] for c in sorted(cuts, reverse=True) if c > 0 and (c <= self.think_at or c == len(h))]

    def _cuts(self, text: str) -> set[int]:
        """The positions in `text` at a token boundary (either side of a special or added token) or
        after a newline."""
        cuts = set()
        for i in range(len(text)):
            if text[i] == "\n":
                cuts.add(i + 1)
            for tok in self.boundaries:
                if text.startswith(tok, i):
                    cuts.update((i, i + len(tok)))
        return cuts


def _captures_output(env, source: str) -> bool:
    """Whether the template turns rendered output into values it can inspect or transform: `{% set
    x %}` and `{% filter %}` blocks, macros, call blocks, autoescape (not `{% generation %}` blocks,
    which only bracket theirs). Marked texts inside such output are not watched (GLM-4.5 tests
    `visible_text(m.content).endswith("/nothink")`), so renders of these templates are always checked
    against the plain render. (Plans see such output as `plans.Joined` values, opaque as slots are.)"""
    from jinja2 import nodes

    kinds = (nodes.AssignBlock, nodes.FilterBlock, nodes.Macro, nodes.CallBlock, nodes.Block,
             nodes.ScopedEvalContextModifier, nodes.EvalContextModifier)
    for node in env.parse(source).find_all(kinds):
        call = getattr(node, "call", None)
        if not (isinstance(node, nodes.CallBlock) and isinstance(call.node, nodes.ExtensionAttribute)
                and call.node.name == "_mark"):
            return True
    return False


_PROBE_TOOLS = (None, [], [{"type": "function", "function": {"name": "f", "description": "f", "parameters": {
    "type": "object", "properties": {"x": {"type": "string", "description": "x"}}, "required": ["x"]}}}])
_THINKING_SWITCHES = ("enable_thinking", "thinking")  # the variables templates turn reasoning on with

_MAX_PLANS = 4096  # shapes remembered per template (a dataset has a handful; beyond, conversations render)
_MAX_VARIANTS = 8  # plans per shape, for texts the template answers about differently


class _Plan:
    """A shape's segments with its texts left out: each segment a list of literal strings and
    indices into `sources`, the (message index, attribute) of each text, written stripped; valid for
    the conversations whose texts pass `guards` (`plans.guards_hold`). Without segments (None), those
    conversations are rendered."""

    def __init__(self, segments: list[Segment] | None, sources: list[tuple[int, str]], guards: list[tuple]) -> None:
        self.sources, self.guards = sources, guards
        self.parts: list[tuple[list, int | None]] | None = None if segments is None else []
        for seg, group in segments or ():
            pieces = _MARK_SPLIT.split(seg)  # text, slot, text, slot, ..., text
            parts = [ord(p) - _MARK0 if j % 2 else p for j, p in enumerate(pieces) if p]
            self.parts.append((parts, group))

    def cores(self, messages: list[Message]) -> list[str]:
        """The texts of a conversation of the shape, stripped, in slot order."""
        return [getattr(messages[i], attr).strip() for i, attr in self.sources]

    def segments(self, cores: list[str] | None) -> list[Segment] | None:
        if self.parts is None:
            return None
        return [("".join([p if p.__class__ is str else cores[p] for p in parts]), group)
                for parts, group in self.parts]


def _shape(conv: Conversation) -> tuple | None:
    """What a conversation's plan depends on: roles, and per text whether it is absent or empty, and
    its edge whitespace; None for conversations a plan cannot stand for (tools, tool calls,
    all-whitespace texts, reserved characters)."""
    if conv.tools:
        return None
    key = []
    for m in conv.messages:
        if m.tool_calls is not None or m.name is not None or m.tool_call_id is not None:
            return None
        state = []
        for text in (m.content, m.reasoning):
            if not text:
                state.append(text)
            elif text.isspace() or (not text.isascii() and _MARK_RE.search(text)):
                return None
            elif text[0].isspace() or text[-1].isspace():  # the edge whitespace itself
                state.append(plans.edges(text))
            else:
                state.append(0)
        key.append((m.role, *state))
    return tuple(key)


def _common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of `a` and `b`."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _alternation(strings: Sequence[str]) -> re.Pattern | None:
    strings = sorted({s for s in strings if s}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, strings))) if strings else None


_WATCH = threading.local()  # .log: what the template did to a marked text in the current render


class _Watched(str):
    """A marked text that notes (in `_WATCH.log`) when the template inspects it: compares, measures,
    indexes, searches or transforms it. Only then can the markers change what the template writes,
    and only then is the plain render needed to check. Trimming whitespace, concatenating, printing
    and truth tests are safe (markers sit inside the whitespace, and "" is never marked)."""

    __slots__ = ()

    def __bool__(self):
        return str.__len__(self) > 0

    def __add__(self, other):
        return _Watched(str.__add__(self, other))

    def __radd__(self, other):
        return _Watched(str.__add__(other, self)) if isinstance(other, str) else NotImplemented

    def strip(self, chars=None):
        return self._trim(str.strip, chars)

    def lstrip(self, chars=None):
        return self._trim(str.lstrip, chars)

    def rstrip(self, chars=None):
        return self._trim(str.rstrip, chars)

    def _trim(self, fn, chars):
        if chars is not None and not str.isspace(chars):
            _WATCH.log.append(fn.__name__)
        return _Watched(fn(self, chars))


def _inspected(name):
    def method(self, *args, **kwargs):
        _WATCH.log.append(name)
        return getattr(str, name)(self, *args, **kwargs)
    return method


for _name in [n for n in dir(str) if not n.startswith("_") and n not in ("strip", "lstrip", "rstrip")] + [
        "__len__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__getitem__", "__iter__",
        "__mod__", "__mul__", "__rmod__", "__rmul__", "__format__"]:
    setattr(_Watched, _name, _inspected(_name))
_Watched.__hash__ = str.__hash__


def _open(k: int) -> str:
    return chr(_MARK0 + 2 * k)


def _close(k: int) -> str:
    return chr(_MARK0 + 2 * k + 1)


def _wrap(s: str, k: int) -> str:
    """`s` with markers inside its leading/trailing whitespace, so that strip() keeps them."""
    if s and not (s[0].isspace() or s[-1].isspace()):  # the common case: nothing to step over
        return f"{_open(k)}{s}{_close(k)}"
    core = s.strip()
    if not core:  # "" stays "" (templates test it for truth); whitespace keeps its place
        return s and s + _open(k) + _close(k)
    lead = len(s) - len(s.lstrip())
    return f"{s[:lead]}{_open(k)}{core}{_close(k)}{s[lead + len(core):]}"


_TEXT_KEYS = {"content": "content", "reasoning_content": "reasoning"}  # chat key -> `Message` attribute


def _chat_messages(messages: list[Message], openai: bool, replace) -> list[dict[str, Any]]:
    """Messages as the template reads them, each text (`_TEXT_KEYS`) given as `replace(i, key, text)`;
    gpt-oss's `thinking` is the reasoning as replaced."""
    out = []
    for i, m in enumerate(messages):
        d = m.to_chat(openai)
        for key in _TEXT_KEYS:
            value = d.get(key)
            if isinstance(value, str):
                d[key] = replace(i, key, value)
        if "thinking" in d:
            d["thinking"] = d["reasoning_content"]
        out.append(d)
    return out


def _marked_messages(messages: list[Message], openai: bool) -> tuple[list[dict[str, Any]], list[int]]:
    """Messages as the template reads them, each text wrapped in markers (and watched, see
    `_Watched`); `owners[k]` is the message index of marker pair k."""
    owners: list[int] = []

    def mark(i: int, key: str, value: str) -> _Watched:
        if _MARK_RE.search(value):
            raise FormatError(f"messages[{i}].{key} holds characters of Unicode's private use "
                              "plane 16, which sftprep reserves to locate text in chat templates",
                              "reserved_characters")
        if len(owners) >= _MAX_MARKS - 2:
            raise FormatError("too many messages in one conversation to locate", "too_many_turns")
        owners.append(i)
        return _Watched(_wrap(value, len(owners) - 1))

    return _chat_messages(messages, openai, mark), owners


def _strip_marks(raw: str, owners: list[int]) -> tuple[str, dict, dict, list[tuple[int, int]]]:
    """The text without markers; per message, where its first and last marker were (in the clean
    text) and where each of its texts starts; and the `{% generation %}` spans."""
    parts = _MARK_SPLIT.split(raw)  # text, marker, text, marker, ..., text
    pieces = parts[0::2]
    marks: dict[int, tuple[int, int]] = {}
    opens: dict[int, list[int]] = {}
    gen: list[tuple[int, int]] = []
    at, gen_start = 0, None
    for piece, c in zip(pieces, parts[1::2]):
        at += len(piece)
        if c == _GEN_OPEN:
            gen_start = at
        elif c == _GEN_CLOSE:
            if gen_start is not None:
                gen.append((gen_start, at))
            gen_start = None
        else:
            k = ord(c) - _MARK0
            i = owners[k >> 1]
            first = marks[i][0] if i in marks else at
            marks[i] = (first, at)
            if not k & 1:
                opens.setdefault(i, []).append(at)
    return "".join(pieces), marks, opens, gen


def _tool_schemas(tools: str | None) -> list | None:
    """`tools` as templates expect them: a list of {"type": "function", "function": schema}."""
    if not tools:
        return None
    try:
        parsed = json.loads(tools)
    except json.JSONDecodeError:
        raise FormatError('field "tools" is not valid JSON', "wrong_type") from None
    if isinstance(parsed, dict):
        parsed = [parsed]
    if not isinstance(parsed, list) or not all(isinstance(t, dict) for t in parsed):
        raise FormatError('field "tools" must be a list of function schemas', "wrong_type")
    return [t if "function" in t or "type" in t else {"type": "function", "function": t} for t in parsed]
