"""Render: a `Conversation` -> one string plus the character spans that are trained.

Template kinds (one per build):

- a preset name (`chatml`, `alpaca`, `vicuna`, `qa`, `mistral`, `llama2`), see `presets.py`;
- `tokenizer`: the tokenizer's own Jinja `chat_template` (or a `--chat-template` file in its place),
  rendered once per conversation with its trained spans located in the output (`chat.py`); also the
  default for chat records when the tokenizer has a chat_template and no template is named;
- `module:function`: a Python callable taking the record's fields and returning a list of
  `(text, trained)` pairs;
- a `prompt`/`completion` pair of format strings over the record's fields;
- none: `text` as it is, `prompt` + `completion` concatenated as they are (TRL's behaviour),
  optionally with TRL's `response_template`/`instruction_template` matched on characters.

Rendering first yields *segments* `(text, group)`: `group` is None for text never trained, else
the index of the assistant turn it belongs to. The train-on policy then picks groups:
`assistant`/`completion` all of them, `last` the final one, `all` the whole text.
Where the template has no end-of-turn marker, the tokenizer's EOS is appended to the trained text.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Mapping

from ..config import ConfigError, TemplateConfig, did_you_mean
from ..read.formats import Conversation, FormatError, Message
from ..tokenizer import added_strings, chat_variables, stop_strings
from .chat import ChatTemplate
from .presets import PRESETS, Preset

Span = tuple[int, int]
Segment = tuple[str, "int | None"]

__all__ = ["PRESETS", "Renderer", "Span"]


class Renderer:
    """Turns conversations into `(text, trained spans)`; built once per build.

    Args:
        cfg: the template section of the build config.
        train_on: completion | assistant | last | all | auto.
        eos: the tokenizer's EOS string (None if it has none).
        tokenizer: its special tokens and `chat_template` (for presets' checks and Jinja templates).
        allow_code: let a `module:function` template import and run Python code.
    """

    def __init__(self, cfg: TemplateConfig, train_on: str = "auto", eos: str | None = None,
                 tokenizer: Any = None, allow_code: bool = False) -> None:
        self.cfg, self.train_on, self.eos, self.tokenizer = cfg, train_on, eos, tokenizer
        self.preset: Preset | None = None
        self.fn: Callable | None = None
        self.chat: ChatTemplate | None = None
        self.warnings: list[str] = []
        name = cfg.name
        self.template_file = _read_template_file(cfg.chat_template) if cfg.chat_template else None
        source = self.template_file or getattr(tokenizer, "chat_template", None)
        if name in (None, "tokenizer") and source:
            self.chat = ChatTemplate(source, chat_variables(tokenizer),
                                     stop_strings(tokenizer, cfg.stop_tokens),
                                     added_strings(tokenizer, special_only=True), added_strings(tokenizer),
                                     cfg.kwargs, cfg.max_render_seconds, cfg.max_render_chars,
                                     f"the chat template {cfg.chat_template}" if cfg.chat_template
                                     else "the tokenizer's chat_template")
        if name in (None, "none"):
            if not eos:
                raise ConfigError("the tokenizer has no eos_token, and without a chat template EOS is what "
                                  "ends each trained text (the model must learn to stop); use a tokenizer "
                                  "with an eos_token or a template with its own end marker (--template chatml)")
        elif name == "tokenizer":
            if self.chat is None:
                raise ConfigError("--template tokenizer: the tokenizer has no chat_template; "
                                  f"use a preset instead ({', '.join(PRESETS)})")
        elif name in PRESETS:
            self.preset = PRESETS[name]
            if "{eos}" in self.preset.eot and not eos:
                raise ConfigError(f"template {name!r} ends each assistant turn with EOS, but the "
                                  "tokenizer has no eos_token; pick a tokenizer with one or use chatml")
            self._check_markers(tokenizer)
        elif ":" in name:
            if not allow_code:
                raise ConfigError(f"template {name!r} names Python code: importing it runs that module, so a "
                                  "config that names code is code. If you trust it, pass --allow-code (Python: "
                                  "build(config, allow_code=True))")
            self.fn = _import_callable(name)
        else:
            raise ConfigError(f"unknown template {name!r}{did_you_mean(name, list(PRESETS))}; expected "
                              f"one of {', '.join(PRESETS)}, `tokenizer` or `module:function`")

    def _check_markers(self, tokenizer: Any) -> None:
        """A preset whose turn markers are not single tokens of this tokenizer still works, but the
        model learns them as several plain pieces: say so once (summary and manifest)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        missing = [m for m in self.preset.markers
                   if backend is not None and len(backend.encode(m, add_special_tokens=False).ids) != 1]
        if missing:
            self.warnings.append(f"template {self.preset.name!r}: {', '.join(missing)} "
                                 f"{'is' if len(missing) == 1 else 'are'} not a single token of this tokenizer, "
                                 "so the model learns each as several plain-text pieces; use a tokenizer that "
                                 "has them as special tokens (or --template tokenizer)")

    def overhead_text(self) -> str | None:
        """The text a one-turn conversation with empty messages renders to (None if not a chat template)."""
        if self.preset is None and self.cfg.name != "tokenizer":
            return None
        conv = Conversation("chat", [Message("user", ""), Message("assistant", "")])
        try:
            return "".join(s for s, _ in self._segments(conv))
        except FormatError:  # a template that refuses such turns: records will say why
            return None

    @property
    def description(self) -> str:
        c = self.cfg
        if c.prompt is not None:
            return "prompt/completion format strings"
        if c.response_template:
            return f"response_template {c.response_template!r}"
        if c.chat_template:  # the path is in the config; the file, in the build's tokenizer/ folder
            return f"chat template file {os.path.basename(c.chat_template)}"
        if c.name is None and self.chat is not None:
            return "tokenizer (default for chat records)"
        return c.name or "none (text as is)"

    @property
    def reads_fields(self) -> bool:
        """Whether the template reads the record's fields itself (format strings, a Python callable)."""
        return self.cfg.prompt is not None or self.fn is not None

    def uses_chat_template(self, conv: Conversation) -> bool:
        """Whether the Jinja chat template renders `conv` (`--template tokenizer`, or by default for
        chat records). It writes the whole sequence, BOS included where the model has one; otherwise
        the tokenizer's BOS goes in front."""
        return self.chat is not None and conv.kind != "text" and (
            self.cfg.name == "tokenizer" or (conv.kind == "chat" and self.cfg.prompt is None))

    def render(self, conv: Conversation) -> tuple[str, list[Span]]:
        """The full text of a conversation and its trained character spans (sorted, disjoint)."""
        segments = self._segments(conv)
        text = "".join(s for s, _ in segments)
        if self.cfg.response_template:
            spans = self._response_spans(text)
        else:
            spans = self._select(segments, conv)
        if not spans:
            raise FormatError("nothing to train on after rendering (no trained text)", "no_trained_text")
        return text, spans

    # -- segments -------------------------------------------------------------------------
    def _segments(self, conv: Conversation) -> list[Segment]:
        c = self.cfg
        if self.preset is not None:
            if conv.kind == "text":
                raise FormatError(f"a `text` record has no turns for template {c.name!r}; use no template, "
                                  "or records with prompt/completion or messages", "format_mismatch")
            return self._preset_segments(conv)
        if self.uses_chat_template(conv):
            return self.chat.segments(conv)
        if c.name == "tokenizer":
            raise FormatError("a `text` record has no turns for the tokenizer's chat template", "format_mismatch")
        if self.fn is not None:
            segs = self._callable_segments(conv)
        elif c.prompt is not None:
            segs = [(_format_fields(c.prompt, conv.fields, "prompt"), None),
                    (_format_fields(c.completion, conv.fields, "completion"), 0)]
        elif conv.kind == "text":
            segs = [(conv.text, 0)]
        elif conv.kind == "completion":
            user = next(m for m in conv.messages if m.role == "user")
            system = c.system if c.system is not None else next(
                (m.content for m in conv.messages if m.role == "system"), "")
            segs = [(system + user.content, None), (conv.messages[-1].content, 0)]
        else:
            raise FormatError("chat records need a template to be written as text: use "
                              "--template chatml (or another preset) or --template tokenizer", "format_mismatch")
        return self._with_eos(segs)

    def _with_eos(self, segs: list[Segment]) -> list[Segment]:
        """Append EOS to the last segment's group when the text does not end with it already."""
        if self.eos and not "".join(s for s, _ in segs).endswith(self.eos):
            segs.append((self.eos, segs[-1][1]))
        return segs

    def _preset_segments(self, conv: Conversation) -> list[Segment]:
        p = self.preset
        msgs = list(conv.messages)
        system = self.cfg.system if self.cfg.system is not None else p.default_system
        if msgs and msgs[0].role == "system":
            system = msgs.pop(0).content
        if conv.tools:
            system = p.tools.replace("{system}", system or "").replace("{tools}", conv.tools).lstrip()
        segs: list[Segment] = []
        if system and p.system_in_user:
            first = next((i for i, m in enumerate(msgs) if m.role == "user"), None)
            if first is not None:
                merged = p.system_in_user.replace("{system}", system).replace("{content}", msgs[first].text)
                msgs[first] = Message("user", merged)
        elif system:
            segs.append((p.system.replace("{content}", system), None))
        eot = p.eot.replace("{eos}", self.eos or "")
        group = 0
        for m in msgs:
            if m.role == "assistant":
                content = p.tool_call.replace("{content}", m.text) if m.tool_calls else m.text
                if m.reasoning is not None:  # written as a think block, trained with the answer
                    content = f"<think>\n{m.reasoning.strip()}\n</think>\n\n{content}"
                segs += [(p.assistant, None), (content + eot, group), (p.after, None)]
                group += 1
            else:
                fmt = p.tool if (m.role == "tool" and p.tool) else p.user
                segs.append((fmt.replace("{content}", m.text), None))
        return segs

    def _callable_segments(self, conv: Conversation) -> list[Segment]:
        try:
            out = self.fn(dict(conv.fields))
        except Exception as e:
            raise FormatError(f"template function {self.cfg.name} failed: {type(e).__name__}: {e}",
                              "template_error") from None
        if not isinstance(out, (list, tuple)) or not all(
                isinstance(s, (list, tuple)) and len(s) == 2 and isinstance(s[0], str) for s in out):
            raise FormatError(f"template function {self.cfg.name} must return a list of (text, trained) "
                              f"pairs, got {type(out).__name__}", "template_error")
        return [(text, i if trained else None) for i, (text, trained) in enumerate(out)]

    # -- policy -------------------------------------------------------------------------
    def _select(self, segments: list[Segment], conv: Conversation) -> list[Span]:
        policy = self.train_on
        if policy == "auto":
            policy = {"text": "all", "completion": "completion"}.get(conv.kind, "assistant")
        if conv.kind == "text" and policy != "all" and self.cfg.prompt is None and self.fn is None:
            raise ConfigError(f"--train-on {policy}: `text` records have no completion to pick out; use "
                              "--response-template to mark where completions start, or --train-on all")
        text_len = sum(len(s) for s, _ in segments)
        if policy == "all":
            return [(0, text_len)] if text_len else []
        groups = {g for _, g in segments if g is not None}
        if policy == "last" and groups:
            groups = {max(groups)}
        spans: list[Span] = []
        pos = 0
        for s, g in segments:
            if g in groups and s:
                if spans and spans[-1][1] == pos:
                    spans[-1] = (spans[-1][0], pos + len(s))
                else:
                    spans.append((pos, pos + len(s)))
            pos += len(s)
        return spans

    def _response_spans(self, text: str) -> list[Span]:
        """TRL's completion-only masking, on characters: train after each response marker up to the
        next instruction marker (or the end)."""
        resp, instr = self.cfg.response_template, self.cfg.instruction_template
        if self.train_on == "all":
            return [(0, len(text))]
        starts = _find_all(text, resp)
        if not starts:
            raise FormatError(f"response_template {resp!r} not found in the rendered text",
                              "response_template_not_found")
        if not instr:
            starts = starts[:1]
        ends = _find_all(text, instr) if instr else []
        spans = []
        for s in starts:
            begin = s + len(resp)
            end = min((e for e in ends if e >= begin), default=len(text))
            if end > begin and not (spans and spans[-1][1] > begin):
                spans.append((begin, end))
        if self.train_on == "last":
            spans = spans[-1:]
        return spans


def _find_all(text: str, needle: str) -> list[int]:
    out, i = [], text.find(needle)
    while i >= 0:
        out.append(i)
        i = text.find(needle, i + len(needle))
    return out


def _format_fields(fmt: str, fields: Mapping[str, Any], which: str) -> str:
    try:
        return fmt.format_map(fields)
    except KeyError as e:
        keys = ", ".join(sorted(fields)) or "(none)"
        raise FormatError(f"template {which} uses field {{{e.args[0]}}}, which the record lacks "
                          f"(keys found: {keys})", "missing_template_field") from None
    except (IndexError, ValueError) as e:
        raise ConfigError(f"template {which} format string {fmt!r} is invalid: {e}") from None


def _read_template_file(path: str) -> str:
    """The text of a `--chat-template` file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"--chat-template {path}: no such file (a Jinja chat template, e.g. the "
                          "`chat_template.jinja` of a model's Hub folder)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--chat-template {path}: cannot read it as UTF-8 text ({e})") from None


def _import_callable(spec: str) -> Callable:
    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"template {spec!r}: cannot import {attr!r} from module {module!r} ({e}); "
                          "is the module on PYTHONPATH?") from None
    if not callable(fn):
        raise ConfigError(f"template {spec!r} is not callable")
    return fn
