"""Normalize: one input record -> one `Conversation`.

Formats (auto-detected from the record's keys, or set with --format):

    text               {"text": ...}                                   language modelling
    prompt_completion  {"prompt": ..., "completion": ...}              (+ optional "system")
    messages           {"messages": [{"role", "content"}...], "tools"}  OpenAI chat
    sharegpt           {"conversations": [{"from", "value"}...], "tools", "system"}
    alpaca             {"instruction", "input", "output"}              (+ "system", "history")

Your own field names map onto ours with `fields` (--field prompt=question --field completion=answer).
Errors are `FormatError`s that name the field and what was expected; the caller adds file:line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping  # (typing.Mapping makes isinstance checks several times slower)
from dataclasses import dataclass, field
from typing import Any

from ..config import FORMATS, did_you_mean


class FormatError(ValueError):
    """A record does not fit its format. `reason` is a short category for counting."""

    def __init__(self, message: str, reason: str = "bad_record") -> None:
        super().__init__(message)
        self.reason = reason


ROLES = ("system", "user", "assistant", "tool")


def _json_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@dataclass(slots=True)
class Message:
    """One turn. Chat templates get the structured fields (`tool_calls`, `reasoning`, `name`,
    `tool_call_id`) as the Hugging Face chat format has them; presets write `text`."""

    role: str  # one of ROLES
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None
    """OpenAI form: [{"type": "function", "function": {"name", "arguments": dict}}, ...]."""
    reasoning: str | None = None  # `reasoning_content` / `thinking` of an assistant turn
    name: str | None = None  # a tool result's function name
    tool_call_id: str | None = None
    call_text: str | None = None  # the call as the source wrote it (ShareGPT `function_call` value)

    @property
    def text(self) -> str:
        """The turn as plain text, for presets: content, or the function call as JSON."""
        if self.tool_calls is None:
            return self.content or ""
        if self.call_text is not None:
            return self.call_text
        calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in self.tool_calls]
        call = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
        return f"{self.content}\n{call}" if self.content else call

    def to_chat(self, openai: bool = False) -> dict[str, Any]:
        """The message as a chat template reads it: the Hugging Face chat format (call arguments as
        objects, None-valued keys left out, as transformers does), or with `openai` the OpenAI wire
        format some templates expect instead (arguments as JSON text). Content is the record's own:
        a template that needs text where the record has none fails, as it does in transformers."""
        calls, content = self.tool_calls, self.content
        if calls is None and self.reasoning is None and self.name is None and self.tool_call_id is None:
            return {"role": self.role} if content is None else {"role": self.role, "content": content}
        d: dict[str, Any] = {"role": self.role}
        if openai and calls:
            calls = [{**c, "function": {**c["function"], "arguments": _json_text(c["function"]["arguments"])}}
                     for c in calls]
        for key, value in (("content", content), ("reasoning_content", self.reasoning),
                           ("tool_calls", calls), ("name", self.name),
                           ("tool_call_id", self.tool_call_id)):
            if value is not None:
                d[key] = value
        if self.reasoning is not None:
            d["thinking"] = self.reasoning  # gpt-oss templates read this name
        return d


@dataclass(slots=True)
class Conversation:
    """A normalized record.

    kind: "text" (train on all of `text`), "completion" (prompt -> completion pair, as two
    messages) or "chat" (any number of turns). `fields` keeps the record's own fields (after the
    name mapping) for format-string templates.
    """

    kind: str
    messages: list[Message] = field(default_factory=list)
    text: str | None = None
    tools: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                   "system": "system", "function_call": "assistant", "observation": "tool",
                   "tool": "tool", "function": "tool"}
_MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                  "tool": "tool", "function": "tool", "ipython": "tool"}


def detect(rec: Mapping[str, Any]) -> str:
    """The format of a record, from its keys; raises `FormatError` when none or several fit."""
    found = []
    if "messages" in rec:
        found.append("messages")
    if "conversations" in rec:
        found.append("sharegpt")
    if "instruction" in rec and "output" in rec:
        found.append("alpaca")
    if "prompt" in rec and "completion" in rec:
        found.append("prompt_completion")
    if "text" in rec:
        found.append("text")
    if len(found) == 1:
        return found[0]
    keys = ", ".join(sorted(rec)) or "(none)"
    if not found:
        raise FormatError(
            f"cannot tell the record's format from its keys ({keys}); expected one of: text, "
            "prompt+completion, messages, conversations, instruction+output. Map your names with "
            "--field, e.g. --field prompt=question --field completion=answer", "unknown_format")
    raise FormatError(f"record fits several formats ({', '.join(found)}; keys: {keys}); "
                      f"choose one with --format", "ambiguous_format")


def normalize(rec: Mapping[str, Any], fmt: str = "auto",
              fields: Mapping[str, str] | None = None) -> Conversation:
    """Turn one record into a `Conversation`; `fields` maps our names to the record's names."""
    if fields:
        rec = _rename(rec, fields)
    if fmt == "auto":
        fmt = detect(rec)
    if fmt not in _NORMALIZERS:
        raise FormatError(f"unknown format {fmt!r}{did_you_mean(fmt, FORMATS)}", "config")
    conv = _NORMALIZERS[fmt](rec)
    conv.fields = rec
    return conv


