"""What is trained is exactly what should be learned: completion / assistant turns + their end token."""

from __future__ import annotations

import json

import pytest

from tests.conftest import CHATML_TOK, DATA, MISTRAL, build_records, samples_of, sftprep_cli, trained_runs, write_jsonl

CHAT = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hi there!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye."},
]}


def one_sample(tmp_path, records, tokenizer=MISTRAL, **settings):
    _, table = build_records(tmp_path, records, tokenizer, packing="none", **settings)
    return samples_of(table)


@pytest.mark.slow
def test_prompt_completion_without_template_trains_completion_and_eos(tmp_path, mistral):
    ids, labels, _ = one_sample(tmp_path, [{"prompt": "How do you say cat in Spanish?", "completion": " gato"}])[0]
    assert ids == [mistral.bos_token_id] + mistral("How do you say cat in Spanish? gato</s>",
                                                   add_special_tokens=False)["input_ids"]
    assert trained_runs(mistral, labels) == ["gato</s>"]
    assert labels[-1] == mistral.eos_token_id  # the model learns to stop


def test_merge_across_prompt_completion_boundary(tmp_path, mistral):
    # "The cat" + "s sleep." tokenizes as ▁The ▁cats ▁sleep . </s>: "▁cats" starts in the prompt.
    ids, labels, _ = one_sample(tmp_path, [{"prompt": "The cat", "completion": "s sleep."}])[0]
    pieces = mistral.convert_ids_to_tokens(ids)
    assert pieces == ["<s>", "▁The", "▁cats", "▁sleep", ".", "</s>"]  # the tokens seen at inference
    assert trained_runs(mistral, labels) == ["sleep.</s>"]
    assert labels[2] == -100  # the merged token is not trained: it starts in the prompt


def test_completion_after_trailing_space_keeps_first_word(tmp_path, mistral):
    # The space before the answer belongs to the untrained header, but "▁Paris" is still trained.
    _, labels, _ = one_sample(tmp_path, [{"question": "Capital of France?", "answer": "Paris"}],
                              prompt="Q: {question}\nA: ", completion="{answer}")[0]
    assert trained_runs(mistral, labels) == ["Paris</s>"]


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", [CHATML_TOK, MISTRAL], ids=["special-tokens", "plain-text"])
@pytest.mark.parametrize("policy,expected", [
    ("auto", ["Hi there!<|im_end|>", "Goodbye.<|im_end|>"]),
    ("assistant", ["Hi there!<|im_end|>", "Goodbye.<|im_end|>"]),
    ("last", ["Goodbye.<|im_end|>"]),
])
def test_chatml_assistant_turns(tmp_path, tokenizer, policy, expected, mistral):
    ids, labels, _ = one_sample(tmp_path, [CHAT], tokenizer, template="chatml", train_on=policy)[0]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    assert [r.strip() for r in trained_runs(tok, labels)] == expected
    if tokenizer == CHATML_TOK:
        assert labels.count(tok.convert_tokens_to_ids("<|im_end|>")) == len(expected)


def test_chatml_train_on_all_trains_everything_but_the_first_token(tmp_path, mistral_chatml):
    ids, labels, _ = one_sample(tmp_path, [CHAT], CHATML_TOK, template="chatml", train_on="all")[0]
    assert labels[0] == -100 and labels[1:] == ids[1:]


@pytest.mark.slow
def test_tokenizer_chat_template_matches_chatml_preset(tmp_path, mistral_chatml):
    a = one_sample(tmp_path / "a", [CHAT], CHATML_TOK, template="tokenizer")[0]
    b = one_sample(tmp_path / "b", [CHAT], CHATML_TOK, template="chatml")[0]
    # the template writes no BOS, so none is added (the preset gets the tokenizer's one)
    assert a[0] == mistral_chatml.apply_chat_template(CHAT["messages"], tokenize=True, return_dict=False)
    assert b[0][0] == mistral_chatml.bos_token_id and a[0] == b[0][1:] and a[1][1:] == b[1][2:]
    assert trained_runs(mistral_chatml, a[1]) == ["Hi there!<|im_end|>", "Goodbye.<|im_end|>"]


