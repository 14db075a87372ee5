"""Render plans (`sftprep.render.plans`): a conversation built from its shape's plan is exactly
what rendering it gives, for every real family template and for templates that inspect texts.

A plan is only taken where the template treats message texts as opaque, or asks questions of them
that the plan records with their answers; everywhere else rendering happens as before. So each test
compares `ChatTemplate.segments` (planned where it can be) with `ChatTemplate._segments` (always
rendered), and counts the conversations the template rendered (`Renders`): none for a planned one.
"""

from __future__ import annotations

import json
import random

import pytest

from sftprep.read.formats import Conversation, FormatError, Message, normalize
from sftprep.render import plans
from sftprep.render.chat import ChatTemplate, _shape
from sftprep.tokenizer import added_strings, chat_variables, load_fast, stop_strings
from tests.chat_families import FAMILIES, family_path, load_family, reference
from tests.render.test_chat_templates import RECORDS

# families whose every conversation without whitespace-only texts has a plan (the others ask questions of
# texts that the random texts below answer in many ways, or test a system message's text, or refuse shapes)
FULLY_PLANNED = {"llama-3", "llama-3.1", "llama-3.2", "qwen2.5", "qwen3-instruct-2507", "gemma-3", "phi-3", "phi-3.5",
                 "cohere", "lfm2", "mistral-v0.3", "granite-3.3"}
# families whose templates ask questions of message texts (`'</think>' in content` and a split there,
# `startswith`, `| length > 0`...) or capture output (macros, `{% set %}` blocks): rendered conversation by
# conversation until plans recorded the answers (issue 22); hermes-3 and gemma-2 refuse the chats below
ASKING = ["qwen3", "gpt-oss", "deepseek-v3", "deepseek-r1-distill", "glm-4.5", "gemma-4", "nemotron-3-nano", "qwq-32b",
          "qwen3-hub", "qwen3-coder", "qwen3.5", "smollm3", "deepseek-v3.1", "deepseek-r1-distill-llama", "glm-4.6",
          "glm-4.7-flash", "lfm2.5", "command-r7b"]

PIECES = ["Hello", "world", "你好，世界", "🙂", "<|im_end|>", "<|im_start|>assistant\n", "[INST]", "<think>x</think>",
          "</think>", "<|eot_id|>", "<end_of_turn>", "\n\n", "\n", "  ", "\t", "a.b", "{x}", "'", '"', "\\n",
          "/nothink", "<|user|>", "<|end|>", "assistant"]


def _text(rng: random.Random, may_be_empty: bool) -> str:
    if may_be_empty and rng.random() < 0.1:
        return rng.choice(["", " ", "\n"])
    core = "".join(rng.choice(PIECES) + rng.choice(["", " "]) for _ in range(rng.randint(1, 6))).strip() or "x"
    lead = rng.choice(["", "", "", " ", "\n", "\n\n "])
    trail = rng.choice(["", "", "", " ", "\n", " \n"])
    return lead + core + trail


def conversations(seed: int, n: int) -> list[Conversation]:
    """Plain chats of every shape sftprep plans: with and without a system message, 1-4 exchanges,
    texts with edge whitespace, empty user texts, special-token look-alikes, reasoning."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [Message("system", _text(rng, False))] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            msgs.append(Message("user", _text(rng, True)))
            answer = Message("assistant", _text(rng, False))
            if rng.random() < 0.25:
                answer.reasoning = _text(rng, False)
            msgs.append(answer)
        out.append(Conversation("chat", msgs))
    return out


def chat_template(tok, source: str | None = None, **kwargs) -> ChatTemplate:
    return ChatTemplate(source or tok.chat_template, chat_variables(tok), stop_strings(tok),
                        added_strings(tok, special_only=True), added_strings(tok), kwargs)


def outcome(fn, conv):
    try:
        return fn(conv)
    except FormatError as e:
        return ("rejected", e.reason, str(e))


class Renders:
    """Counts the renders of `chat`'s own template (not those of its planning compilation)."""

    def __init__(self, chat: ChatTemplate) -> None:
        self.count, render = 0, chat.render

        def counted(messages, tools, add_generation_prompt=False, template=None, variables=None):
            self.count += template is None
            return render(messages, tools, add_generation_prompt, template, variables)
        chat.render = counted

    def of(self, fn, conv) -> tuple:
        """`outcome(fn, conv)` and how many renders it took."""
        before = self.count
        result = outcome(fn, conv)
        return result, self.count - before


