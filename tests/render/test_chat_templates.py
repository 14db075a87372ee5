"""Real chat templates of today's model families: one render, exact ids, the right tokens trained.

For every family in fixtures/chat_templates/families.json (a real template + a tokenizer with the
family's special tokens, see tests/chat_families.py), 50 chats (multi-turn with and without a
system message, OpenAI tool calls, reasoning) are built with `--template tokenizer` and compared,
sample by sample, with what transformers + TRL make of the same messages:

- ids equal `tokenizer.apply_chat_template(messages, tokenize=True)`;
- trained positions equal the mask of TRL's `_training` template (`{% generation %}`), where TRL
  has one and renders the same ids, up to the differences listed in `REF_EXTRA` with their reason;
- where there is no usable reference mask, each assistant turn is one trained run that holds its
  text and ends with the family's stop token.

Where the reference template raises on a chat (it does not support tool messages), the build
rejects the record with the template's own message.

The tests after those hold the long tail: families outside the first 16 (Granite 3.3, Hermes 3 tool
use, Gemma 4, Nemotron 3 Nano, from llama.cpp's `models/templates/`), each on a layout the general
rules had missed.
"""

from __future__ import annotations

import functools
import json

import pytest

from tests.chat_families import FAMILIES, family_path, load_family, reference
from tests.conftest import DATA, samples_of, trained_runs

FILES = ("chat_multiturn", "chat_tools", "chat_reasoning", "chat_tools_mixed")
RECORDS = [(f, json.loads(line)) for f in FILES for line in (DATA / f"{f}.jsonl").read_text().splitlines()]
KWARGS = {"date_string": "26 Jul 2024"}  # Llama-3.x templates take today's date unless given one

# Tokens TRL's training templates train and sftprep does not, by family, with the reason.
REF_EXTRA = {
    # the newline after the end-of-turn token: not output the model must learn (the next turn's framing)
    "*": lambda piece: piece.strip() == "",
    # the template's empty think block (no reasoning in it: rule 4 of the label contract)
    "qwen3": lambda piece: piece in ("<think>", "</think>"),
    # the role token the generation prompt already supplies at inference
    "gpt-oss": lambda piece: piece in ("<|start|>", "ass", "istant", "assistant"),
    # (and DeepSeek's end of tool outputs, which its template writes in place of that role token)
    "deepseek-v3": lambda piece: piece in ("<｜Assistant｜>", "<｜tool▁outputs▁end｜>"),
    "deepseek-r1-distill": lambda piece: piece in ("<｜Assistant｜>", "<｜tool▁outputs▁end｜>"),
    # Phi-3's template writes EOS after the last turn, which already ended with its stop token <|end|>
    "phi-3": lambda piece: piece == "<|endoftext|>",
    "phi-3.5": lambda piece: piece == "<|endoftext|>",
}
# Families whose template writes no stop token after the last assistant turn: sftprep appends EOS.
APPENDS_EOS = {"glm-4.5", "glm-4.6", "glm-4.7-flash"}