def test_chat_records_default_to_the_tokenizers_chat_template(tmp_path, mistral_chatml):
    manifest, table = build_records(tmp_path, [CHAT], CHATML_TOK, packing="none")
    ids, labels, _ = samples_of(table)[0]
    assert ids == mistral_chatml.apply_chat_template(CHAT["messages"], tokenize=True, return_dict=False)
    assert trained_runs(mistral_chatml, labels) == ["Hi there!<|im_end|>", "Goodbye.<|im_end|>"]
    assert manifest["template"] == "tokenizer (default for chat records)"


@pytest.mark.slow
@pytest.mark.parametrize("template,expected_text", [
    ("alpaca", "Below is an instruction that describes a task. Write a response that appropriately "
               "completes the request.\n\n### Instruction:\nTranslate\nbonjour\n\n### Response:\nhello</s>\n\n"),
    ("vicuna", None), ("qa", "### Question: Translate\nbonjour\n ### Answer: hello</s>\n"),
    ("mistral", "[INST] Translate\nbonjour [/INST] hello</s>"),
    ("llama2", "[INST] Translate\nbonjour [/INST] hello </s>"),
])
def test_plain_text_presets_train_completion_and_eos(tmp_path, mistral, template, expected_text):
    rec = {"instruction": "Translate", "input": "bonjour", "output": "hello"}
    ids, labels, _ = one_sample(tmp_path, [rec], template=template)[0]
    runs = trained_runs(mistral, labels)
    assert runs in (["hello</s>"], ["hello </s>"])
    if expected_text:
        assert mistral.decode(ids[1:]) == mistral.decode(mistral(expected_text, add_special_tokens=False)["input_ids"])


def test_alpaca_empty_input_and_real_data(tmp_path, mistral):
    import json

    recs = json.loads((DATA / "alpaca_en.json").read_text())[:5]
    assert any(r["input"] == "" for r in recs)
    samples = one_sample(tmp_path, recs, template="alpaca", max_length=2048)
    for (ids, labels, sid), rec in zip(samples, recs):
        assert trained_runs(mistral, labels) == [rec["output"].strip() + "</s>"] or \
            "".join(trained_runs(mistral, labels)) == rec["output"] + "</s>"
        assert "### Input" not in mistral.decode(ids) if rec["input"] == "" else True


def test_sharegpt_tool_calls_are_trained_observations_are_not(tmp_path, mistral_chatml):
    import json

    recs = [json.loads(line) for line in (DATA / "glaive_toolcall.jsonl").read_text().splitlines()[:3]]
    samples = one_sample(tmp_path, recs, CHATML_TOK, template="chatml", max_length=4096)
    for (ids, labels, _), rec in zip(samples, recs):
        expected = []
        for turn in rec["conversations"]:
            if turn["from"] == "gpt":
                expected.append(turn["value"] + "<|im_end|>")
            elif turn["from"] == "function_call":
                expected.append(f"<tool_call>\n{turn['value']}\n</tool_call><|im_end|>")
        assert trained_runs(mistral_chatml, labels) == expected
        text = mistral_chatml.decode(ids)
        has_tools = rec["tools"] not in ("", "[]")
        assert ("You have access to the following functions" in text) == has_tools  # tools reach the prompt
        assert ("<|im_start|>tool\n" in text) == any(t["from"] == "observation" for t in rec["conversations"])


def test_text_format_trains_all_and_appends_eos(tmp_path, mistral):
    ids, labels, _ = one_sample(tmp_path, [{"text": "Plain language modelling text."}])[0]
    assert trained_runs(mistral, labels) == ["Plain language modelling text.</s>"]
    assert ids[0] == mistral.bos_token_id and ids.count(mistral.bos_token_id) == 1