def _as_fields(rec: Mapping[str, Any]) -> Conversation:
    """Format "fields" (chosen by the encoder, not a user setting): the record used as plain fields, for
    templates that read fields themselves (format strings, Python callables); no format detection."""
    return Conversation("completion", fields=rec)


def _rename(rec: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
    out = dict(rec)
    for ours, theirs in fields.items():
        if theirs in rec:
            out[ours] = rec[theirs]
    return out


def _text_field(rec: Mapping[str, Any], name: str, *, optional: bool = False,
                allow_empty: bool = True) -> str | None:
    if name not in rec or rec[name] is None:
        if optional:
            return None
        state = "null" if name in rec else "missing"
        keys = ", ".join(sorted(rec)) or "(none)"
        raise FormatError(f'field "{name}" is {state} (keys found: {keys}); map another field to it '
                          f"with --field {name}=YOUR_FIELD", f"missing_{name}")
    value = rec[name]
    if not isinstance(value, str):
        raise FormatError(f'field "{name}" must be text, got {type(value).__name__}: {_short(value)}',
                          "wrong_type")
    if not allow_empty and not value.strip():
        raise FormatError(f'field "{name}" is empty', f"empty_{name}")
    return value


def _short(value: Any, n: int = 60) -> str:
    s = json.dumps(value, ensure_ascii=False, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def _tools(rec: Mapping[str, Any]) -> str | None:
    tools = rec.get("tools")
    if tools in (None, "", "[]", []):
        return None
    return tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)


def _from_text(rec: Mapping[str, Any]) -> Conversation:
    return Conversation("text", text=_text_field(rec, "text", allow_empty=False))


def _from_prompt_completion(rec: Mapping[str, Any]) -> Conversation:
    prompt, completion = rec.get("prompt"), rec.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational form
        conv = _from_message_list(prompt + completion, "prompt+completion", _MESSAGE_ROLES,
                                  "role", "content")
        conv.tools = _tools(rec)
        return conv
    msgs = []
    system = _text_field(rec, "system", optional=True)
    if system:
        msgs.append(Message("system", system))
    msgs.append(Message("user", _text_field(rec, "prompt")))
    msgs.append(Message("assistant", _text_field(rec, "completion", allow_empty=False)))
    return Conversation("completion", msgs)


def _from_alpaca(rec: Mapping[str, Any]) -> Conversation:
    msgs = []
    system = _text_field(rec, "system", optional=True)
    if system:
        msgs.append(Message("system", system))
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise FormatError(f'field "history" must be a list of [instruction, output] pairs, got '
                          f"{type(history).__name__}", "wrong_type")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise FormatError(f'history[{i}] must be a pair of texts, got {_short(pair)}', "wrong_type")
        msgs += [Message("user", pair[0]), Message("assistant", pair[1])]
    instruction = _text_field(rec, "instruction")
    extra = _text_field(rec, "input", optional=True)
    user = f"{instruction}\n{extra}" if extra else instruction
    msgs += [Message("user", user), Message("assistant", _text_field(rec, "output", allow_empty=False))]
    return Conversation("completion" if not history else "chat", msgs)


def _from_messages(rec: Mapping[str, Any]) -> Conversation:
    conv = _from_message_list(rec.get("messages"), "messages", _MESSAGE_ROLES, "role", "content")
    conv.tools = _tools(rec)
    return conv


def _from_sharegpt(rec: Mapping[str, Any]) -> Conversation:
    turns = rec.get("conversations")
    conv = _from_message_list(turns, "conversations", _SHAREGPT_ROLES, "from", "value")
    system = _text_field(rec, "system", optional=True)
    if system and not (conv.messages and conv.messages[0].role == "system"):
        conv.messages.insert(0, Message("system", system))
    conv.tools = _tools(rec)
    return conv


def _from_message_list(turns: Any, name: str, roles: Mapping[str, str], role_key: str,
                       content_key: str) -> Conversation:
    if not isinstance(turns, list) or not turns:
        got = "missing" if turns is None else f"{type(turns).__name__} {_short(turns)}"
        raise FormatError(f'field "{name}" must be a non-empty list of turns, got {got}', "wrong_type")
    msgs: list[Message] = []
    for i, turn in enumerate(turns):
        where = f"{name}[{i}]"
        if not isinstance(turn, Mapping):
            raise FormatError(f"{where} must be an object with {role_key!r} and {content_key!r}, "
                              f"got {_short(turn)}", "wrong_type")
        raw_role = turn.get(role_key)
        if raw_role not in roles:
            raise FormatError(f"{where}: unknown role {raw_role!r}; expected one of "
                              f"{', '.join(roles)}{did_you_mean(str(raw_role), list(roles))}", "unknown_role")
        role = roles[raw_role]
        content = _content(turn.get(content_key), f"{where}.{content_key}")
        msg = Message(role, content)
        if raw_role == "function_call":  # ShareGPT: the value is the call, as JSON text
            msg.tool_calls, msg.call_text, msg.content = [_tool_call(content, where)], content, None
        elif role == "assistant":
            if turn.get("tool_calls"):
                msg.tool_calls = _tool_calls(turn["tool_calls"], f"{where}.tool_calls")
            msg.reasoning = _reasoning(turn, where)
        elif role == "tool":
            for key in ("name", "tool_call_id"):
                if isinstance(turn.get(key), str):
                    setattr(msg, key, turn[key])
            if msg.name is None and raw_role == "observation":
                msg.name = _last_call_name(msgs)
        if msg.content is None and msg.tool_calls is None:
            raise FormatError(f"{where}.{content_key} must be text, got null", "wrong_type")
        msgs.append(msg)
    _check_order(msgs, name)
    return Conversation("chat", msgs)


def _content(value: Any, where: str) -> str | None:
    """Message content: text, null, or OpenAI content parts (text parts joined by newlines)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise FormatError(f"{where}[{j}]: a content part of type {kind!r}; sftprep builds text "
                                  "only (expected {\"type\": \"text\", \"text\": ...})", "non_text_content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise FormatError(f"{where} must be text, got {type(value).__name__}", "wrong_type")


def _reasoning(turn: Mapping[str, Any], where: str) -> str | None:
    for key in ("reasoning_content", "thinking", "reasoning"):
        value = turn.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise FormatError(f"{where}.{key} must be text, got {type(value).__name__}", "wrong_type")
            return value
    return None


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise FormatError(f"{where} must be a list of calls, got {type(value).__name__}", "wrong_type")
    return [_tool_call(c, f"{where}[{j}]") for j, c in enumerate(value)]


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """One call in the Hugging Face chat form: {"type": "function", "function": {"name", "arguments": dict}}
    (an "id" is kept); accepts the OpenAI form, a bare {"name", "arguments"} and either as JSON text."""
    if isinstance(call, str):
        try:
            call = json.loads(call)
        except json.JSONDecodeError:
            raise FormatError(f'{where}: a function call must be JSON {{"name": ..., "arguments": ...}}, '
                              f"got {_short(call)}", "bad_tool_call") from None
    fn = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise FormatError(f'{where}: a function call needs a "name" (and "arguments"), got {_short(call)}',
                          "bad_tool_call")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):  # OpenAI sends arguments as JSON text; templates expect a mapping
        try:
            parsed = json.loads(args)
            args = parsed if isinstance(parsed, dict) else args
        except json.JSONDecodeError:
            pass
    out: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _last_call_name(msgs: list[Message]) -> str | None:
    for m in reversed(msgs):
        if m.tool_calls:
            return m.tool_calls[-1]["function"]["name"]
    return None


def _check_order(msgs: list[Message], name: str) -> None:
    prev = None
    for i, m in enumerate(msgs):
        if m.role == "system" and i != 0:
            raise FormatError(f"{name}[{i}]: a system turn may only come first", "role_order")
        if m.role == "user" and prev == "user":
            raise FormatError(f"{name}[{i}]: two user turns in a row (roles out of order)", "role_order")
        if m.role == "assistant" and prev in (None, "system"):
            raise FormatError(f"{name}[{i}]: the conversation starts with an assistant turn; "
                              "expected a user turn first (roles out of order)", "role_order")
        if m.role == "tool" and prev != "assistant" and prev != "tool":
            raise FormatError(f"{name}[{i}]: a tool/observation turn must follow an assistant "
                              "(function call) turn (roles out of order)", "role_order")
        if m.role == "assistant" and not (m.content or "").strip() and not m.tool_calls and not m.reasoning:
            raise FormatError(f"{name}[{i}]: assistant turn is empty", "empty_completion")
        prev = m.role
    if not any(m.role == "assistant" for m in msgs):
        raise FormatError(f'"{name}" has no assistant turn, so nothing would be trained', "no_assistant_turn")


_NORMALIZERS = {"fields": _as_fields, "text": _from_text, "prompt_completion": _from_prompt_completion,
                "messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca}
