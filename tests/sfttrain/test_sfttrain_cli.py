"""`sfttrain run` from YAML with flag overrides, then `sfttrain merge`, end to end."""

import json
import subprocess
import sys

import torch
from click.testing import CliRunner

from sfttrain.cli import main
from tests.sfttrain_helpers import SPANISH, build_shards, one_thread, spanish_shards, tiny_model  # noqa: F401


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, sfttrain.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "sfttrain.cli", "run", "--help"], check=True, capture_output=True,
                         text=True).stdout
    for flag in ("--load-in-4bit", "--lora-r", "--target-modules", "--neftune-alpha", "--resume", "--eval-steps"):
        assert flag in out


def test_run_from_yaml_with_overrides_then_merge(tmp_path, spanish_shards, tiny_model, one_thread):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    evals = build_shards(tmp_path, SPANISH[:2], name="eval")
    out = tmp_path / "run"
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text(
        f"shards: {spanish_shards}\nmodel: {tiny_model}\noutput_dir: {out}\n"
        "lora:\n  r: 4\n  alpha: 8\n  target_modules: [q_proj, v_proj]\n"
        "train:\n  max_steps: 50\n  learning_rate: 0.01\n  logging_steps: 1\n")
    result = CliRunner().invoke(main, ["run", str(yaml_file), "--max-steps", "3", "--eval", str(evals),
                                       "--eval-steps", "2", "--save-steps", "2", "--gradient-checkpointing"])
    assert result.exit_code == 0, result.output
    text = result.output
    for expected in ("LoRA r=4 alpha=8", "targets=q_proj,v_proj", "trainable of", "rows", "trained",
                     "sdpa + packed mask built by transformers from restarting position ids", "no CUDA GPU", "isolation verified", "rows/step", "tokens",
                     "step 3", "eval_loss", "mean_token_accuracy", "tokens_per_s", "trained_tokens_seen",
                     "done: 3 steps", "non-pad tokens/s", "trained tokens seen"):
        assert expected in text, expected
    final = out / "final"
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "sfttrain.json"):
        assert (final / f).is_file(), f
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert json.loads((final / "sfttrain.json").read_text())["config"]["train"]["max_steps"] == 3

    merged = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(final), "--out", str(merged)])  # base from adapter_config
    assert result.exit_code == 0, result.output
    assert (merged / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 1602, 511, 368, 1315, 5255]])
    with torch.no_grad():
        folded = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        adapted = PeftModel.from_pretrained(base, str(final))(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model)(input_ids=ids).logits
    assert not any("lora" in k for k in AutoModelForCausalLM.from_pretrained(merged).state_dict())
    assert torch.allclose(folded, adapted, atol=1e-5)
    assert not torch.allclose(folded, plain, atol=1e-5)  # the adapter did change the model

    again = CliRunner().invoke(main, ["merge", str(final), "--out", str(merged)])
    assert again.exit_code == 2 and "is not empty" in again.output


def test_merge_refuses_a_folder_that_is_not_an_adapter(tmp_path, tiny_model):  # noqa: F811
    result = CliRunner().invoke(main, ["merge", str(tiny_model), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "not a LoRA adapter folder" in result.output and "holds a full model" in result.output


def test_a_build_with_a_validation_split_is_evaluated_without_eval(tmp_path, tiny_model, one_thread):  # noqa: F811
    """A recipe's held-out split (shard-validation-*) is what `sfttrain run` evaluates on by default."""
    from sftprep import build, config_from_dict, load
    from tests.conftest import write_jsonl
    from tests.sfttrain_helpers import TOKENIZER, pair_records

    more = [(f"How do you count {n} in Spanish?", f" {w}") for n, w in enumerate(
        ["cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"])]
    a = write_jsonl(tmp_path / "a.jsonl", pair_records(SPANISH))
    b = write_jsonl(tmp_path / "b.jsonl", pair_records(more))
    shards = tmp_path / "shards"
    build(config_from_dict({"tokenizer": str(TOKENIZER), "max_length": 64, "out": str(shards),
                            "sources": [{"name": "words", "inputs": str(a)}, {"name": "numbers", "inputs": str(b)}],
                            "eval": {"fraction": 0.3}}))
    assert load(shards, split="validation").num_rows > 0
    result = CliRunner().invoke(main, ["run", str(shards), "--model", str(tiny_model), "--output-dir",
                                       str(tmp_path / "run"), "--max-steps", "2", "--eval-steps", "1",
                                       "--logging-steps", "1"])
    assert result.exit_code == 0, result.output
    assert "eval_loss" in result.output