def test_response_template_on_characters(tmp_path, mistral):
    text = "### Question: What is 2+2?\n ### Answer: 4"
    _, labels, _ = one_sample(tmp_path, [{"text": text}], response_template="### Answer:")[0]
    assert trained_runs(mistral, labels) == ["4</s>"]


def test_response_and_instruction_template_multi_turn(tmp_path, mistral):
    text = "### Human: hi\n### Assistant: hello\n### Human: bye\n### Assistant: ciao"
    _, labels, _ = one_sample(tmp_path, [{"text": text}], response_template="### Assistant:",
                              instruction_template="### Human:")[0]
    assert trained_runs(mistral, labels) == ["hello\n", "ciao</s>"]


def test_response_template_missing_is_rejected_with_reason(tmp_path):
    manifest, _ = build_records(tmp_path, [{"text": "no marker here"}, {"text": "A: ok"}],
                                response_template="A:", packing="none")
    assert manifest["totals"]["dropped_by_reason"] == {"response_template_not_found": 1}
    rejects = (tmp_path / "out" / "rejects.jsonl").read_text()
    assert "out.jsonl:1" in rejects and "not found" in rejects


def test_custom_fields_qlora_seed_csv(tmp_path, mistral_chatml):
    """The seed QLoRA recipe: CSV columns system/question/chosen, ChatML."""
    import csv

    from sftprep import build, config_from_dict, load

    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system", "question", "chosen"])
        w.writerow(["Be brief.", "2+2?", "4"])
    cfg = config_from_dict({"inputs": [str(path)], "tokenizer": CHATML_TOK, "template": "chatml",
                            "fields": {"prompt": "question", "completion": "chosen"},
                            "out": str(tmp_path / "o"), "packing": "none", "max_length": 128})
    build(cfg)
    ids, labels, _ = samples_of(load(tmp_path / "o"))[0]
    assert mistral_chatml.decode(ids) == ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                                          "2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n")
    assert trained_runs(mistral_chatml, labels) == ["4<|im_end|>"]


def test_python_callable_template(tmp_path, mistral):
    _, labels, _ = one_sample(tmp_path, [{"q": "2+2?", "a": "4"}], template="tests.helpers_template:render",
                                allow_code=True)[0]
    assert trained_runs(mistral, labels) == ["4</s>"]


def test_chinese_text_round_trips(tmp_path, mistral):
    import json

    recs = [json.loads(line) for line in (DATA / "alpaca_zh.jsonl").read_text().splitlines()[:5]]
    for (ids, labels, _), rec in zip(one_sample(tmp_path, recs, max_length=2048), recs):
        assert "".join(trained_runs(mistral, labels)) == rec["output"] + "</s>"


def test_mistral_preset_keeps_the_first_character_of_an_answer(tmp_path, mistral):
    # "[/INST]{" would merge into "]{" and leave "{" untrained; Mistral's template puts a space there
    ids, labels, _ = one_sample(tmp_path, [{"prompt": "Give JSON", "completion": '{"a": 1}'}], template="mistral")[0]
    assert trained_runs(mistral, labels) == ['{"a": 1}</s>']
    assert mistral.decode(ids).endswith('[/INST] {"a": 1}</s>')


@pytest.mark.slow
def test_chatml_preset_warns_when_its_markers_are_plain_text(tmp_path):
    manifest, _ = build_records(tmp_path / "a", [CHAT], MISTRAL, template="chatml")
    assert manifest["warnings"] == ["template 'chatml': <|im_start|>, <|im_end|> are not a single token of this "
                                    "tokenizer, so the model learns each as several plain-text pieces; use a "
                                    "tokenizer that has them as special tokens (or --template tokenizer)"]
    manifest, _ = build_records(tmp_path / "b", [CHAT], CHATML_TOK, template="chatml")
    assert manifest["warnings"] == []


