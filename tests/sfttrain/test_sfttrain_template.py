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