def rendered(chat: ChatTemplate, conv: Conversation):
    return outcome(lambda c: chat._segments(c, openai=False), conv)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_planned_conversations_equal_rendered_ones(family):
    chat = chat_template(load_fast(family_path(family)), date_string="26 Jul 2024")
    renders = Renders(chat)
    convs = conversations(seed=sum(map(ord, family)), n=150)
    planned = 0
    for conv in convs:
        got, n = renders.of(chat.segments, conv)
        assert got == rendered(chat, conv), family
        planned += _shape(conv) is not None and n == 0
    if family in FULLY_PLANNED:  # every conversation without whitespace-only texts has a plan
        assert planned == sum(_shape(c) is not None for c in convs) > 100, family


def real_chats() -> list[Conversation]:
    """The multi-turn and reasoning chats of fixtures/data, each also cut after each assistant turn."""
    convs = []
    for f, rec in RECORDS:
        if f in ("chat_multiturn", "chat_reasoning"):
            messages = normalize(rec).messages
            convs += [Conversation("chat", messages[:i + 1]) for i, m in enumerate(messages) if m.role == "assistant"]
    return convs


@pytest.mark.parametrize("family", ASKING)
def test_templates_that_ask_about_texts_are_planned_and_equal_rendering(family):
    """Qwen3 tests `'</think>' in content`, DeepSeek splits content at `</think>`, Nemotron measures
    `content | trim | length`, GLM and gpt-oss pass texts through macros: on the real chats of the
    fixtures, every conversation is built from a plan (the template renders none of them; it rendered each
    once or twice before), a handful of plans for ~100 conversations, and equals its render exactly."""
    chat = chat_template(load_fast(family_path(family)), date_string="26 Jul 2024")
    renders = Renders(chat)
    convs = real_chats()
    for conv in convs:
        got, n = renders.of(chat.segments, conv)
        assert n == 0, (family, [m.role for m in conv.messages])
        assert got == rendered(chat, conv), family
    assert len(convs) > 90 and sum(map(len, chat._plans.values())) < 30


@pytest.mark.parametrize("family", ["qwen3", "deepseek-r1-distill"])
def test_a_plans_questions_are_resolved_once_not_per_conversation(family, monkeypatch):
    """Qwen3 asks `'</think>' in content` of every assistant text (and `startswith('<tool_response>')` of
    the last user text), DeepSeek-R1 splits at `</think>`: a planned conversation answers those questions
    from its own texts directly, without walking the plan's slots again (`plans.value`: Qwen3's 4
    questions a chat cost 0.05 CPU s per 10k chats that way, 0.02 resolved when planned)."""
    chat = chat_template(load_fast(family_path(family)))
    convs = real_chats()
    for conv in convs:  # every shape planned
        chat.segments(conv)
    assert any(p.guards for variants in chat._plans.values() for p in variants)
    walks, walk = [0], plans.value

    def counted(x, cores):
        walks[0] += 1
        return walk(x, cores)
    monkeypatch.setattr(plans, "value", counted)
    renders = Renders(chat)
    for conv in convs:
        got, n = renders.of(chat.segments, conv)
        assert n == 0 and got == rendered(chat, conv), family
    assert walks[0] == 0, family


def test_a_planned_build_equals_transformers_on_edge_whitespace():
    """Llama-3 trims texts (`| trim`), Qwen2.5 writes them raw: the planned texts are trimmed or not
    exactly as transformers renders them."""
    for family in ("llama-3.1", "qwen2.5", "gemma-3", "mistral-v0.3"):
        tok, fast = load_family(family), load_fast(family_path(family))
        chat = chat_template(fast, date_string="26 Jul 2024")
        for conv in conversations(seed=7, n=40):
            if _shape(conv) is None or any(m.reasoning for m in conv.messages):
                continue
            text = "".join(s for s, _ in chat.segments(conv))
            messages = [{"role": m.role, "content": m.content} for m in conv.messages]
            try:
                expected = tok.apply_chat_template(messages, tokenize=False, date_string="26 Jul 2024")
            except Exception:  # the template refuses the chat (Gemma: roles must alternate after system)
                continue
            assert text == expected, family
        assert chat._plans