def test_openai_content_parts_are_joined_and_non_text_parts_rejected(tmp_path, mistral_chatml):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "A cat."}]}
    manifest, table = build_records(tmp_path, [parts, image], CHATML_TOK, template="chatml", packing="none")
    ids, labels, _ = samples_of(table)[0]
    assert "<|im_start|>user\nHi\nthere<|im_end|>" in mistral_chatml.decode(ids)
    assert trained_runs(mistral_chatml, labels) == ["Hello!<|im_end|>"]
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["non_text_content"]
    assert "messages[0].content[0]: a content part of type 'image_url'" in rejects[0]["message"]


LONG_CHAT = {"messages": [{"role": "system", "content": "Be brief."}] + [
    m for k in range(4) for m in ({"role": "user", "content": f"Question {k}: " + "word " * 30},
                                   {"role": "assistant", "content": f"Answer {k}: " + "done " * 20})]}


@pytest.mark.slow
@pytest.mark.parametrize("truncation,kept", [("keep_start", [0, 1]), ("keep_end", [2, 3])])
def test_turn_truncation_drops_whole_exchanges_and_keeps_every_end_token(tmp_path, mistral_chatml, truncation, kept):
    full = mistral_chatml.apply_chat_template(LONG_CHAT["messages"], tokenize=True, return_dict=False)
    manifest, table = build_records(tmp_path, [LONG_CHAT], CHATML_TOK, template="tokenizer", packing="none",
                                    truncation=truncation, truncation_unit="turns", max_length=len(full) // 2 + 10)
    ids, labels, _ = samples_of(table)[0]
    msgs = LONG_CHAT["messages"]
    expected = [msgs[0]] + [m for k in kept for m in msgs[1 + 2 * k: 3 + 2 * k]]
    assert ids == mistral_chatml.apply_chat_template(expected, tokenize=True, return_dict=False)
    assert trained_runs(mistral_chatml, labels) == [f"Answer {k}: " + "done " * 20 + "<|im_end|>" for k in kept]
    assert manifest["totals"]["samples_truncated"] == 1


def test_turn_truncation_rejects_a_sample_whose_single_turn_does_not_fit(tmp_path):
    manifest, _ = build_records(tmp_path, [LONG_CHAT, CHAT], CHATML_TOK, template="tokenizer",
                                truncation_unit="turns", max_length=60)
    assert manifest["totals"]["dropped_by_reason"] == {"too_long": 1}
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text())
    assert reject["message"].endswith("tokens > max_length 60, and no whole turn fits (--truncation-unit turns)")


@pytest.mark.slow
@pytest.mark.parametrize("template,outcome", [
    # looks at the text but writes the same with and without markers: verified, built
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content.startswith('#') %}# {% endif %}"
     "{{ m.content }}<|im_end|>\n{% endfor %}", "built"),
    # cuts the text by position: markers would shift the cut, so the record is rejected, never guessed
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content[:4] }}<|im_end|>\n{% endfor %}",
     "template_changes_text"),
])
def test_templates_that_inspect_text_are_checked_against_a_plain_render(tmp_path, template, outcome):
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(CHATML_TOK, tok)
    (tok / "chat_template.jinja").write_text(template + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    chats = [CHAT, {"messages": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "Hi"}]}]
    manifest, _ = build_records(tmp_path, chats, str(tok), template="tokenizer", max_reject_ratio=1.0)
    if outcome == "built":
        assert manifest["totals"]["samples_kept"] == 2
    else:
        assert manifest["totals"]["dropped_by_reason"] == {"template_changes_text": 1}  # "Yo"/"Hi" are not cut


@pytest.fixture(scope="module")
def bosless():
    """A byte-level BPE tokenizer with no BOS at all (Qwen2.5's layout): position 0 is real text."""
    from tests.chat_families import family_path, load_family

    return str(family_path("qwen2.5")), load_family("qwen2.5")


