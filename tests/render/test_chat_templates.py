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
"""

from __future__ import annotations

import functools
import json

import pytest

from tests.chat_families import FAMILIES, family_path, load_family, reference
from tests.conftest import DATA, samples_of, trained_runs

FILES = ("chat_multiturn", "chat_tools", "chat_reasoning")
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
APPENDS_EOS = {"glm-4.5"}
# Chats a family renders but sftprep rejects, with the reason: DeepSeek-V3's template writes a second
# tool-call turn with neither its `<｜Assistant｜>` header nor any text of the turn (a known quirk),
# so where that turn starts cannot be told; TRL's training template marks it from `\n<｜tool▁call▁begin｜>`.
KNOWN_REJECTS = {"deepseek-v3": "turn_not_located"}


def hf_messages(messages, openai: bool = False):
    """The messages as sftprep hands them to templates: OpenAI JSON-text arguments parsed into
    objects (the Hugging Face chat format most templates expect); or, for a template that fails on
    that, the OpenAI form (arguments as text, content "" beside calls)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            def args(a):
                return (a if isinstance(a, str) else json.dumps(a)) if openai else (
                    json.loads(a) if isinstance(a, str) else a)
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": args(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
            if openai and m.get("content") is None:
                m["content"] = ""
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
        if sid in rejects and rejects[sid]["reason"] == KNOWN_REJECTS.get(family):
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
    """Without a reference mask: one trained run per assistant turn, holding its text (where the
    template renders it) and ending with a stop token; nothing else trained."""
    runs, cur = [], []
    for i, label in enumerate(labels + [-100]):
        if label != -100:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    assistants = [m for m in msgs if m["role"] == "assistant"]
    assert len(runs) == len(assistants)
    for run, m in zip(runs, assistants):
        text = tok.decode([ids[i] for i in run])
        assert any(text.rstrip().endswith(s) for s in stops) or tok.convert_ids_to_tokens(ids[run[-1]]) in \
            tok.all_special_tokens, text[-40:]
        if m.get("content"):
            assert m["content"].strip().split("</think>")[-1].strip()[:20] in text


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
