"""Bytes the command line does not expect (issue 27, group 4): each one `Error:` line and exit code 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from sftprep.cli import main
from tests.conftest import MISTRAL, write_jsonl

GOOD = {"prompt": "Say hi", "completion": " hi"}


def _build(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["build", *map(str, args)])
    assert isinstance(r.exception, SystemExit), r.exception  # a traceback would leave another exception
    return r.exit_code, r.output.strip()


def _latin1_table() -> pa.Table:
    """Arrow does not check the bytes a writer declares as text: a binary column viewed as strings."""
    prompts = pa.array([b"fine", b"caf\xe9 au lait"], type=pa.binary()).view(pa.string())
    return pa.table({"prompt": prompts, "completion": pa.array([" a", " b"])})


def _write_arrow(table, path):
    with pa.ipc.new_file(path, table.schema) as w:
        w.write_table(table)


def _write_parquet(table, path):
    import pyarrow.parquet as pq

    pq.write_table(table, path)


@pytest.mark.parametrize("suffix, write", [(".arrow", _write_arrow), (".parquet", _write_parquet)])
def test_a_string_column_holding_invalid_utf8_names_the_row_and_column(tmp_path, suffix, write):
    path = tmp_path / f"latin1{suffix}"
    write(_latin1_table(), path)
    code, out = _build("-i", path, "-t", MISTRAL, "-o", tmp_path / "out")
    assert code == 2
    assert out.splitlines()[-1] == (f"Error: {path}:row 1: column 'prompt' holds bytes that are not UTF-8 "
                                    "(invalid continuation byte at byte 3); re-encode the file's text as UTF-8")


def test_a_save_to_disk_folder_holding_invalid_utf8_names_the_row_and_column(tmp_path):
    folder, table = tmp_path / "saved", _latin1_table()
    folder.mkdir()
    with pa.ipc.new_stream(folder / "data-00000-of-00001.arrow", table.schema) as w:  # as `datasets` writes it
        w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    code, out = _build("-i", folder, "-t", MISTRAL, "-o", tmp_path / "out")
    assert code == 2
    assert out.splitlines()[-1] == (f"Error: {folder}:row 1: column 'prompt' holds bytes that are not UTF-8 "
                                    "(invalid continuation byte at byte 3); re-encode the file's text as UTF-8")


def test_an_input_file_name_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    name = os.fsdecode(os.fsencode(tmp_path) + b"/r\xe9sum\xe9.jsonl")  # Latin-1 bytes: surrogates in Python
    write_jsonl(Path(name), [GOOD])
    code, out = _build("-i", name, "-t", MISTRAL, "-o", tmp_path / "out")
    assert code == 2
    assert out.splitlines()[-1] == (f"Error: input {tmp_path}/r\\xe9sum\\xe9.jsonl: the file name is not valid "
                                    "UTF-8; rename the file (e.g. `convmv -f latin1 -t utf8`) or link it under a "
                                    "UTF-8 name")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_python_tag_in_a_template_kwarg_is_refused_in_one_line(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    code, out = _build("-i", data, "-t", MISTRAL, "-o", tmp_path / "out",
                       "--template-kwarg", 'x=!!python/object/apply:os.system ["touch pwned"]')
    assert code == 2
    assert out.splitlines()[-1] == (
        "Error: Invalid value for '--template-kwarg': --template-kwarg x: not a plain YAML value (could not "
        "determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'); give text, a "
        "number, true/false, a list or a mapping")
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


def test_a_binary_yaml_config_is_refused_in_one_line(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_bytes(b"inputs: [a.jsonl]\n" + bytes(range(256)))
    code, out = _build(cfg)
    assert code == 2
    assert out == f"Error: {cfg}: not a YAML text file (byte 146 is not UTF-8); give a UTF-8 YAML config"