def test_without_bos_the_first_token_is_still_never_trained(tmp_path, bosless):
    path, tok = bosless
    assert tok.bos_token is None
    _, table = build_records(tmp_path, [{"text": "Plain text, trained everywhere."}] * 3, path, train_on="all")
    for row in table.to_pylist():  # packed: every sample's first token is -100, the rest trained
        starts = [sum(row["seq_lens"][:k]) for k in range(len(row["seq_lens"]))]
        assert all(row["labels"][s] == -100 for s in starts)
        assert row["labels"][1] == row["input_ids"][1]


def test_without_bos_keep_end_truncation_leaves_the_first_token_untrained(tmp_path, bosless):
    path, tok = bosless
    rec = {"prompt": "Count:", "completion": " " + " ".join(str(i) for i in range(200))}
    ids, labels, _ = one_sample(tmp_path, [rec], path, truncation="keep_end", max_length=64)[0]
    assert len(ids) == 64 and labels[0] == -100 and labels[1] == ids[1]  # cut inside the completion


@pytest.mark.slow
@pytest.mark.parametrize("truncation", ["keep_start", "keep_end"])
def test_turn_truncation_of_a_long_conversation_takes_few_renders_and_keeps_the_most_exchanges(
        tmp_path, monkeypatch, mistral_chatml, truncation):
    """A 1,000-exchange record used to be re-rendered once per dropped exchange (a 10k-turn one took minutes):
    the exchange count is bisected, and it is still the largest that fits."""
    from sftprep.render.chat import ChatTemplate

    calls = []
    real = ChatTemplate.segments
    monkeypatch.setattr(ChatTemplate, "segments", lambda self, conv: calls.append(1) or real(self, conv))
    msgs = [m for k in range(1000) for m in ({"role": "user", "content": f"Question {k}?"},
                                             {"role": "assistant", "content": f"Answer {k}."})]
    manifest, table = build_records(tmp_path, [{"messages": msgs}], CHATML_TOK, template="tokenizer",
                                    packing="none", truncation=truncation, truncation_unit="turns", max_length=2000)
    assert len(calls) <= 2 + 12  # the record, its bisection (log2 of 1,000), and slack; it was ~1,000
    ids, _, _ = samples_of(table)[0]
    pairs = [msgs[i:i + 2] for i in range(0, len(msgs), 2)]
    k = next(k for k in range(1, 1000) if mistral_chatml.apply_chat_template(
        [m for p in (pairs[:k] if truncation == "keep_start" else pairs[-k:]) for m in p],
        tokenize=True, return_dict=False) == ids)
    bigger = [m for p in (pairs[:k + 1] if truncation == "keep_start" else pairs[-k - 1:]) for m in p]
    assert len(ids) <= 2000 < len(mistral_chatml.apply_chat_template(bigger, tokenize=True, return_dict=False))


@pytest.mark.parametrize("template", [
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n<|im_end|>\n{% endfor %}",  # no text at all
    "{{ bos_token }}Hello{{ eos_token }}",  # ignores messages
    "{% for m in messages %}{% if m.role == 'user' %}<|im_start|>user\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}",  # writes the user's text only
])
def test_a_template_that_writes_no_assistant_text_rejects_the_record(tmp_path, template):
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(CHATML_TOK, tok)
    (tok / "chat_template.jinja").write_text(template + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    chats = [CHAT, {"messages": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "Hi"}]}]
    r = sftprep_cli("build", "-i", write_jsonl(tmp_path / "c.jsonl", chats), "-t", tok, "--template", "tokenizer",
                    "-o", tmp_path / "o")
    assert r.exit_code == 2 and "2 of 2 records rejected" in r.output and "template_drops_text: 2" in r.output
    assert "]: the chat template writes none of this assistant turn's text, so only its end would be trained" in r.output