def hf_messages(messages, openai: bool = False):
    """The messages as sftprep hands them to templates: OpenAI JSON-text arguments parsed into
    objects (the Hugging Face chat format most templates expect); or, for a template that fails on
    that, the OpenAI form (arguments as text)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            def args(a):
                return (a if isinstance(a, str) else json.dumps(a)) if openai else (
                    json.loads(a) if isinstance(a, str) else a)
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": args(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


@functools.lru_cache(maxsize=None)
def built(family: str, tmp_root: str):
    from sftprep import build, config_from_dict, load

    data = f"{tmp_root}/{family}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for _, r in RECORDS)
    out = f"{tmp_root}/{family}"
    manifest = build(config_from_dict({"inputs": [data], "tokenizer": str(family_path(family)), "out": out,
                                       "template": "tokenizer", "max_length": 8192, "packing": "none",
                                       "max_reject_ratio": 1.0, "template_kwargs": KWARGS}))
    rejects = {r["sample_id"]: r for r in map(json.loads, open(f"{out}/rejects.jsonl", encoding="utf-8"))}
    return manifest, {sid: (ids, labels) for ids, labels, sid in samples_of(load(out))}, rejects


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("families"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers_and_trl(family, tmp_root):
    tok = load_family(family)
    stops = {tok.eos_token, *(tok.convert_ids_to_tokens(json.loads(
        (family_path(family) / "generation_config.json").read_text())["eos_token_id"]))}
    _, samples, rejects = built(family, tmp_root)
    checked_masks = 0
    for sid, (kind, rec) in enumerate(RECORDS):
        msgs = hf_messages(rec["messages"])
        try:
            ref = reference(tok, msgs, tools=rec.get("tools"), **KWARGS)
        except Exception as e:
            try:
                if not any(m.get("tool_calls") for m in msgs):
                    raise
                msgs = hf_messages(rec["messages"], openai=True)
                ref = reference(tok, msgs, tools=rec.get("tools"), **KWARGS)
            except Exception:  # the template does not take this chat: neither do we, with its message
                assert sid in rejects and rejects[sid]["reason"] == "template_error", (family, sid)
                assert type(e).__name__ in rejects[sid]["message"], rejects[sid]["message"]
                continue
        assert sid in samples, (family, sid, rejects.get(sid))
        ids, labels = samples[sid]
        expected_ids = ref.ids + ([tok.eos_token_id] if family in APPENDS_EOS else [])
        assert ids == expected_ids, (family, sid, kind)
        ours = {i for i, label in enumerate(labels) if label != -100}
        assert all(labels[i] == ids[i] for i in ours)
        if ref.mask is not None and ref.training_ids == ref.ids:
            theirs = {i for i, m in enumerate(ref.mask) if m}
            assert not ours - theirs, (family, sid, tok.decode([ids[i] for i in sorted(ours - theirs)]))
            extra = REF_EXTRA.get(family, lambda p: False)
            for i in theirs - ours:
                piece = tok.decode([ids[i]])
                assert REF_EXTRA["*"](piece) or extra(piece), (family, sid, piece)
            checked_masks += 1
        else:
            assert_turns_trained(tok, msgs, ids, labels, stops)
    assert checked_masks >= 30 or FAMILIES[family]["training_template"] is None or family in ("qwen3", "glm-4.5")


def assert_turns_trained(tok, msgs, ids, labels, stops):
    """Without a reference mask: each assistant turn trained as one run (or, where the template writes a
    call's results inside the turn, a run per piece), each run ending with a stop or special token, each
    text of a turn the template writes trained; nothing else trained."""
    runs, cur = [], []
    for i, label in enumerate(labels + [-100]):
        if label != -100:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    assistants = [m for m in msgs if m["role"] == "assistant"]
    texts = [tok.decode([ids[i] for i in run]) for run in runs]
    assert len(runs) >= len(assistants) and (len(runs) == len(assistants) or tok.name_or_path.endswith("gemma-4"))
    for run, text in zip(runs, texts):
        assert any(text.rstrip().endswith(s) for s in stops) or tok.convert_ids_to_tokens(ids[run[-1]]) in \
            tok.all_special_tokens, text[-40:]
    rendered, trained = tok.decode(ids), "".join(texts)
    for m in assistants:
        content = (m.get("content") or "").strip().split("</think>")[-1].strip()[:20]
        if content and content in rendered:  # some templates drop the text beside a call
            assert content in trained, content


def test_qwen3_reasoning_is_trained_and_an_empty_think_block_is_not(tmp_root):
    tok = load_family("qwen3")
    _, samples, _ = built("qwen3", tmp_root)
    sid = next(i for i, (k, r) in enumerate(RECORDS) if k == "chat_reasoning"
               and r["messages"][-1].get("reasoning_content"))
    ids, labels = samples[sid]
    last = RECORDS[sid][1]["messages"][-1]
    runs = trained_runs(tok, labels)
    assert runs[-1] == f"<think>\n{last['reasoning_content'].strip()}\n</think>\n\n{last['content'].strip()}<|im_end|>"
    plain = next(i for i, (k, r) in enumerate(RECORDS) if k == "chat_multiturn")
    ids, labels = samples[plain]
    assert "<think>\n\n</think>" in tok.decode(ids) and "<think>" not in "".join(trained_runs(tok, labels))


def test_glm_trains_its_stop_token_the_next_role_token(tmp_root):
    tok = load_family("glm-4.5")
    _, samples, _ = built("glm-4.5", tmp_root)
    sid = next(i for i, (k, r) in enumerate(RECORDS) if k == "chat_tools")
    runs = trained_runs(tok, samples[sid][1])
    assert any(r.endswith("</tool_call><|observation|>") for r in runs)  # a call ends with <|observation|>
    multi = next(i for i, (k, r) in enumerate(RECORDS) if k == "chat_multiturn")
    runs = trained_runs(tok, samples[multi][1])
    assert all(r.endswith("<|user|>") for r in runs[:-1]) and runs[-1].endswith("<|endoftext|>")


def test_tool_calls_train_the_templates_own_syntax(tmp_root):
    tok = load_family("qwen2.5")
    _, samples, _ = built("qwen2.5", tmp_root)
    sid, rec = next((i, r) for i, (k, r) in enumerate(RECORDS) if k == "chat_tools"
                    and any(m.get("tool_calls") for m in r["messages"]))
    call = next(m["tool_calls"][0]["function"] for m in rec["messages"] if m.get("tool_calls"))
    runs = trained_runs(tok, samples[sid][1])
    args = json.dumps(json.loads(call["arguments"]), ensure_ascii=False)
    assert f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {args}}}\n</tool_call><|im_end|>' in runs
    tool_results = [m["content"] for m in rec["messages"] if m["role"] == "tool"]
    assert not any(t in "".join(runs) for t in tool_results)  # tool results are never trained


def test_generation_blocks_of_a_training_template_are_used_as_written(tmp_path):
    """A template that marks assistant output with {% generation %} (TRL's `_training` variants, LFM2.5)
    is honoured as it is: trained positions == transformers' assistant mask."""
    import shutil

    from sftprep import build, config_from_dict, load

    from tests.chat_families import template_text

    tok_dir = tmp_path / "tok"
    shutil.copytree(family_path("qwen2.5"), tok_dir)
    training = template_text("qwen2.5", training=True)
    (tok_dir / "chat_template.jinja").write_text(training)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": training}))
    chats = [r for k, r in RECORDS if k != "chat_tools"][:10]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chats))
    build(config_from_dict({"inputs": [str(tmp_path / "in.jsonl")], "tokenizer": str(tok_dir), "out": str(tmp_path / "o"),
                            "template": "tokenizer", "max_length": 8192, "packing": "none"}))
    tok = load_family("qwen2.5")
    for (ids, labels, sid), rec in zip(samples_of(load(tmp_path / "o")), chats):
        ref = reference(tok, rec["messages"], training_template=training)
        assert ids == ref.training_ids
        assert [int(label != -100) for label in labels] == ref.mask


