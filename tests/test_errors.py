"""Bad input and bad settings: each gets a specific one-line message (file:line, field, what was
expected), exit code 2 and no traceback; nothing is lost or half-written."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sftprep.cli import main
from tests.conftest import CHATML_TOK, MISTRAL

GOOD = json.dumps({"prompt": "Say yes", "completion": " yes"})
CHAT_OK = {"role": "user", "content": "hi"}

# (case, the bad JSONL line, extra flags, the message a user reads)
BAD_RECORDS = [
    ("invalid JSON", '{"prompt": "a", ', [], "bad.jsonl:2: invalid JSON: Expecting property name enclosed in double quotes"),
    ("not an object", "[1, 2]", [], "bad.jsonl:2: expected a JSON object, got list"),
    ("missing field", json.dumps({"prompt": "a", "answer": "b"}), ["--format", "prompt_completion"],
     'bad.jsonl:2: field "completion" is missing (keys found: answer, prompt); map another field to it with --field completion=YOUR_FIELD'),
    ("null field", json.dumps({"prompt": "a", "completion": None}), [], 'bad.jsonl:2: field "completion" is null'),
    ("wrong type", json.dumps({"prompt": "a", "completion": 42}), [], 'bad.jsonl:2: field "completion" must be text, got int: 42'),
    ("empty completion", json.dumps({"prompt": "a", "completion": "  "}), [], 'bad.jsonl:2: field "completion" is empty'),
    ("no assistant turn", json.dumps({"messages": [CHAT_OK]}), ["--template", "chatml"],
     'bad.jsonl:2: "messages" has no assistant turn, so nothing would be trained'),
    ("roles out of order", json.dumps({"messages": [{"role": "assistant", "content": "x"}, CHAT_OK]}),
     ["--template", "chatml"], "bad.jsonl:2: messages[0]: the conversation starts with an assistant turn"),
    ("unknown role", json.dumps({"messages": [CHAT_OK, {"role": "asistant", "content": "x"}]}),
     ["--template", "chatml"], "bad.jsonl:2: messages[1]: unknown role 'asistant'; expected one of system, developer, user, assistant, tool, function, ipython (did you mean 'assistant'?)"),
    ("missing template field", json.dumps({"prompt": "a"}), ["--prompt", "Q: {prompt}\nA:", "--completion", "{completion}"],
     "bad.jsonl:2: template completion uses field {completion}, which the record lacks (keys found: prompt)"),
    ("ambiguous format", json.dumps({"text": "a", "prompt": "b", "completion": "c"}), [],
     "bad.jsonl:2: record fits several formats (prompt_completion, text; keys: completion, prompt, text); choose one with --format"),
    ("bad tool call", json.dumps({"messages": [CHAT_OK, {"role": "assistant", "content": None,
                                                          "tool_calls": [{"function": {"arguments": {}}}]}]}),
     ["--template", "chatml"], 'bad.jsonl:2: messages[1].tool_calls[0]: a function call needs a "name" (and '
     '"arguments"), got'),
    # hostile records (issue 11): each used to kill the whole build with a traceback or abort it
    ("lone surrogate", '{"prompt": "a\\ud800", "completion": "b"}', [],
     "bad.jsonl:2: a string holds a lone UTF-16 surrogate ('\\ud800'), which is not Unicode text"),
    ("deep nesting", '{"prompt": ' + "[" * 3000 + "]" * 3000 + ', "completion": "b"}', [],
     "bad.jsonl:2: invalid JSON: nested too deeply"),
    ("huge integer", '{"prompt": "a", "completion": "b", "n": ' + "9" * 5000 + "}", [],
     "bad.jsonl:2: invalid JSON: Exceeds the limit (4300 digits) for integer string conversion"),
]


def write(tmp_path, lines: list[str | bytes]) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return str(path)


def build(*args):
    return CliRunner().invoke(main, ["build", *map(str, args)])


@pytest.mark.slow
@pytest.mark.parametrize("case,line,flags,message", BAD_RECORDS, ids=[c[0] for c in BAD_RECORDS])
def test_bad_record_fail_mode_names_file_line_field(tmp_path, case, line, flags, message):
    path = write(tmp_path, [GOOD, line, GOOD])
    r = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o", "--on-error", "fail", "-q", *flags)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "o" / "manifest.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case,line,flags,message", BAD_RECORDS, ids=[c[0] for c in BAD_RECORDS])
def test_bad_record_skip_mode_lists_it_in_rejects(tmp_path, case, line, flags, message):
    path = write(tmp_path, [GOOD, line, GOOD])
    r = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o", *flags)
    assert r.exit_code == 0, r.output
    assert "samples dropped" in r.output and "rejects.jsonl" in r.output
    (reject,) = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert message.split("bad.jsonl:2: ")[1] in reject["message"]
    assert reject["source"].endswith("bad.jsonl:2") and reject["sample_id"] == 1
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["totals"]["samples_dropped"] == 1 and manifest["totals"]["samples_kept"] == 2


def test_a_lone_surrogate_in_a_json_array_rejects_only_its_record(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[' + GOOD + ', {"prompt": "a\\ud800", "completion": "b"}]')
    r = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    (reject,) = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert reject["source"] == f"{path}[1]" and "a string holds a lone UTF-16 surrogate" in reject["message"]


def test_rejects_file_keeps_one_record_per_line_whatever_the_text_holds(tmp_path):
    """U+0085, U+2028 and U+2029 are line breaks to str.splitlines(): a message quoting them stays one line."""
    path = write(tmp_path, [GOOD, '{"prompt": {"a\u0085b": null}, "completion": "x\u2028y\u2029"}', '{"text": ""}'])
    r = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o", "--max-reject-ratio", "1")
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "o" / "rejects.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["sample_id"] for x in lines] == [1, 2]
    assert "a\u0085b" in json.loads(lines[0])["message"]


def test_a_utf8_byte_order_mark_loses_no_record(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (GOOD + "\n" + GOOD + "\n").encode())
    r = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o", "--on-error", "fail")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["totals"]["samples_kept"] == 2


def test_a_truncated_gzip_input_is_named_and_nothing_is_built(tmp_path):
    import gzip

    data = gzip.compress(("\n".join([GOOD] * 2000) + "\n").encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    r = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert f"{path}: the gzip stream is truncated or corrupt after line" in r.output
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert not list((tmp_path / "o").glob("*.tmp")) if (tmp_path / "o").exists() else True


@pytest.mark.parametrize("name,kind", [("data.parquet", "Parquet"), ("data.arrow", "Arrow")])
def test_a_corrupt_parquet_or_arrow_input_is_named(tmp_path, name, kind):
    path = tmp_path / name
    path.write_bytes(b"PAR1 this is not what it claims to be PAR1")
    r = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert f"{path}: not a readable {kind} file (after row 0)" in r.output


def test_csv_rows_with_quoted_newlines_point_at_their_own_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,completion\n"two\nlines",\n"three\nmore\nlines",\nok,yes\nok,yes\n')
    r = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    rejects = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert [x["source"] for x in rejects] == [f"{path}:2", f"{path}:4"]  # where each row starts


def test_a_config_naming_code_runs_it_only_when_allowed(tmp_path):
    (tmp_path / "build.yaml").write_text(f"inputs: [{write(tmp_path, [GOOD])}]\ntokenizer: {MISTRAL}\n"
                                         "template: subprocess:check_output\nallow_code: true\n")
    r = build(tmp_path / "build.yaml", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "unknown key `allow_code`" in r.output  # a YAML file cannot allow code
    (tmp_path / "build.yaml").write_text(f"inputs: [{tmp_path / 'bad.jsonl'}]\ntokenizer: {MISTRAL}\n"
                                         "template: subprocess:check_output\n")
    r = build(tmp_path / "build.yaml", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "template 'subprocess:check_output' names Python code: importing it runs that " \
        "module, so a config that names code is code. If you trust it, pass --allow-code" in r.output


def test_a_retry_after_a_build_that_rejected_everything_needs_no_overwrite(tmp_path):
    path = write(tmp_path, [json.dumps({"question": "Say yes", "answer": " yes"})] * 3)
    r = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o", "--format", "prompt_completion")
    assert r.exit_code == 2 and "3 of 3 records rejected" in r.output  # left rejects.jsonl and .build_id
    r = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o", "--field", "prompt=question",
              "--field", "completion=answer")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["totals"]["samples_kept"] == 3


def test_a_second_build_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    import fcntl
    import os

    path = write(tmp_path, [GOOD])
    (tmp_path / "o").mkdir()
    fd = os.open(tmp_path / "o" / ".lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running build holds
    try:
        r = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o")
        assert r.exit_code == 2
        assert f"Error: --out {tmp_path / 'o'} is being written by another sftprep build (pid 4242); wait for it " \
               "to finish, or choose another folder" in r.output
        assert not (tmp_path / "o" / "manifest.json").exists()
    finally:
        os.close(fd)
    assert build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o").exit_code == 0  # free again


def test_the_build_never_writes_through_a_symlink_in_its_folder(tmp_path):
    path = write(tmp_path, [GOOD])
    (tmp_path / "o").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "o" / ".build_id").symlink_to(victim)
    r = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o", "--overwrite")
    assert r.exit_code == 2 and "holds symbolic links (.build_id); sftprep never writes through a link" in r.output
    assert victim.read_text() == "precious"


def test_invalid_utf8(tmp_path):
    path = write(tmp_path, [GOOD, b'{"prompt": "caf\xe9", "completion": "x"}'])
    r = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o", "--on-error", "fail")
    assert r.exit_code == 2 and "bad.jsonl:2: invalid UTF-8 at byte 15 of the line" in r.output


def test_chat_template_that_raises(tmp_path):
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(CHATML_TOK, tok)
    (tok / "chat_template.jinja").write_text("{{ raise_exception('only user/assistant roles are supported') }}")
    path = write(tmp_path, [json.dumps({"messages": [CHAT_OK, {"role": "assistant", "content": "x"}]})])
    r = build("-i", path, "-t", tok, "--template", "tokenizer", "-o", tmp_path / "o", "--on-error", "fail")
    assert r.exit_code == 2
    assert "bad.jsonl:1: the tokenizer's chat_template failed: TemplateError: only user/assistant roles are supported" in r.output


def test_record_far_longer_than_max_length_follows_truncation(tmp_path):
    huge = json.dumps({"prompt": "Count:", "completion": " " + " ".join(map(str, range(5000)))})
    path = write(tmp_path, [GOOD, huge])
    r = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o", "--max-length", 64, "--truncation", "drop")
    assert r.exit_code == 0 and "too_long" in r.output
    reject = json.loads((tmp_path / "o" / "rejects.jsonl").read_text())
    assert reject["message"].endswith("tokens > max_length 64 (--truncation drop)")


def test_max_reject_ratio_stops_a_mostly_broken_build(tmp_path):
    path = write(tmp_path, [GOOD, "nope", "nope", "nope"])
    r = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o", "--max-reject-ratio", "0.5")
    assert r.exit_code == 2
    assert "3 of 4 records rejected (75% > max_reject_ratio 50%; unreadable: 3)" in r.output
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert len((tmp_path / "o" / "rejects.jsonl").read_text().splitlines()) == 3  # still listed


# (case, flags, the message a user reads) — all stop before any heavy work, exit 2.
BAD_SETTINGS = [
    ("unknown template", ["--template", "chatlm"], "unknown template 'chatlm' (did you mean 'chatml'?)"),
    ("unknown format", ["--format", "sharegtp"], "Invalid value for '--format': 'sharegtp' is not one of"),
    ("tokenizer missing", ["-t", "/nonexistent/tok"], "tokenizer folder /nonexistent/tok does not exist"),
    ("max_length below template overhead", ["--template", "alpaca", "--max-length", "16"],
     "max_length=16 leaves no room for text: template 'alpaca' alone takes"),
    ("no input", ["-i", "/nonexistent/data.jsonl"], "input /nonexistent/data.jsonl does not exist"),
    ("unsupported input type", ["-i", "README.md"], "unsupported file type '.md'"),
    ("prompt without completion", ["--prompt", "Q: {q}"], "template.prompt and template.completion go together"),
    ("max_length far too large", ["--max-length", "1000000000"],
     "max_length=1,000,000,000 is larger than any model trains on (at most 1,048,576 tokens"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,flags,message", BAD_SETTINGS, ids=[c[0] for c in BAD_SETTINGS])
def test_bad_settings(tmp_path, case, flags, message):
    path = write(tmp_path, [GOOD])
    args = ["-i", path, "-t", MISTRAL, "-o", tmp_path / "o"]
    for flag in ("-i", "-t"):  # let the case replace the default input/tokenizer
        if flag in flags:
            k = args.index(flag)
            del args[k:k + 2]
    r = build(*args, *flags)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "o").exists()  # refused before writing anything


def test_tokenizer_without_fast_tokenizer(tmp_path):
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "tokenizer_config.json").write_text("{}")
    r = build("-i", write(tmp_path, [GOOD]), "-t", tmp_path / "slow", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "has no tokenizer.json: sftprep needs a fast (Rust) tokenizer" in r.output


def test_tokenizer_without_eos(tmp_path):
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(MISTRAL, tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["eos_token"] = None
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = build("-i", write(tmp_path, [GOOD]), "-t", tok, "-o", tmp_path / "o")
    assert r.exit_code == 2 and "the tokenizer has no eos_token" in r.output


@pytest.mark.slow
def test_out_folder_with_a_different_build_needs_overwrite(tmp_path):
    path = write(tmp_path, [GOOD])
    assert build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o", "-q").exit_code == 0
    again = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o", "-q")  # same build: fine
    assert again.exit_code == 0
    r = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o", "--max-length", 100)
    assert r.exit_code == 2 and "already holds a different build; pass --overwrite" in r.output
    assert build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o", "--max-length", 100, "--overwrite").exit_code == 0


def test_out_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "thesis.tex").write_text("precious")
    r = build("-i", write(tmp_path, [GOOD]), "-t", MISTRAL, "-o", tmp_path / "o")
    assert r.exit_code == 2 and "already holds files that are not a sftprep build" in r.output


def test_unwritable_output_is_reported(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = build("-i", write(tmp_path, [GOOD]), "-t", MISTRAL, "-o", tmp_path / "afile" / "o")
    assert r.exit_code == 2 and "Traceback" not in r.output and "afile" in r.output


def test_unknown_yaml_keys_and_bad_values(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("template:\n  nmae: chatml\npacking: bdf\n")
    r = CliRunner().invoke(main, ["build", str(cfg), "-i", write(tmp_path, [GOOD]), "-t", MISTRAL, "-o", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "unknown key `template.nmae` (did you mean 'name'?)" in r.output


@pytest.mark.slow
def test_the_output_folder_is_never_read_as_input(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text(GOOD + "\n" + json.dumps({"prompt": "x", "completion": 1}) + "\n")
    pattern = str(tmp_path / "**" / "*.jsonl")
    for _ in range(2):  # the second build would read the first one's data/out/rejects.jsonl
        r = build("-i", pattern, "-t", MISTRAL, "-o", data / "out", "--overwrite")
        assert r.exit_code == 0, r.output
        manifest = json.loads((data / "out" / "manifest.json").read_text())
        assert [i["path"] for i in manifest["inputs"]] == [str(data / "a.jsonl")]
        assert manifest["totals"]["records_read"] == 2


@pytest.mark.slow  # sfttrain run imports transformers
@pytest.mark.parametrize("name,message", [
    ("data.jsonl", "data.jsonl is a file, not a build folder: pass the folder `sftprep build --out` wrote; to build "
                   "one from it: sftprep build -i"),
    ("shards/shard-train-00000.arrow", "shard-train-00000.arrow is one shard of a build, not a build folder: pass "
                                       "the folder `sftprep build --out` wrote"),
])
def test_wrong_objects_get_a_line_that_says_what_to_pass(tmp_path, name, message):
    from tests.conftest import sftprep_cli

    target = tmp_path / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(GOOD + "\n")
    for r in (sftprep_cli("inspect", target), CliRunner().invoke(__import__("sfttrain.cli").cli.main,
                                                                 ["run", str(target), "--model", str(tmp_path),
                                                                  "--output-dir", str(tmp_path / "r")])):
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert message in r.output, r.output


def test_a_hub_id_as_tokenizer_says_only_local_folders_work(tmp_path):
    path = write(tmp_path, [GOOD])
    r = build("-i", path, "-t", "Qwen/Qwen2.5-7B-Instruct", "-o", tmp_path / "o")
    assert r.exit_code == 2
    assert "tokenizer folder Qwen/Qwen2.5-7B-Instruct does not exist; it looks like a Hub id, but sftprep reads " \
           "local folders only (nothing is downloaded): get one with `hf download Qwen/Qwen2.5-7B-Instruct " \
           "--include 'tokenizer*'" in r.output


def test_a_folder_that_is_not_a_datasets_folder_names_itself(tmp_path):
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "train-00000.parquet").write_bytes(b"")
    r = build("-i", tmp_path / "hub", "-t", MISTRAL, "-o", tmp_path / "o")
    assert r.exit_code == 2 and f"or a glob such as '{tmp_path / 'hub'}/*.jsonl'" in r.output


def test_an_internal_error_keeps_its_traceback_while_user_errors_stay_one_line(tmp_path, monkeypatch):
    import sftprep.api
    import sfttrain.cli
    from sftprep.errors import ConfigError

    def bug(*args, **kwargs):
        raise ValueError("a bug in sftprep, not a setting")  # a plain ValueError is no user error

    path = write(tmp_path, [GOOD])
    monkeypatch.setattr(sftprep.api, "build", bug)
    r = build("-i", path, "-t", MISTRAL, "-o", tmp_path / "o")
    assert r.exit_code == 1 and isinstance(r.exception, ValueError) and "Error:" not in r.output
    monkeypatch.setattr(sfttrain.cli, "check_inputs", lambda config: None)  # tmp_path passes for a build
    monkeypatch.setattr(sfttrain.cli, "_run", bug)
    r = CliRunner().invoke(sfttrain.cli.main, ["run", str(tmp_path), "--model", str(tmp_path), "--output-dir",
                                               str(tmp_path / "r")])
    assert r.exit_code == 1 and isinstance(r.exception, ValueError)

    def user_error(*args, **kwargs):
        raise ConfigError("--lora-r 0 must be a number >= 1")

    monkeypatch.setattr(sfttrain.cli, "_run", user_error)
    r = CliRunner().invoke(sfttrain.cli.main, ["run", str(tmp_path), "--model", str(tmp_path), "--output-dir",
                                               str(tmp_path / "r")])
    assert r.exit_code == 2 and r.output == "Error: --lora-r 0 must be a number >= 1\n"
