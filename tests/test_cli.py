"""`sftprep build` through the CLI: flags, YAML + overrides, summary, errors; shards read by any Arrow reader."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
from click.testing import CliRunner

from sftprep import load, read_manifest
from sftprep.cli import main
from tests.conftest import CHATML_TOK, DATA, MISTRAL, sftprep_cli, write_jsonl


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_build_with_flags_then_read_with_pandas_pyarrow_and_load(tmp_path):
    out = tmp_path / "shards"
    r = run("build", "--input", DATA / "alpaca_en.json", "--input", DATA / "alpaca_zh.jsonl",
            "--tokenizer", CHATML_TOK, "--template", "chatml", "--max-length", 1024, "--packing", "bfd",
            "--out", out)
    assert r.exit_code == 0, r.output
    assert "records read" in r.output and "80" in r.output and "fill ratio" in r.output
    df = pd.read_feather(out / "shard-train-00000.arrow")
    assert list(df.columns) == ["input_ids", "labels", "seq_lens", "sample_ids"]
    mm = pa.ipc.open_file(pa.memory_map(str(out / "shard-train-00000.arrow"))).read_all()
    table = load(out)
    assert table.num_rows == len(df) == mm.num_rows
    manifest = read_manifest(out)
    assert manifest["totals"]["samples_kept"] == 80
    assert manifest["tokenizer"]["vocab_size"] == 32002 and manifest["config"]["template"]["name"] == "chatml"
    assert (out / "rejects.jsonl").read_text() == ""


def test_yaml_config_with_cli_override(tmp_path):
    cfg = tmp_path / "build.yaml"
    cfg.write_text(f"inputs: [{DATA / 'alpaca_en.json'}]\ntokenizer: {MISTRAL}\ntemplate: alpaca\n"
                   f"max_length: 2048\nout: {tmp_path / 'o'}\npack:\n  shard_size: 5\n")
    r = run("build", cfg, "--max-length", 512, "--num-samples", 10, "-q")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "o")
    assert m["max_length"] == 512 and m["totals"]["records_read"] == 10
    assert m["config"]["pack"]["shard_size"] == 5 and m["config"]["template"]["name"] == "alpaca"


def test_unknown_yaml_key_is_an_error_with_suggestion(tmp_path):
    cfg = tmp_path / "build.yaml"
    cfg.write_text("max_lenght: 512\n")
    r = CliRunner().invoke(main, ["build", str(cfg)])
    assert r.exit_code == 2
    assert "unknown key `max_lenght` (did you mean 'max_length'?)" in r.output
    assert "Traceback" not in r.output


def test_field_mapping_flag(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    r = run("build", "-i", data, "-t", MISTRAL, "--field", "prompt=question", "--field", "completion=answer",
            "--template", "qa", "-o", tmp_path / "o", "-q")
    assert r.exit_code == 0, r.output
    assert read_manifest(tmp_path / "o")["totals"]["trained_tokens"] == 2  # "4" and "</s>"


def test_trl_names_are_accepted_and_stored_under_ours(tmp_path):
    import json as _json

    from sftprep import config_from_dict

    cfg = config_from_dict({"inputs": ["x.jsonl"], "tokenizer": "t", "out": "o", "max_seq_length": 512,
                            "truncation_mode": "keep_end", "packing": False, "completion_only_loss": True,
                            "dataset_text_field": "content"})
    assert (cfg.tokenize.max_length, cfg.tokenize.truncation, cfg.pack.mode, cfg.tokenize.train_on,
            dict(cfg.read.fields)) == (512, "keep_end", "none", "completion", {"text": "content"})
    assert config_from_dict({"inputs": ["x"], "tokenizer": "t", "out": "o",
                             "assistant_only_loss": True}).tokenize.train_on == "assistant"
    data = tmp_path / "d.jsonl"
    data.write_text(_json.dumps({"content": "Some plain text to learn."}) + "\n")
    r = sftprep_cli("build", "-i", data, "-t", MISTRAL, "-o", tmp_path / "o", "--max-seq-length", 64,
                    "--packing", "true", "--truncation-mode", "keep_start", "--field", "text=content")
    assert r.exit_code == 0, r.output
    manifest = _json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["config"]["tokenize"]["max_length"] == 64 and manifest["config"]["pack"]["mode"] == "bfd"
    r = sftprep_cli("build", "-i", data, "-t", MISTRAL, "-o", tmp_path / "o2", "--completion-only-los")
    assert "No such option '--completion-only-los'" in r.output and "'--completion-only-loss'" in r.output


def test_help_texts_and_defaults_come_from_the_config_dataclasses():
    """One source of truth: each settings flag's help is its field's docstring plus the field's default."""
    import click

    from sftprep.cli import build
    from sftprep.config import BUILD_SCHEMA, TokenizeConfig
    from sfttrain.cli import run
    from sfttrain.config import TRAIN_SCHEMA, LoraConfig

    checked = 0
    for command, schema in ((build, BUILD_SCHEMA), (run, TRAIN_SCHEMA)):
        for param in command.params:
            key = param.name.rstrip("_")
            if isinstance(param, click.Option) and key not in schema.aliases and schema.target(key) is not None:
                assert param.help == schema.help(key), param.name
                checked += 1
    assert checked > 60
    assert f"[default: {TokenizeConfig.max_length}]" in BUILD_SCHEMA.help("max_length")
    assert f"[default: {LoraConfig.r}]" in TRAIN_SCHEMA.help("lora_r")