# -- the long tail: families outside the 16, each on its real template (fixtures/chat_templates/) ------------------
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "the city"}}, "required": ["city"]}}}]


def call(name="get_weather", args='{"city": "Paris"}', cid="call00001"):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def build_family(tmp_path, family, records, tokenizer=None, **settings):
    """Build `records` with the family's tokenizer (or `tokenizer`), `--template tokenizer`: samples by
    id, rejects by id."""
    from sftprep import build, config_from_dict, load

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    build(config_from_dict({"inputs": [str(data)], "tokenizer": str(tokenizer or family_path(family)),
                            "out": str(tmp_path / "out"), "template": "tokenizer", "max_length": 8192,
                            "packing": "none", "max_reject_ratio": 1.0, **settings}))
    rejects = {r["sample_id"]: r for r in map(json.loads, open(tmp_path / "out" / "rejects.jsonl", encoding="utf-8"))}
    return {sid: (ids, labels) for ids, labels, sid in samples_of(load(tmp_path / "out"))}, rejects


def test_granite_call_without_content_is_rejected_with_the_templates_error(tmp_path):
    """Granite 3.3 adds `message['content']` to a string: transformers raises on a tool call with null
    content, so the record is rejected with that error (it used to be rendered with "" as content, the
    model taught to end its turn where it should call a tool)."""
    tok = load_family("granite-3.3")
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call()]},
            {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees."}]
    with pytest.raises(Exception) as theirs:
        tok.apply_chat_template(hf_messages(chat), tools=WEATHER, tokenize=False)
    samples, rejects = build_family(tmp_path, "granite-3.3", [{"messages": chat, "tools": WEATHER}])
    assert not samples and rejects[0]["reason"] == "template_error"
    assert str(theirs.value) in rejects[0]["message"]  # 'dict object' has no attribute 'content'


def test_hermes_tool_use_template_locates_turns_of_chats_with_tools(tmp_path):
    """Hermes 3's tool-use template iterates `tools` unguarded: the header is found with a tools list,
    so chats with tools are built (they were all rejected as `turn_not_located`)."""
    tok = load_family("hermes-3")
    tool_chats = [r for k, r in RECORDS if k == "chat_tools"]
    samples, rejects = build_family(tmp_path, "hermes-3", tool_chats)
    assert not rejects and len(samples) == len(tool_chats)
    ids, labels = samples[1]
    assert ids == reference(tok, hf_messages(tool_chats[1]["messages"]), tools=tool_chats[1]["tools"]).ids
    runs = trained_runs(tok, labels)
    assert runs[0] == ('<tool_call>\n{"name": "calculate_area", "arguments": {"shape": "rectangle", "dimensions": '
                       '[5, 3]}}\n</tool_call><|im_end|>')
    assert not any("<tool_response>" in r or "<|im_start|>" in r for r in runs)


def test_gemma4_results_inside_the_models_turn_are_not_trained(tmp_path):
    """Gemma 4 writes a call's results inside the model's turn, then the turn's text: the call is trained
    up to its stop token `<|tool_response>`, then the text after the results with its `<turn|>`; the
    results are not (they were, and `<turn|>` was not)."""
    tok = load_family("gemma-4")
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [call()]},
            {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees."}]
    samples, rejects = build_family(tmp_path, "gemma-4", [{"messages": chat, "tools": WEATHER}])
    ids, labels = samples[0]
    assert ids == reference(tok, hf_messages(chat), tools=WEATHER).ids
    assert trained_runs(tok, labels) == [
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>',
        "Let me check.<turn|>", "It is 21 degrees.<turn|>"]
    assert 'response:get_weather{value:<|"|>{"temp": 21}<|"|>}<tool_response|>' in tok.decode(ids)


def test_gemma4_reasoning_trains_its_channel_opener(tmp_path):
    """Gemma 4's generation prompt pre-fills an empty thought channel (`<|channel>thought\\n<channel|>`);
    a turn that writes its reasoning there trains the opener with it (it was left out, the rule being
    that rendered reasoning inside a trained turn is trained)."""
    tok = load_family("gemma-4")
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "reasoning_content": "The user wants the weather.",
             "tool_calls": [call()]},
            {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees."}]
    samples, _ = build_family(tmp_path, "gemma-4", [{"messages": chat, "tools": WEATHER}])
    ids, labels = samples[0]
    assert ids == reference(tok, hf_messages(chat), tools=WEATHER).ids
    assert trained_runs(tok, labels)[0] == ('<|channel>thought\nThe user wants the weather.\n<channel|><|tool_call>'
                                            'call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>')


def test_nemotron_empty_think_block_is_trained_all_or_nothing(tmp_path):
    """Nemotron 3 Nano writes `<think></think>` before every answer without reasoning, while its
    generation prompt (thinking on) ends with `<think>\\n`: the empty block is not trained, `</think>`
    included (it was half trained); a turn's own reasoning is, up to and with its `</think>`."""
    tok = load_family("nemotron-3-nano")
    chats = [r for k, r in RECORDS if k in ("chat_multiturn", "chat_reasoning")]
    samples, rejects = build_family(tmp_path, "nemotron-3-nano", chats)
    assert not rejects
    for sid, chat in enumerate(chats):
        ids, labels = samples[sid]
        assert ids == reference(tok, chat["messages"]).ids
        last = chat["messages"][-1]
        runs = trained_runs(tok, labels)
        if last.get("reasoning_content", "").strip():
            assert runs[-1] == f"{last['reasoning_content'].strip()}\n</think>\n{last['content'].strip()}<|im_end|>"
        else:
            assert runs[-1] == f"{last['content'].strip()}<|im_end|>"
        assert all("<think>" not in r and "</think>" not in r for r in runs[:-1])


def test_deepseek_v3_tool_calls_after_the_first_are_trained(tmp_path):
    """DeepSeek-V3 writes every tool-call turn after a conversation's first with neither its header nor any
    text of the turn, right after the previous message: the turn starts there (it was rejected as
    `turn_not_located`)."""
    tok = load_family("deepseek-v3")
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call()]},
            {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees."},
            {"role": "user", "content": "And in Rome?"},
            {"role": "assistant", "content": "", "tool_calls": [call(args='{"city": "Rome"}', cid="call00002")]},
            {"role": "tool", "tool_call_id": "call00002", "name": "get_weather", "content": '{"temp": 25}'},
            {"role": "assistant", "content": "It is 25 degrees."}]
    samples, rejects = build_family(tmp_path, "deepseek-v3", [{"messages": chat, "tools": WEATHER}])
    assert not rejects
    ids, labels = samples[0]
    assert ids == reference(tok, hf_messages(chat, openai=True), tools=WEATHER).ids
    runs = trained_runs(tok, labels)
    assert runs[2] == ('<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Rome"}'
                       '\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>')
    assert len(runs) == 4 and not any('"temp"' in r for r in runs)


