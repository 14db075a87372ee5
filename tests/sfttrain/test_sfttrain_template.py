"""The template the shards were built with is saved with the adapter: the saved tokenizer's
chat_template writes a conversation to exactly the token ids the model was trained on."""

import json

import pytest

from sftprep import samples
from sfttrain import train
from tests.sfttrain_helpers import (CHATML_TOKENIZER, SPANISH, TOKENIZER, build_shards, make_tiny_model,  # noqa: F401
                                    one_thread, train_config)


@pytest.mark.parametrize("template,tokenizer", [("chatml", CHATML_TOKENIZER), ("alpaca", TOKENIZER)])
def test_adapter_carries_the_builds_chat_template(tmp_path, one_thread, template, tokenizer):  # noqa: F811
    from transformers import AutoTokenizer

    shards = build_shards(tmp_path, SPANISH[:2], tokenizer=tokenizer, template=template)
    model = make_tiny_model(tmp_path / "model", tokenizer=tokenizer)
    if template == "alpaca":
        assert not AutoTokenizer.from_pretrained(model).chat_template  # the model's tokenizer has none
    result = train(train_config(shards, model, tmp_path / "run", max_steps=1), disable_tqdm=True)

    tok = AutoTokenizer.from_pretrained(result.final_dir)
    table = samples(shards).to_pylist()
    assert len(table) == 2
    for (prompt, completion), sample in zip(SPANISH[:2], sorted(table, key=lambda r: r["sample_id"])):
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        text = tok.apply_chat_template(chat, tokenize=False)
        ids = tok.apply_chat_template(chat, tokenize=True, return_dict=False) if text.startswith(tok.bos_token) \
            else tok(text).input_ids  # BOS written by the template, or added by the tokenizer
        assert list(ids) == list(sample["input_ids"]), (tok.decode(ids), tok.decode(sample["input_ids"]))
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt)  # the generation prompt is the untrained prefix
    info = json.loads((tmp_path / "run" / "final" / "sfttrain.json").read_text())
    assert info["data"]["template"] == template


QWEN_TEMPLATE = CHATML_TOKENIZER.parents[1] / "chat_templates" / "qwen2_5.jinja"
CHATS = [[{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}] for p, c in SPANISH[:2]]


def assert_trained_with(tok, shards, template: str) -> None:
    """`tok` carries `template`, and writes each of CHATS to the ids the build trained on."""
    assert tok.chat_template == template
    table = sorted(samples(shards).to_pylist(), key=lambda r: r["sample_id"])
    for chat, sample in zip(CHATS, table):
        ids = tok.apply_chat_template(chat, tokenize=True, return_dict=False)
        assert list(ids) == list(sample["input_ids"]), tok.decode(sample["input_ids"])


def test_a_chat_template_file_builds_trains_and_is_saved_with_the_adapter(tmp_path, one_thread):  # noqa: F811
    """`chat_template: FILE` (API): the build renders with the file, not the tokenizer's own ChatML template
    (Qwen 2.5's adds its default system prompt), copies it into tokenizer/, names it in the manifest; the
    trained adapter's tokenizer carries it and writes the trained ids."""
    from transformers import AutoTokenizer

    from sftprep import build, config_from_dict
    from tests.conftest import write_jsonl

    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CHATS])
    manifest = build(config_from_dict({"inputs": [str(data)], "tokenizer": str(CHATML_TOKENIZER), "max_length": 128,
                                       "out": str(tmp_path / "shards"), "chat_template": str(QWEN_TEMPLATE)}))
    template = QWEN_TEMPLATE.read_text(encoding="utf-8")
    assert manifest["template"] == "chat template file qwen2_5.jinja"
    assert manifest["config"]["template"]["chat_template"] == str(QWEN_TEMPLATE)
    assert (tmp_path / "shards" / "tokenizer" / "chat_template.jinja").read_text(encoding="utf-8") == template
    assert_trained_with(AutoTokenizer.from_pretrained(tmp_path / "shards" / "tokenizer"), tmp_path / "shards", template)
    assert "You are Qwen" in AutoTokenizer.from_pretrained(tmp_path / "shards" / "tokenizer").decode(
        samples(tmp_path / "shards").to_pylist()[0]["input_ids"])

    model = make_tiny_model(tmp_path / "model", tokenizer=CHATML_TOKENIZER)  # its tokenizer: ChatML
    result = train(train_config(tmp_path / "shards", model, tmp_path / "run", max_steps=1), disable_tqdm=True)
    assert_trained_with(AutoTokenizer.from_pretrained(result.final_dir), tmp_path / "shards", template)


def test_chat_template_path_from_yaml_through_both_clis(tmp_path, one_thread):  # noqa: F811
    """TRL's `chat_template_path` in a build YAML (relative to the file) works as `--chat-template`: the
    summary names the file; `sfttrain run` saves the adapter with it."""
    import shutil

    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from sfttrain.cli import main as sfttrain_main
    from tests.conftest import sftprep_cli, write_jsonl

    shutil.copy(QWEN_TEMPLATE, tmp_path / "mine.jinja")
    write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CHATS])
    (tmp_path / "build.yaml").write_text(f"inputs: chats.jsonl\ntokenizer: {CHATML_TOKENIZER}\nmax_length: 128\n"
                                         "chat_template_path: mine.jinja\nout: shards\n")
    result = sftprep_cli("build", tmp_path / "build.yaml")
    assert result.exit_code == 0, result.output
    assert "chat template file mine.jinja" in result.output
    model = make_tiny_model(tmp_path / "model", tokenizer=CHATML_TOKENIZER)
    result = CliRunner().invoke(sfttrain_main, ["run", str(tmp_path / "shards"), "--model", str(model),
                                                "--output-dir", str(tmp_path / "run"), "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    assert_trained_with(AutoTokenizer.from_pretrained(tmp_path / "run" / "final"), tmp_path / "shards",
                        QWEN_TEMPLATE.read_text(encoding="utf-8"))


def test_a_chat_template_file_with_a_preset_or_missing_is_one_clear_error(tmp_path):
    from tests.conftest import sftprep_cli, write_jsonl

    write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CHATS])
    common = ["build", "-i", tmp_path / "chats.jsonl", "-t", CHATML_TOKENIZER, "-o", tmp_path / "out"]
    result = sftprep_cli(*common, "--chat-template", QWEN_TEMPLATE, "--template", "chatml")
    assert result.exit_code == 2 and "(--chat-template) is a Jinja chat template" in result.output
    assert "template='chatml'" in result.output and "Traceback" not in result.output
    result = sftprep_cli(*common, "--chat-template", tmp_path / "nope.jinja")
    assert result.exit_code == 2 and f"--chat-template {tmp_path / 'nope.jinja'}: no such file" in result.output