def test_summary_names_the_output_folder_and_an_input_whose_records_were_all_rejected(tmp_path):
    """A glob that sweeps a plain-text file into a chatml build: the build succeeds on the rest, and
    says so, naming the file, its reason and where the shards are."""
    from tests.conftest import write_jsonl

    write_jsonl(tmp_path / "data" / "chat.jsonl",
                [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
                 for i in range(7)])
    write_jsonl(tmp_path / "data" / "notes.jsonl", [{"text": f"note {i}"} for i in range(3)])
    out = tmp_path / "o"
    r = run("build", "-i", f"{tmp_path}/data/*.jsonl", "-t", CHATML_TOK, "--template", "chatml",
            "--max-length", 256, "-o", out)
    assert r.exit_code == 0, r.output
    assert f"shards and manifest in {out}/" in r.output
    notes = tmp_path / "data" / "notes.jsonl"
    assert f"warning: input {notes}: all 3 records rejected (format_mismatch: 3)" in r.output
    assert "chat.jsonl" not in " ".join(read_manifest(out)["warnings"])
    (tmp_path / "data" / "notes.jsonl").unlink()  # the same as a .json array (sources file[i])
    (tmp_path / "data" / "notes.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    r = run("build", "-i", f"{tmp_path}/data/*.json*", "-t", CHATML_TOK, "--template", "chatml",
            "--max-length", 256, "-o", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert f"warning: input {tmp_path / 'data' / 'notes.json'}: all 2 records rejected" in r.output


def test_progress_gets_the_number_of_records_first_then_counts_up_to_it(tmp_path):
    """`build(progress=...)`: an object with start(total) hears how many records to expect (lines of
    JSON Lines, rows of Parquet; None for a .json array), then batch counts that add up to it."""
    import pyarrow.parquet as pq

    from sftprep import build, config_from_dict
    from tests.conftest import write_jsonl

    class Recorder:
        def __init__(self):
            self.total, self.done = "unset", 0

        def start(self, total):
            self.total = total

        def __call__(self, n):
            self.done += n

    write_jsonl(tmp_path / "a.jsonl", [{"text": f"line {i}"} for i in range(9)])
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(4)]}), tmp_path / "b.parquet")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "one"}]))
    for inputs, total in (([tmp_path / "a.jsonl", tmp_path / "b.parquet"], 13), ([tmp_path / "c.json"], None)):
        rec = Recorder()
        m = build(config_from_dict({"inputs": [str(p) for p in inputs], "tokenizer": str(MISTRAL),
                                    "out": str(tmp_path / "o"), "overwrite": True}), progress=rec)
        assert (rec.total, rec.done) == (total, m["totals"]["records_read"])
    rec = Recorder()
    build(config_from_dict({"inputs": [str(tmp_path / "a.jsonl")], "tokenizer": str(MISTRAL), "num_samples": 5,
                            "out": str(tmp_path / "o"), "overwrite": True}), progress=rec)
    assert (rec.total, rec.done) == (5, 5)


def test_every_setting_is_a_flag_made_from_its_field():
    """The command lines have no list of their settings: each field a flat key reaches is an option with the
    field's help and the Flag's names and choices, and each TRL name declared next to a field is accepted."""
    import click

    from sftprep.cli import build as build_command
    from sftprep.config import BUILD_SCHEMA, field_help, flag_of
    from sfttrain.cli import run
    from sfttrain.config import TRAIN_SCHEMA

    for schema, command, skip in ((BUILD_SCHEMA, build_command, ()), (TRAIN_SCHEMA, run, ("shards",))):
        params = {p.name: p for p in command.params if isinstance(p, click.Option)}
        for key, cls, f in schema.settings():
            if key in skip:
                continue
            option, spec = params[key], flag_of(f)
            assert option.help == field_help(cls, f.name), key
            names = option.opts + option.secondary_opts
            assert all("--" + a.name.replace("_", "-") in names or a.name in params for a in spec.aliases), key
            if spec.choices:
                assert tuple(option.type.choices) == spec.choices, key
            if spec.short:
                assert spec.short in names, key
        assert set(schema.aliases) <= {n for p in params.values() for n in (p.name, *[o.lstrip("-").replace("-", "_")
                                                                               for o in p.opts])}


def test_trl_names_declared_next_to_their_fields_work_as_flags(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?", "completion": " A."}] * 3)
    r = CliRunner().invoke(main, ["build", "-i", str(data), "-t", MISTRAL, "-o", str(tmp_path / "o"),
                                  "--max-seq-length", "64", "--truncation-mode", "keep_end",
                                  "--no-completion-only-loss"])
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "o")
    assert (m["max_length"], m["config"]["tokenize"]["truncation"], m["config"]["tokenize"]["train_on"]) == \
        (64, "keep_end", "all")
