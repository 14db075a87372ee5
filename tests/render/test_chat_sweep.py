"""Every real chat template in fixtures/chat_templates/families.json, checked against an oracle that shares
no code with sftprep's turn finding: transformers renders the conversation up to each assistant turn with
the generation prompt, then with the turn; what the turn adds is what the model must learn to write. Each
turn is compared as the last of the conversation cut after it (what sftprep trains of it there).

Adding a template is adding its entry (template file, special tokens, stop tokens) to families.json; every
chat, tool chat and reasoning chat in fixtures/data/ is then checked on it.

The oracle's text is normalised by the rules the README states, listed here once (`EXCEPTIONS`): nothing
else may differ.
"""

from __future__ import annotations

import re

import pytest

from sftprep.read.formats import Conversation, FormatError, normalize
from sftprep.render.chat import ChatTemplate
from sftprep.tokenizer import added_strings, chat_variables, load_fast, stop_strings
from tests.chat_families import FAMILIES, family_path, load_family
from tests.render.test_chat_templates import KWARGS, RECORDS, hf_messages

_EMPTY_BLOCK = re.compile(r"\s*<(think|thinking|seed:think)>\s*</\1>\s*")

EXCEPTIONS = {
    "empty think block": "a template's empty think block at the turn's start, or one the generation prompt reaches "
                         "into (`<think>\\n` prompted, `<think></think>` written), is not trained (README, rule of "
                         "reasoning)",
    "stop token": "a turn is trained up to and with its first stop token (EOS, generation_config's eos ids); what "
                  "the template writes after it (newline, Phi-3's final EOS) is the next turn's framing",
    "appended stop": "a last turn the template ends with no stop token (GLM-4.5) gets the first stop token appended",
    "leading space": "a token is trained by its first non-space character: white space before the turn's first "
                     "character is compared stripped",
    "pre-filled block opener": "where the generation prompt pre-fills an empty block (Gemma 4's thought channel, "
                               "Command R7B's thinking) and the turn writes its own reasoning in it, the block's "
                               "opener is trained with the reasoning (README, rule of reasoning)",
    "template refuses": "a turn transformers cannot render (the template raises) is not compared: the build rejects "
                        "the record with the template's error (tests/render/test_chat_templates.py)",
}


def _common(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def oracle(tok, previous: str | None, before: str, prompt: str, full: str, stops: list[str]) -> str:
    """What the model writes for a turn: `full` (with the turn) from where it parts from `before` (without
    it), or from the end of the `previous` message's text and what `before` writes after it, where the
    template writes earlier messages differently once a turn follows (Mistral Nemo moves the system
    message), never inside a special token; then after the generation prompt's addition to `before` (or
    its longest prefix made of whole tokens; none where the template writes no header there), or, for a
    template that writes its prompt whether asked or not (Command R7B), after what `before` writes after
    the previous message's text; normalised by `EXCEPTIONS`."""
    start = _common(before, full)
    header = prompt[_common(before, prompt):]
    text, anchored = (previous.strip() if previous else ""), False
    if text and text in before and text in full:
        after, at = before.rfind(text) + len(text), full.rfind(text) + len(text)
        if header:
            start = max(start, at + _common(before[after:], full[at:]))
        else:  # the prompt adds nothing: it is what the template writes after the previous text anyway
            start, header, anchored = at, before[after:], True
    added_tokens = [t for t in tok.get_added_vocab() if len(t) > 1]
    for t in added_tokens:  # never start inside a special token (`<|START_` of `<|START_RESPONSE|>`)
        inside = next((k for k in range(1, len(t)) if full.startswith(t, start - k)), None)
        if inside:
            start -= inside
            break
    region = full[start:]
    cuts = {b for _, b in tok(header, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]}
    begin = 0
    for cut in sorted((c for c in cuts if 0 < c <= len(header)), reverse=True):  # at the header's token ends
        found = (0 if region.startswith(header[:cut]) else -1) if anchored else region.find(header[:cut])
        if found >= 0:
            begin = found + cut
            rest, turn = header[cut:].strip(), _to_stop(region[begin:], stops)
            if rest and any(t in rest for t in added_tokens) and rest in turn:  # "pre-filled block opener"
                begin = found + max(header.rfind(t, 0, cut) for t in added_tokens)
            break
    for block in _EMPTY_BLOCK.finditer(region):  # "empty think block"
        if block.start() <= begin <= block.end():
            begin = block.end()
    return _to_stop(region[begin:], stops).lstrip()  # "leading space"


def _to_stop(text: str, stops: list[str]) -> str:
    """`text` up to and with its first stop token ("stop token"), or with the first appended ("appended stop")."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return text[:min(ends)] if ends else text.rstrip() + stops[0]


def render(tok, messages, tools, add_generation_prompt):
    """transformers' text of `messages`, in the form the template takes (arguments as objects or as text)."""
    for openai in (False, True):
        try:
            return tok.apply_chat_template(hf_messages(messages, openai=openai), tools=tools, tokenize=False,
                                           add_generation_prompt=add_generation_prompt, **KWARGS)
        except Exception:
            if not any(m.get("tool_calls") for m in messages):
                break
    return None  # "template refuses"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trained_text_of_every_turn_equals_the_oracle(family):
    tok, fast = load_family(family), load_fast(family_path(family))
    stops = stop_strings(fast)
    chat = ChatTemplate(fast.chat_template, chat_variables(fast), stops, added_strings(fast, special_only=True),
                        added_strings(fast), KWARGS)
    compared, differ = 0, []
    for sid, (_, rec) in enumerate(RECORDS):
        conv = normalize(rec)
        for i, m in enumerate(rec["messages"]):
            if m["role"] != "assistant":
                continue
            before, prompt, full = (render(tok, rec["messages"][:n], rec.get("tools"), gen)
                                    for n, gen in ((i, False), (i, True), (i + 1, False)))
            if None in (before, prompt, full):
                continue
            try:
                segments = chat.segments(Conversation("chat", conv.messages[:i + 1], tools=conv.tools))
            except FormatError as e:
                differ.append((sid, i, "rejected", str(e)))
                continue
            last = max(g for _, g in segments if g is not None)
            ours = "".join(s for s, g in segments if g == last).lstrip()
            previous = rec["messages"][i - 1].get("content")
            expected = oracle(tok, previous if isinstance(previous, str) else None, before, prompt, full, stops)
            compared += 1
            if ours != expected:
                at = _common(ours, expected)
                differ.append((sid, i, f"from {at}: ours {ours[at:at + 60]!r}, oracle {expected[at:at + 60]!r}"))
    assert not differ, (family, len(differ), differ[:3])
    assert compared >= 40, (family, compared)
