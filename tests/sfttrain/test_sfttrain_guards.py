"""Guard rails: refused with a clear message and exit code 2, before any model is loaded.
Quantized settings: validated before loading."""

import pytest
import torch
from click.testing import CliRunner

import sfttrain.model
from sfttrain import config_from_dict
from sfttrain.cli import main
from tests.sfttrain_helpers import (CHATML_TOKENIZER, SPANISH, build_shards, make_tiny_model, spanish_shards,  # noqa: F401
                                    tiny_model)


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the guard rails refused the run")

    monkeypatch.setattr(sfttrain.model, "load_model", refuse)


def run_cli(*args):
    result = CliRunner().invoke(main, ["run", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def _refused(result, *expected):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("Error: ")
    for text in expected:
        assert text in result.output, result.output


def test_tokenizer_mismatch_is_refused(tmp_path, tiny_model, no_model_loading):  # noqa: F811
    shards = build_shards(tmp_path, SPANISH, tokenizer=CHATML_TOKENIZER)  # 32002 tokens; the model has mistral's
    result = run_cli(shards, "--model", tiny_model, "--output-dir", tmp_path / "run")
    _refused(result, "tokenizer mismatch", "vocab_size 32002 in the shards, 32000 in the model's",
             "vocab_hash", "sftprep build --tokenizer")


def test_vocabulary_larger_than_the_model_is_refused(tmp_path, no_model_loading):
    shards = build_shards(tmp_path, SPANISH, tokenizer=CHATML_TOKENIZER)
    model = make_tiny_model(tmp_path / "small", tokenizer=None, vocab_size=32000)  # no tokenizer in the folder
    result = run_cli(shards, "--model", model, "--output-dir", tmp_path / "run")
    _refused(result, "vocabulary of 32002 tokens", "only 32000 embeddings")


def test_explicit_tokenizer_is_checked_too(tmp_path, spanish_shards, no_model_loading):  # noqa: F811
    model = make_tiny_model(tmp_path / "bare", tokenizer=None)
    result = run_cli(spanish_shards, "--model", model, "--tokenizer", CHATML_TOKENIZER, "--output-dir", tmp_path / "r")
    _refused(result, "tokenizer mismatch", "--tokenizer")


def test_missing_and_partial_manifests_are_refused(tmp_path, tiny_model, no_model_loading):  # noqa: F811
    _refused(run_cli(tmp_path / "nowhere", "--model", tiny_model, "--output-dir", tmp_path / "r"), "does not exist")
    shards = build_shards(tmp_path, SPANISH)
    (shards / "manifest.json").unlink()  # an interrupted build: shards, no manifest
    _refused(run_cli(shards, "--model", tiny_model, "--output-dir", tmp_path / "r"), "no manifest.json",
             "did not finish")
    (tmp_path / "empty").mkdir()
    _refused(run_cli(tmp_path / "empty", "--model", tiny_model, "--output-dir", tmp_path / "r"),
             "is not a sftprep build")


def test_corrupted_shard_is_refused_with_verify_checksums(tmp_path, tiny_model, no_model_loading):  # noqa: F811
    shards = build_shards(tmp_path, SPANISH)
    shard = shards / "shard-train-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # flip one bit in the middle
    shard.write_bytes(bytes(data))
    _refused(run_cli(shards, "--model", tiny_model, "--output-dir", tmp_path / "r", "--verify-checksums"),
             "fails `sftprep verify` (checksum: 1)", "shard-train-00000.arrow: sha256 is",
             "the file changed after the build")
    shard.unlink()
    _refused(run_cli(shards, "--model", tiny_model, "--output-dir", tmp_path / "r"), "missing")


def test_truncated_shard_is_refused_without_hashing(tmp_path, tiny_model, no_model_loading):  # noqa: F811
    shards = build_shards(tmp_path, SPANISH)
    shard = shards / "shard-train-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-64])  # an interrupted copy: the footer is gone
    _refused(run_cli(shards, "--model", tiny_model, "--output-dir", tmp_path / "r"),
             "shard-train-00000.arrow is not a complete Arrow file", "truncated")


def test_start_up_hashes_no_shard_unless_asked(tmp_path, monkeypatch):
    """Start-up cost must not grow with the data: sha256 only with --verify-checksums."""
    import importlib

    import sftprep.write.shards

    from sfttrain.checks import open_build

    shards = build_shards(tmp_path, SPANISH, packing="none", shard_size=2)  # 3 shard files
    hashed = []
    real = sftprep.write.shards.sha256_file
    for module in (sftprep.write.shards, importlib.import_module("sftprep.inspect.verify")):
        monkeypatch.setattr(module, "sha256_file", lambda f: hashed.append(f) or real(f))
    open_build(shards)
    assert hashed == []
    open_build(shards, verify_checksums=True)
    assert len(hashed) == 3


def test_eval_shards_with_another_tokenizer_are_refused(tmp_path, spanish_shards, tiny_model,  # noqa: F811
                                                        no_model_loading):
    other = build_shards(tmp_path, SPANISH, name="eval", tokenizer=CHATML_TOKENIZER)
    result = run_cli(spanish_shards, "--model", tiny_model, "--eval", other, "--output-dir", tmp_path / "r")
    _refused(result, "--eval", "different tokenizer")


def test_output_dir_with_checkpoints_needs_resume_or_overwrite(tmp_path, spanish_shards, tiny_model,  # noqa: F811
                                                               no_model_loading):
    out = tmp_path / "run"
    _refused(run_cli(spanish_shards, "--model", tiny_model, "--output-dir", out, "--resume"),
             "holds no checkpoint")
    (out / "checkpoint-5").mkdir(parents=True)
    _refused(run_cli(spanish_shards, "--model", tiny_model, "--output-dir", out), "already holds checkpoint-5",
             "--resume")


def test_model_must_be_a_local_folder(tmp_path, spanish_shards, no_model_loading):  # noqa: F811
    _refused(run_cli(spanish_shards, "--model", "mistralai/Mistral-7B-v0.1", "--output-dir", tmp_path / "r"),
             "local models only")


def test_unknown_yaml_key_exits_2_with_a_suggestion(tmp_path, spanish_shards):  # noqa: F811
    f = tmp_path / "train.yaml"
    f.write_text(f"shards: {spanish_shards}\nmodel: x\noutput_dir: y\nlora_rank: 8\n")
    _refused(run_cli(f), "unknown key `lora_rank`", "did you mean 'lora_r'")


def test_unknown_optimizer_is_refused_before_loading(tmp_path, spanish_shards, tiny_model,  # noqa: F811
                                                     no_model_loading):
    result = run_cli(spanish_shards, "--model", tiny_model, "--output-dir", tmp_path / "r", "--optim", "adamw_torh")
    _refused(result, "--optim 'adamw_torh' is not a transformers optimizer", "did you mean 'adamw_torch'")


# -- quantized paths ---------------------------------------------------------------------------

def test_4bit_config_becomes_the_qlora_bitsandbytes_config():
    from transformers import BitsAndBytesConfig

    config = config_from_dict({"shards": "s", "model": "m", "output_dir": "o", "load_in_4bit": True,
                               "bnb_4bit_quant_type": "fp4", "bf16": True})
    bnb = sfttrain.model.quantization_config(config)
    assert isinstance(bnb, BitsAndBytesConfig)
    assert bnb.load_in_4bit and not bnb.load_in_8bit
    assert bnb.bnb_4bit_quant_type == "fp4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16  # auto: the training dtype
    eight = sfttrain.model.quantization_config(config_from_dict({"shards": "s", "model": "m", "output_dir": "o",
                                                                 "load_in_8bit": True}))
    assert eight.load_in_8bit and not eight.load_in_4bit
    assert sfttrain.model.quantization_config(config_from_dict({"shards": "s", "model": "m", "output_dir": "o"})) is None


def test_bad_quantization_settings_are_named(tmp_path, spanish_shards, tiny_model):  # noqa: F811
    result = run_cli(spanish_shards, "--model", tiny_model, "--output-dir", tmp_path / "r", "--load-in-4bit",
                     "--load-in-8bit", "--bnb-4bit-quant-type", "nf5")
    _refused(result, "--load-in-4bit and --load-in-8bit exclude each other", "did you mean 'nf4'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where no CUDA GPU is present")
def test_flash_attention_without_cuda_is_refused(tmp_path, spanish_shards, tiny_model, no_model_loading):  # noqa: F811
    result = run_cli(spanish_shards, "--model", tiny_model, "--output-dir", tmp_path / "r",
                     "--attn-implementation", "flash_attention_2")
    _refused(result, "flash_attention_2 cannot run here", "no CUDA GPU")



def test_unwritable_output_dir_is_refused_before_loading(tmp_path, spanish_shards, tiny_model,  # noqa: F811
                                                         no_model_loading):
    (tmp_path / "a-file").write_text("not a folder")
    result = run_cli(spanish_shards, "--model", tiny_model, "--output-dir", tmp_path / "a-file" / "run")
    _refused(result, "--output-dir", "is not writable (Not a directory)")


def test_disk_full_while_saving_a_checkpoint_is_one_line_that_says_how_to_continue(
        tmp_path, spanish_shards, tiny_model, monkeypatch):  # noqa: F811
    """The disk fills while the adapter is written (injected where peft calls safetensors): one
    `Error:` line naming the file and the fix, no traceback, no half checkpoint. (A real file-size limit
    that makes torch's own writer fail: test_sfttrain_files.py.)"""
    import errno

    import peft.peft_model

    def full(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full)  # peft's own name for safetensors' save_file
    result = run_cli(spanish_shards, "--model", tiny_model, "--output-dir", tmp_path / "run", "--max-steps", 1,
                     "--save-steps", 1)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    run = tmp_path / "run"
    assert last == (f"Error: could not save {run}/checkpoint-1 (No space left on device: {run}/checkpoint-1/"
                    "adapter_model.safetensors); it was removed; no checkpoint was saved: free space (or raise the "
                    "quota / file-size limit) and run again, or choose another --output-dir"), last
    assert not (run / "checkpoint-1").exists()  # no half checkpoint