INSPECTING = {  # a text used as only a string can be: rendered
    "length": "{% for m in messages %}{{ m.content | length }}[{{ m.content }}]{% endfor %}",
    "int filter": "{% for m in messages %}{{ m.content | int }}[{{ m.content }}]{% endfor %}",
    "tojson": "{% for m in messages %}{{ m.content | tojson }}{% endfor %}",
    "escape": "{% for m in messages %}{{ m.content | e }}{% endfor %}",
    "index": "{% for m in messages %}{{ m.content[0] }}[{{ m.content }}]{% endfor %}",
    "method": "{% for m in messages %}{{ m.content.split('a') | join('|') }}{% endfor %}",
    "wordcount": "{% for m in messages %}{% if m.content | wordcount > 1 %}W{% endif %}[{{ m.content }}]{% endfor %}",
    "sameas": "{% for m in messages %}{% if m.content is sameas 'x' %}S{% endif %}[{{ m.content }}]{% endfor %}",
    "upper": "{% for m in messages %}{{ m.content | upper }}{% endfor %}",
    "format": "{% for m in messages %}{{ '%s!' % m.content }}{% endfor %}",
    "set block": "{% for m in messages %}{% set t %}{{ m.content }}{% endset %}{{ t | length }}[{{ t }}]{% endfor %}",
    "filter block": "{% for m in messages %}{% filter upper %}{{ m.content }}{% endfilter %}{% endfor %}",
    "out of order": "{% for m in messages[1:] %}[{{ m.content }}]{% endfor %}({{ messages[0].content }})",
}
ASKED = {  # questions whose answers the plan records: planned, one plan per set of answers
    "equality": "{% for m in messages %}{% if m.content == 'x' %}X{% endif %}[{{ m.content }}]{% endfor %}",
    "in": "{% for m in messages %}{% if 'a' in m.content %}A{% endif %}[{{ m.content }}]{% endfor %}",
    "length compared": "{% for m in messages %}{% if m.content | length > 2 %}L{% endif %}[{{ m.content }}]{% endfor %}",
    "macro": "{% macro w(t) %}{{ t }}{% endmacro %}{% for m in messages %}{% if w(m.content).endswith('a') %}E"
             "{% endif %}[{{ w(m.content) }}]{% endfor %}",
    "strip chars": "{% for m in messages %}[{{ m.content.strip('a') }}]{% endfor %}",
    "split where nothing matches": "{% for m in messages %}[{{ m.content.split('q')[-1] }}]{% endfor %}",
    "split at the template's own text": "{% for m in messages %}{% set c = '<t>' ~ m.content %}"
                                        "[{{ c.split('<t>')[-1] }}]{% endfor %}",
}
OPAQUE = {
    "raw": "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}",
    "concatenated and trimmed": "{% for m in messages %}{{ ('<' + m.role + '>\n\n' + m.content) | trim + '</s>' }}"
                                "{% endfor %}",
    "tilde join": "{% for m in messages %}{{ '[' ~ m.content ~ ']' }}{% endfor %}",
    "method trims": "{% for m in messages %}<{{ m.role }}>{{ m.content.lstrip() }}|{{ m.content.rstrip() }}</s>"
                    "{% endfor %}",
    "truth and tests": "{% for m in messages %}{% if m.content and m.content is string and m.content is defined %}"
                       "<{{ m.role }}>{{ m.content }}</s>{% endif %}{% endfor %}",
    "namespace": "{% set ns = namespace(last='') %}{% for m in messages %}{% set ns.last = m.content %}<{{ m.role }}>"
                 "{{ ns.last }}</s>{% endfor %}",
}


