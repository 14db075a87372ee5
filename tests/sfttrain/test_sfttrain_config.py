"""TrainConfig: YAML sections or flat keys, flag overrides, every problem named with its flag."""

import pytest

from sfttrain import ConfigError, TrainConfig, config_from_dict
from sfttrain.config import load_yaml

REQUIRED = {"shards": "shards/", "model": "models/tiny", "output_dir": "runs/x"}


def test_flat_keys_and_sections_build_the_same_tree():
    flat = config_from_dict({**REQUIRED, "lora_r": 8, "load_in_4bit": True, "learning_rate": 5e-5,
                             "target_modules": "q_proj, v_proj"})
    nested = config_from_dict({"data": {"shards": "shards/"}, "model": {"path": "models/tiny"},
                               "train": {"output_dir": "runs/x", "learning_rate": 5e-5},
                               "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
                               "quant": {"load_in_4bit": True}})
    assert flat == nested
    assert flat.lora.target_modules == ("q_proj", "v_proj")
    assert flat.quantized


def test_flags_override_the_yaml_file(tmp_path):
    f = tmp_path / "train.yaml"
    f.write_text("shards: shards/\nmodel: models/tiny\noutput_dir: runs/x\nmax_steps: 100\nlora_r: 8\n")
    config = config_from_dict(load_yaml(f), {"max_steps": 7, "lora_r": None}, source=str(f))
    assert config.train.max_steps == 7  # the flag wins
    assert config.lora.r == 8  # an unset flag (None) leaves the file's value


def test_unknown_key_suggests_the_closest_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key `lerning_rate` \(did you mean 'learning_rate'\?\)"):
        config_from_dict({**REQUIRED, "lerning_rate": 1e-4}, source="train.yaml")
    with pytest.raises(ConfigError, match=r"unknown key `lora.dropuot` \(did you mean 'dropout'\?\)"):
        config_from_dict({**REQUIRED, "lora": {"dropuot": 0.1}})


def test_every_problem_is_listed_once_with_its_flag():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"lora_r": 0, "load_in_4bit": True, "load_in_8bit": True, "bf16": True, "fp16": True,
                          "bnb_4bit_quant_type": "nf5", "eval_steps": 0})
    msg = str(e.value)
    for expected in ("no shards", "--model PATH", "--output-dir DIR", "--lora-r 0",
                     "--load-in-4bit and --load-in-8bit exclude each other", "--bf16 and --fp16",
                     "--bnb-4bit-quant-type 'nf5' is not one of nf4, fp4 (did you mean 'nf4'?)",
                     "--eval-steps"):
        assert expected in msg


def test_full_finetune_of_quantized_weights_is_refused():
    with pytest.raises(ConfigError, match="--full-finetune cannot train quantized weights"):
        config_from_dict({**REQUIRED, "method": "full", "load_in_4bit": True})


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    f = tmp_path / "train.yaml"
    f.write_text("- shards/\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(f)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_config_round_trips_through_its_dict():
    config = config_from_dict({**REQUIRED, "modules_to_save": "lm_head", "neftune_alpha": 5})
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_trl_training_names_are_accepted_and_stored_under_ours():
    from sfttrain.config import config_from_dict

    c = config_from_dict({"shards": "s", "model_name_or_path": "m", "output_dir": "o",
                          "per_device_train_batch_size": 4, "num_train_epochs": 3, "lr_scheduler_type": "linear",
                          "neftune_noise_alpha": 5})
    assert (c.model.path, c.train.per_device_batch_size, c.train.num_epochs, c.train.lr_scheduler,
            c.train.neftune_alpha) == ("m", 4, 3, "linear", 5)
    assert "per_device_train_batch_size" not in str(c.to_dict())  # stored under our names