def test_a_turn_marker_that_is_no_stop_token_is_named_in_the_message(tmp_path):
    """Qwen 2.5's template on a tokenizer where `<|im_end|>` is neither special nor EOS: no turn, a
    tool call or plain text, can be located with its end; the message shows what the template wrote
    there and says `--stop-token '<|im_end|>'`, which builds it, every turn trained up to `<|im_end|>`.
    (Plain turns used to be built with no end trained, but the last, which got `<|im_end|>\\n` and an
    appended EOS: a model that never learns to end a turn.)"""
    import shutil

    tok_dir = tmp_path / "tok"
    shutil.copytree(family_path("qwen2.5"), tok_dir)
    doc = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for t in doc["added_tokens"]:
        t["special"] = t["special"] and t["content"] == "<|endoftext|>"
    (tok_dir / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["eos_token"] = "<|endoftext|>"
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (tok_dir / "generation_config.json").unlink()
    tools = [r for k, r in RECORDS if k == "chat_tools"][1]
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]}
    _, rejects = build_family(tmp_path / "a", "qwen2.5", [tools, plain, {"messages": plain["messages"][:2]}],
                              tokenizer=tok_dir)
    for sid, seen in ((0, "<tool_call>"), (1, "Hello!<|im_end|>"), (2, "Hello!<|im_end|>")):
        message = rejects[sid]["message"]
        assert rejects[sid]["reason"] == "turn_not_located"
        assert seen in message and message.endswith("add --stop-token '<|im_end|>'"), sid
    samples, rejects = build_family(tmp_path / "b", "qwen2.5", [tools, plain], tokenizer=tok_dir,
                                    stop_tokens=["<|im_end|>"])
    tok = load_family("qwen2.5")
    assert not rejects and trained_runs(tok, samples[0][1])[0].endswith("</tool_call><|im_end|>")
    assert trained_runs(tok, samples[1][1]) == ["Hello!<|im_end|>", "Goodbye.<|im_end|>"]
