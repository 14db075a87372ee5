"""IterativeTrainer: step() on a live model trains what a build + one `sfttrain run` step train,
TRL's step() forms give TRL's documented labels, bad records come back as rejects, save/resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from sfttrain import ConfigError, IterativeTrainer, train
from tests.conftest import write_jsonl
from tests.sfttrain_helpers import (CHATML_TOKENIZER, SPANISH, TOKENIZER, make_tiny_model, one_thread,  # noqa: F401
                                    spanish_shards, tiny_model, train_config)

IGNORE = -100
FAST = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, seed=0, learning_rate=1e-3, logging_steps=1, save_steps=1000)

CHAT_RECORDS = [
    {"prompt": "How do you say cat in Spanish?", "completion": "gato"},
    {"messages": [{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "How do you say dog in Spanish?"},
                  {"role": "assistant", "content": "perro"},
                  {"role": "user", "content": "And house?"},
                  {"role": "assistant", "content": "casa"}]},
    {"prompt": "Count: " + " ".join(str(i) for i in range(40)), "completion": "forty numbers, from 0 to 39"},
    {"prompt": "How do you say water in Spanish?"},  # no completion: rejected by the build and by step()
    {"messages": [{"role": "user", "content": "How do you say book in Spanish?"},
                  {"role": "assistant", "content": "libro"}]},
    {"prompt": "How do you say sun in Spanish?", "completion": "sol"},
]
BUILD = dict(template="chatml", max_length=48, truncation="keep_end", packing="bfd")


@pytest.fixture(scope="module")
def chatml_model(tmp_path_factory) -> Path:
    """The tiny Llama with the ChatML tokenizer (32,002 ids) in its folder."""
    return make_tiny_model(tmp_path_factory.mktemp("chatml-llama"), tokenizer=CHATML_TOKENIZER)


def _adapter(folder) -> dict:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def _build(tmp_path: Path, records: list, **settings) -> Path:
    from sftprep import build, config_from_dict

    data = write_jsonl(tmp_path / "data.jsonl", records)
    build(config_from_dict({"inputs": [str(data)], "tokenizer": str(CHATML_TOKENIZER), "out": str(tmp_path / "shards"),
                            **settings}))
    return tmp_path / "shards"


# -- the same step as a build + sfttrain run ---------------------------------------------------------

def test_step_on_records_is_one_sfttrain_run_step_on_their_build(tmp_path, chatml_model, one_thread):  # noqa: F811
    shards = _build(tmp_path, CHAT_RECORDS, **BUILD)
    manifest = json.loads((shards / "manifest.json").read_text())
    rows = manifest["totals"]["rows"]
    truncated = manifest["totals"]["samples_truncated"]
    assert rows >= 2 and truncated >= 1
    # sfttrain run: every row in one batch, one optimizer step
    run = train(train_config(shards, chatml_model, tmp_path / "run", max_steps=1, per_device_batch_size=rows,
                             **FAST), disable_tqdm=True)
    run_loss = next(h["loss"] for h in run.log_history if "loss" in h)

    # step(): one row per micro-batch, accumulated into one optimizer step
    t = IterativeTrainer(chatml_model, tmp_path / "it", max_steps=1, per_device_batch_size=1, **BUILD, **FAST)
    stats = t.step(records=CHAT_RECORDS)
    assert stats["step"] == 1 and stats["rows"] == rows and stats["micro_batches"] == rows
    assert stats["loss"] == pytest.approx(run_loss, rel=1e-6)
    assert stats["trained_tokens"] == manifest["totals"]["trained_tokens"]
    assert stats["tokens"] == manifest["totals"]["tokens"] and stats["truncated"] == truncated
    assert stats["learning_rate"] == pytest.approx(1e-3) and stats["tokens_per_s"] > 0
    build_rejects = [json.loads(line) for line in (shards / "rejects.jsonl").read_text().splitlines()]
    assert [(r["index"], r["reason"], r["message"]) for r in stats["rejects"]] == [
        (r["sample_id"], r["reason"], r["message"]) for r in build_rejects] == [
        (3, "unknown_format", build_rejects[0]["message"])]

    with pytest.raises(ValueError, match="planned max_steps=1 steps and has taken them"):
        t.step(records=CHAT_RECORDS)
    a, b = _adapter(run.final_dir), _adapter(t.save())
    assert a.keys() == b.keys()
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-4  # the step moved the adapter (B starts at 0)
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-6, k


def test_qlora_and_gradient_checkpointing_step_as_a_run_does(tmp_path, tiny_model, spanish_shards,  # noqa: F811
                                                             one_thread):  # noqa: F811
    pytest.importorskip("bitsandbytes")
    flat = dict(FAST, max_steps=1, per_device_batch_size=8, load_in_4bit=True, gradient_checkpointing=True)
    run = train(train_config(spanish_shards, tiny_model, tmp_path / "run", **flat), disable_tqdm=True)
    t = IterativeTrainer(tiny_model, tmp_path / "it", max_length=64, **flat)  # the fixture build's settings
    stats = t.step(records=[{"prompt": p, "completion": c} for p, c in SPANISH])
    assert stats["loss"] == pytest.approx(next(h["loss"] for h in run.log_history if "loss" in h), rel=1e-6)
    a, b = _adapter(run.final_dir), _adapter(t.save())
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_records_are_labelled_and_packed_as_the_build_does(tmp_path, chatml_model):
    shards = _build(tmp_path, CHAT_RECORDS, **BUILD)
    import sftprep
    from tests.conftest import samples_of

    built = [(ids, labels) for ids, labels, _ in samples_of(sftprep.load(shards))]
    t = IterativeTrainer(chatml_model, tmp_path / "it", **BUILD, **FAST)
    prepared = t.prepare(records=CHAT_RECORDS)
    assert [(s[0].tolist(), s[1].tolist()) for s in prepared["samples"]] == built
    assert sorted(len(r["seq_lens"]) for r in prepared["rows"]) == sorted(
        len(r) for r in sftprep.load(shards).column("seq_lens").to_pylist())


# -- TRL's forms ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tiny_model):  # noqa: F811
    return IterativeTrainer(tiny_model, tmp_path_factory.mktemp("trl") / "it", max_length=8,
                            truncation_mode="keep_end", **FAST)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def _samples(prepared) -> list[tuple[list[int], list[int]]]:
    return [(ids.tolist(), labels.tolist()) for ids, labels in prepared["samples"]]


def test_trl_texts_are_tokenized_by_the_tokenizer_and_all_trained(trainer, tok):
    # TRL: input_ids = tokenizer(texts, truncation=True, max_length=...) (BOS added); labels created from the
    # texts ("texts_labels ... if set to None, will default to text"). Labels are unshifted: the first token's
    # label is never a target, so -100 there changes nothing.
    ids = tok("Hola mundo").input_ids
    assert ids[0] == tok.bos_token_id
    assert _samples(trainer.prepare(texts=["Hola mundo"])) == [(ids, [IGNORE] + ids[1:])]
    assert _samples(trainer.prepare(texts=["Hola mundo"], texts_labels=["Hola mundo"])) == [(ids, [IGNORE] + ids[1:])]
    # EOS written in the text is trained although the tokenizer's pad is EOS (TRL's collator masked pad ids)
    ids = tok("Hi</s>").input_ids
    assert ids[-1] == tok.eos_token_id == trainer.build.identity["pad_id"]
    assert _samples(trainer.prepare(texts=["Hi</s>"])) == [(ids, [IGNORE] + ids[1:])]


def test_trl_texts_labels_are_the_responses_that_end_the_texts(trainer, tok):
    # TRL's usage: texts = prompt + response, texts_labels = the response: only the response is trained
    ids = tok("Hi there: gato").input_ids
    prompt = tok("Hi there:").input_ids
    assert ids[:len(prompt)] == prompt and len(ids) > len(prompt)
    prepared = trainer.prepare(texts=["Hi there: gato"], texts_labels=[" gato"])
    assert prepared["rejects"] == [] and _samples(prepared) == [
        (ids, [IGNORE] * len(prompt) + ids[len(prompt):])]
    stats = trainer.step(texts=["Hi there: gato", "Bye: perro"], texts_labels=[" gato", " perro"])
    assert stats["samples"] == 2 and stats["rejects"] == [] and np.isfinite(stats["loss"])
    # a response that does not end its text: a reject that says so
    bad = trainer.prepare(texts=["Hi there: gato"], texts_labels=["perro"])["rejects"]
    assert [(r["reason"], r["message"]) for r in bad] == [(
        "response_not_found", "texts_labels[0] 'perro' is not the end of texts[0] 'Hi there: gato': texts_labels "
        "are the responses that end each text")]


def test_trl_a_single_string_is_refused_with_the_fix(trainer):
    with pytest.raises(TypeError, match=r"texts must be a list with one entry per sample, got a single str: "
                                        r"pass texts=\[...\]"):
        trainer.step(texts="Hola mundo")


def test_trl_padded_2d_input_ids_never_train_pads(trainer):
    import torch

    pad = trainer.build.identity["pad_id"]
    a, b = [1, 10, 11, 12, 13], [1, 20, 21]
    batch = torch.tensor([a, b + [pad, pad]])  # right padding, as a tokenizer with padding=True returns
    want = [(a, [IGNORE] + a[1:]), (b, [IGNORE] + b[1:])]
    assert _samples(trainer.prepare(input_ids=batch)) == want  # without a mask, the pad id decides
    mask = torch.tensor([[1] * 5, [1] * 3 + [0, 0]])
    assert _samples(trainer.prepare(input_ids=batch, attention_mask=mask)) == want
    left = torch.tensor([a, [pad, pad] + b])  # left padding
    assert _samples(trainer.prepare(input_ids=left)) == want
    stats = trainer.step(input_ids=batch)
    assert stats["trained_tokens"] == 4 + 2 and stats["tokens"] == 8


def test_trl_truncation_mode_cuts_where_the_tokenizer_does(trainer, tok):
    text = "one two three four five six seven eight nine ten"
    full = tok(text).input_ids
    assert len(full) == 11
    prepared = trainer.prepare(texts=[text])  # keep_end, max_length 8: BOS kept, the start of the text cut
    assert _samples(prepared) == [([full[0]] + full[-7:], [IGNORE] + full[-7:])]
    assert prepared["truncated"] == 1
    prepared = trainer.prepare(input_ids=[full])  # ids as given: keep_end slices them
    assert _samples(prepared) == [(full[-8:], [IGNORE] + full[-7:])]


def test_trl_input_ids_labels_and_attention_mask(trainer):
    import torch

    a, b = [1, 10, 11, 12, 13], [1, 20, 21, 22]
    # labels default to the input ids
    assert _samples(trainer.prepare(input_ids=[torch.tensor(a), torch.tensor(b)])) == [
        (a, [IGNORE] + a[1:]), (b, [IGNORE] + b[1:])]
    # labels as given (-100 where not trained)
    lab = [IGNORE, IGNORE, IGNORE, 12, 13]
    assert _samples(trainer.prepare(input_ids=[torch.tensor(a)], labels=[torch.tensor(lab)])) == [(a, lab)]
    # attention_mask 0 (left padding): those positions are neither attended nor trained
    padded, mask = [2, 2] + b, [0, 0, 1, 1, 1, 1]
    assert _samples(trainer.prepare(input_ids=[padded], attention_mask=[mask])) == [(b, [IGNORE] + b[1:])]


def test_trl_step_trains_and_bad_items_are_rejects_not_errors(trainer):
    before = trainer.global_step
    stats = trainer.step(input_ids=[[1, 10, 11, 12], [1, 5], [1, 99999], [1, 7, 8]], labels=[
        [IGNORE, 10, 11, 12], [IGNORE, IGNORE], [IGNORE, 3], [IGNORE, 7]])
    assert stats["step"] == before + 1 and stats["samples"] == 1 and stats["trained_tokens"] == 3
    assert [(r["index"], r["reason"]) for r in stats["rejects"]] == [
        (1, "no_trained_tokens"), (2, "bad_token_id"), (3, "labels_length_mismatch")]
    stats = trainer.step(texts=["Hola mundo", 42])
    assert stats["samples"] == 1 and [r["reason"] for r in stats["rejects"]] == ["wrong_type"]
    assert np.isfinite(stats["loss"])


# -- rejects, settings ------------------------------------------------------------------------------

def test_bad_records_come_back_as_rejects_and_nothing_left_means_no_step(trainer):
    before = trainer.global_step
    stats = trainer.step(records=[{"prompt": "a"}, {"text": ""}, "not a record", {"foo": 1}])
    assert stats["loss"] is None and stats["step"] == before == trainer.global_step
    assert [r["reason"] for r in stats["rejects"]] == ["unknown_format", "empty_text", "unreadable", "unknown_format"]
    assert stats["rejects"][2]["message"] == "a record must be a mapping, got str"
    with pytest.raises(ValueError, match="one of records=, texts="):
        trainer.step(records=[{"text": "a b"}], texts=["a b"])
    with pytest.raises(TypeError, match="records must be a list"):
        trainer.step(records={"text": "a b"})


def test_settings_are_checked_before_the_model_is_loaded(tmp_path, tiny_model):  # noqa: F811
    with pytest.raises(ConfigError, match=r"unknown setting `lora_rank` \(did you mean 'lora_r'\?\)"):
        IterativeTrainer(tiny_model, tmp_path / "a", lora_rank=8)
    with pytest.raises(ConfigError, match="`shards` does not apply"):
        IterativeTrainer(tiny_model, tmp_path / "a", shards="x/")
    with pytest.raises(ConfigError, match="lr_scheduler 'cosine' decays over a planned number of steps"):
        IterativeTrainer(tiny_model, tmp_path / "a", lr_scheduler="cosine")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps does not apply"):
        IterativeTrainer(tiny_model, tmp_path / "a", gradient_accumulation_steps=4)
    with pytest.raises(ConfigError, match="unknown template 'chatlm'"):
        IterativeTrainer(tiny_model, tmp_path / "a", template="chatlm")


# -- save, resume, generate ---------------------------------------------------------------------------

STEPS = [[{"prompt": p, "completion": c} for p, c in SPANISH[i:i + 3]] for i in (0, 1, 2)]
RESUMABLE = dict(FAST, lora_dropout=0.1, template="chatml", max_length=64)


def test_save_then_resume_continues_exactly_and_final_loads_like_a_run(tmp_path, tiny_model, one_thread):  # noqa: F811
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfttrain import merge

    straight = IterativeTrainer(tiny_model, tmp_path / "a", **RESUMABLE)
    losses = [straight.step(records=s)["loss"] for s in STEPS]
    expected = _adapter(straight.save())

    first = IterativeTrainer(tiny_model, tmp_path / "b", **RESUMABLE)
    assert [first.step(records=s)["loss"] for s in STEPS[:2]] == pytest.approx(losses[:2], rel=1e-6)
    first.save()
    assert (tmp_path / "b" / "checkpoint-2" / "optimizer.pt").is_file()
    with pytest.raises(ConfigError, match="already holds checkpoint-2: pass --resume"):
        IterativeTrainer(tiny_model, tmp_path / "b", **RESUMABLE)
    resumed = IterativeTrainer(tiny_model, tmp_path / "b", resume=True, **RESUMABLE)
    assert resumed.global_step == 2
    assert resumed.step(records=STEPS[2])["loss"] == pytest.approx(losses[2], rel=1e-6)
    final = Path(resumed.save())
    got = _adapter(final)
    assert got.keys() == expected.keys()
    for k in got:
        assert (got[k] - expected[k]).abs().max().item() < 1e-6, k

    # OUTPUT_DIR/final as `sfttrain run` leaves it: adapter, tokenizer with the build's chat template, sfttrain.json
    info = json.loads((final / "sfttrain.json").read_text())
    assert info["data"]["iterative"] and info["data"]["template"] == "chatml"
    tok = AutoTokenizer.from_pretrained(final)
    chat = [{"role": "user", "content": "How do you say cat in Spanish?"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)  # BOS left to the tokenizer
    assert tok(text).input_ids == resumed.build.prompt_ids({"messages": [*chat, {"role": "assistant", "content": "x"}]})
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(final)).eval()
    ids = torch.tensor([resumed.build.prompt_ids({"messages": [*chat, {"role": "assistant", "content": "x"}]})])
    live = resumed.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, live(input_ids=ids).logits, atol=1e-5)
    live.train()
    assert (merge(final, tmp_path / "merged") / "config.json").is_file()


def test_generate_renders_prompts_as_the_build_and_batches_like_one_by_one(trainer):
    prompts = ["How do you say cat in Spanish?", "Hi", [{"role": "user", "content": "Hola"}]]
    with pytest.raises(ValueError, match="cannot render the prompt"):  # chat records need a template here
        trainer.generate(prompts)
    prompts = prompts[:2]
    together = trainer.generate(prompts, max_new_tokens=5, details=True)
    alone = [trainer.generate([p], max_new_tokens=5, details=True)[0] for p in prompts]
    assert [g.ids for g in together] == [g.ids for g in alone]
    assert all(len(g.ids) <= 5 and isinstance(g.text, str) for g in together)
    assert trainer.build.prompt_ids({"prompt": "Hi", "completion": "x"}) == [1] + \
        trainer.build.fast.backend_tokenizer.encode("Hi", add_special_tokens=False).ids


def test_example_loop_reaches_full_accuracy_and_stops_with_eos(tmp_path, one_thread):  # noqa: F811
    import importlib.util

    spec = importlib.util.spec_from_file_location("iterative_loop", Path(__file__).parents[2] / "examples" /
                                                  "iterative_loop.py")
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    result = loop.main(tmp_path / "parity", verbose=False)
    assert result["accuracy"] == loop.TARGET == 1.0 and result["rounds"] <= 20
    for prompt, text, stopped, ids in result["answers"]:
        n = int(prompt.rsplit(" ", 1)[1])
        assert text == ("odd" if n % 2 else "even") and stopped and ids[-1] == result["eos_id"], prompt
    assert (Path(result["final"]) / "adapter_model.safetensors").is_file()