@pytest.mark.parametrize("name", list(INSPECTING) + list(ASKED) + list(OPAQUE))
def test_a_template_that_inspects_texts_is_rendered_or_planned_on_its_answers(name):
    """Each conversation equals its render; where the markers of rendering change the template's answer
    (`m.content == 'x'` on a marked "x") rendering rejects the record, and the plan, which answers from
    the text itself, equals the plain render. Texts of one shape that answer alike share a plan."""
    tok = load_fast(family_path("qwen2.5"))
    chat = chat_template(tok, INSPECTING.get(name) or ASKED.get(name) or OPAQUE[name])
    renders = Renders(chat)
    convs = [Conversation("chat", [Message("user", text), Message("assistant", "b a c")])
             for text in ("a", "x", "  padded\n", "a b c", "<s>", "[a]", "xa", "<t>")]
    planned = 0
    for conv in convs:
        got, n = renders.of(chat.segments, conv)
        expected = rendered(chat, conv)
        if got != expected:  # rendering's markers changed the answer: the plan equals the plain render
            plain = chat._plain(conv, None, False)  # (with the EOS a last turn written without one gets)
            assert name in ASKED and expected[:2] == ("rejected", "template_changes_text"), name
            assert "".join(s for s, _ in got) in (plain, plain + chat.stop_tokens[0]), name
        planned += n == 0
    assert (planned == 0) if name in INSPECTING else planned > 0, name
    if name in OPAQUE:
        assert planned == len(convs), name


def test_glm_nothink_suffix_is_answered_from_the_text(tmp_path):
    """GLM-4.5 without thinking adds `/nothink` to user turns unless the text already ends with it,
    tested on a macro's output (`visible_text(m.content).endswith(...)`), where rendering's markers are
    not watched: that record used to get a second `/nothink`, then was rejected (`template_changes_text`).
    A plan sees the macro's output as an opaque `Joined`, asks `endswith` of the text itself and keeps
    the answer with the plan: both records build as transformers renders them."""
    from sftprep import build, config_from_dict, load

    tok = load_family("glm-4.5")
    chats = [[{"role": "user", "content": "Summarise this"}, {"role": "assistant", "content": "Done."}],
             [{"role": "user", "content": "Summarise this /nothink"}, {"role": "assistant", "content": "Done."}]]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats), encoding="utf-8")
    build(config_from_dict({"inputs": [str(data)], "tokenizer": str(family_path("glm-4.5")), "out": str(tmp_path / "out"),
                            "template": "tokenizer", "packing": "none", "max_reject_ratio": 1.0,
                            "template_kwargs": {"enable_thinking": False}}))
    rows = load(tmp_path / "out").column("input_ids").to_pylist()
    assert rows == [reference(tok, c, enable_thinking=False).ids + [tok.eos_token_id] for c in chats]
    assert (tmp_path / "out" / "rejects.jsonl").read_text() == ""


def test_trim_with_characters_is_exact_or_refused():
    """`strip(chars)` on a slot: whitespace characters act on the shape's edge whitespace exactly;
    other characters could reach the text itself: planned where they leave the text as it is (an
    answer the plan keeps), rendered where they cut it."""
    tok = load_fast(family_path("qwen2.5"))
    for source, rendered_texts in (("{% for m in messages %}[{{ m.content | trim('\n') }}]{% endfor %}", set()),
                                   ("{% for m in messages %}[{{ m.content.strip(' \n') }}]{% endfor %}", set()),
                                   ("{% for m in messages %}[{{ m.content | trim('\"') }}]{% endfor %}",
                                    {'"quoted"\n', '"x"'})):
        chat = chat_template(tok, source)
        renders = Renders(chat)
        for text in ("\n a \n", " \nb\n", '"quoted"\n', "plain", '"x"', "y"):
            conv = Conversation("chat", [Message("user", text), Message("assistant", "ok")])
            got, n = renders.of(chat.segments, conv)
            assert got == rendered(chat, conv) and (n > 0) == (text in rendered_texts), (source, text)


def test_reserved_characters_are_rejected_never_planned():
    """A text holding the private-use characters sftprep locates texts with is rejected, with its
    message and field named, whether or not its shape has a plan."""
    chat = chat_template(load_fast(family_path("qwen2.5")))
    plain = Conversation("chat", [Message("user", "ab"), Message("assistant", "ok")])
    chat.segments(plain)  # the shape has a plan now
    for user, answer, where in (("a\U00100005b", "ok", "messages[0].content"),
                                ("ab", "o\U0010FFFCk", "messages[1].content")):
        conv = Conversation("chat", [Message("user", user), Message("assistant", answer)])
        rejected, reason, message = outcome(chat.segments, conv)
        assert (rejected, reason) == ("rejected", "reserved_characters") and message.startswith(where)
