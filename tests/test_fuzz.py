"""Fuzzing the readers: random bytes and random JSON (deep, huge, odd Unicode) never escape as a
traceback, and every input record is either kept or listed in rejects.jsonl."""

from __future__ import annotations

import json

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftprep.cli import main
from sftprep.config import config_from_dict
from sftprep.scale.pipeline import encoder_for
from sftprep.read import reader_for
from sftprep.tokenizer import load_fast
from tests.conftest import MISTRAL

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
TOK = load_fast(MISTRAL)
ENCODER = encoder_for(config_from_dict({"inputs": ["x.jsonl"], "tokenizer": MISTRAL, "out": "unused",
                                    "max_length": 64}), TOK)

ODD = st.text(st.characters(codec=None, blacklist_categories=()), max_size=30)  # surrogates, controls, ...
SCALAR = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.integers(-10**30, 10**30), ODD)
VALUE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(ODD, inner, max_size=4)), max_leaves=20)
RECORD = st.one_of(
    st.fixed_dictionaries({"prompt": VALUE, "completion": VALUE}),
    st.fixed_dictionaries({"messages": VALUE}),
    st.fixed_dictionaries({"text": ODD}),
    st.dictionaries(ODD, VALUE, max_size=4),
    VALUE,
)


def _line(record, deep: int, digits: int) -> bytes:
    """One JSON line; `deep` > 0 nests it that deep, `digits` > 0 adds an integer that long."""
    text = json.dumps(record, ensure_ascii=False, allow_nan=True)
    if deep:
        text = '{"prompt": ' + "[" * deep + "]" * deep + ', "completion": "x"}'
    if digits:
        text = '{"prompt": "a", "completion": "b", "n": ' + "9" * digits + "}"
    return text.encode("utf-8", "surrogatepass")


LINES = st.lists(st.tuples(RECORD, st.sampled_from([0, 0, 0, 3000]), st.sampled_from([0, 0, 0, 5000]))
                 .map(lambda t: _line(*t)) | st.binary(max_size=40), min_size=1, max_size=8)


def _non_blank_lines(data: bytes) -> int:
    """Records a JSON Lines file holds: its non-blank lines (a UTF-8 byte order mark is not content)."""
    return sum(1 for raw in data.removeprefix(b"\xef\xbb\xbf").split(b"\n") if raw.strip())


def _every_record_kept_or_rejected(path) -> None:
    records = list(reader_for(path)(path))
    out = ENCODER(list(enumerate(records)))
    kept = set(out.sample_ids)
    rejected = {r["sample_id"] for r in out.rejects}
    assert kept.isdisjoint(rejected)
    assert kept | rejected == set(range(len(records)))


@FUZZ
@given(LINES)
def test_random_json_lines_are_kept_or_rejected(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    records = list(reader_for(path)(path))
    assert len(records) == _non_blank_lines(b"\n".join(lines))  # one per line
    _every_record_kept_or_rejected(path)


@FUZZ
@given(st.lists(st.tuples(RECORD, st.sampled_from([0, 0, 3000]), st.sampled_from([0, 0, 5000]))
                .map(lambda t: _line(*t)), max_size=8), st.binary(max_size=20), st.booleans())
def test_random_json_arrays_are_kept_or_rejected(tmp_path_factory, items, tail, cut):
    path = tmp_path_factory.mktemp("fuzz") / "data.json"
    body = b"[" + b",\n".join(items) + b"]"
    path.write_bytes(body[: len(body) // 2] + tail if cut else body)
    _every_record_kept_or_rejected(path)


@FUZZ
@given(st.binary(max_size=200), st.sampled_from(["data.jsonl", "data.json", "data.csv"]))
def test_random_bytes_are_kept_or_rejected(tmp_path_factory, data, name):
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_bytes(data)
    try:
        _every_record_kept_or_rejected(path)
    except ValueError as e:  # a file-level refusal (e.g. CSV without the needed columns): a message, named
        assert str(path) in str(e) or "CSV" in str(e) or "csv" in str(e), e


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(LINES)
def test_build_of_random_input_exits_cleanly_and_loses_nothing(tmp_path_factory, lines):
    """The CLI end to end: exit 0, or 2 with one `Error:` line; read = kept + listed in rejects.jsonl."""
    tmp = tmp_path_factory.mktemp("fuzz")
    path = tmp / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    r = CliRunner().invoke(main, ["build", "-i", str(path), "-t", MISTRAL, "-o", str(tmp / "o"), "--max-length", "64",
                                  "--max-reject-ratio", "1", "-q"])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    n = _non_blank_lines(b"\n".join(lines))
    rejects = (tmp / "o" / "rejects.jsonl")
    listed = len(rejects.read_text().splitlines()) if rejects.exists() else 0
    if r.exit_code == 0:
        totals = json.loads((tmp / "o" / "manifest.json").read_text())["totals"]
        assert totals["records_read"] == n == totals["samples_kept"] + listed
    else:
        assert r.exit_code == 2 and r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1, r.output
        assert listed == n or "hold no records" in r.output or "no input" in r.output, r.output
