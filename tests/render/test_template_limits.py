"""A runaway chat template (endless loops, huge strings, huge output) costs its record, rejected as
`template_limit`, within max_render_seconds / max_render_chars; one that runs away on every record
stops the build in one line naming the template."""

from __future__ import annotations

import json
import time

import pytest

from sftprep.read.formats import FormatError, normalize
from sftprep.render.chat import ChatTemplate
from tests.conftest import MISTRAL, write_jsonl
from tests.limited import one_line_error, sftprep_limited

TURNS = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
         "{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}")

RUNAWAY = {  # each runs away in its own way; `{% if ... %}` around it: only on conversations of 4+ messages
    "nested range loops, no output": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "loops over a range set once": "{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
    "'x' * 4e9": "{{ 'x' * ('4e9'|float|int) }}",
    "a number of a billion digits": "{{ 10 ** (10 ** 9) }}",
    "'x'|center(4e9)": "{{ 'x'|center(4000000000) }}",
    "'x'.ljust(4e9)": "{{ 'x'.ljust(4000000000) }}",
    "a string doubled in a namespace": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                                       "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "a string doubled by set": "{% set s = 'x' %}" + "{% set s = s ~ s %}" * 64,
    "10^8 characters written": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
}


def conversation_record(turns: int) -> dict:
    return {"messages": [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}"} for i in range(turns)]}


def conversation(turns: int):
    return normalize(conversation_record(turns), "messages", {})


def chat(runaway: str) -> ChatTemplate:
    source = "{% if messages|length > 3 %}" + runaway + "{% endif %}" + TURNS
    return ChatTemplate(source, {"bos_token": "<s>", "eos_token": "</s>"}, ["</s>"], ["<s>", "</s>"],
                        max_seconds=1, max_chars=1_000_000)


@pytest.mark.parametrize("runaway", RUNAWAY.values(), ids=RUNAWAY.keys())
def test_a_runaway_template_rejects_its_record_within_the_limits(runaway):
    template = chat(runaway)
    assert template.segments(conversation(2)) == [("<s>[INST] turn 0 [/INST]", None), ("turn 1</s>", 0)]
    started = time.monotonic()
    with pytest.raises(FormatError) as e:
        template.segments(conversation(4))
    assert e.value.reason == "template_limit"
    assert time.monotonic() - started < 5  # one bound per conversation, however many renders it takes
    assert "--max-render-seconds" in str(e.value) or "max_render_chars (1,000,000)" in str(e.value)


def test_the_render_limits_are_settings_with_flags():
    from tests.conftest import sftprep_cli

    help_text = sftprep_cli("build", "--help").output
    assert "--max-render-seconds" in help_text and "--max-render-chars" in help_text


@pytest.mark.slow
@pytest.mark.parametrize("runaway", [RUNAWAY["'x' * 4e9"], RUNAWAY["a string doubled in a namespace"],
                                     RUNAWAY["10^8 characters written"]], ids=["x*4e9", "doubling", "1e8 chars"])
def test_a_template_that_runs_away_on_every_record_stops_the_build_naming_it(tmp_path, runaway):
    (tmp_path / "bad.jinja").write_text(runaway + TURNS)
    write_jsonl(tmp_path / "d.jsonl", [conversation_record(2)])
    line = one_line_error(sftprep_limited(tmp_path, "build", "-i", "d.jsonl", "-t", MISTRAL, "--chat-template",
                                          "bad.jinja", "-o", "out"))
    assert "the chat template bad.jinja built a string or list of more than max_render_chars (67,108,864)" in line
    assert "on every record (nothing was built)" in line and not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_endless_loops_on_some_records_reject_them_and_the_build_goes_on(tmp_path):
    (tmp_path / "t.jinja").write_text("{% if messages|length > 3 %}" + RUNAWAY["nested range loops, no output"]
                                      + "{% endif %}" + TURNS)
    write_jsonl(tmp_path / "d.jsonl", [conversation_record(2), conversation_record(4), conversation_record(2)])
    r = sftprep_limited(tmp_path, "build", "-i", "d.jsonl", "-t", MISTRAL, "--chat-template", "t.jinja", "-o", "out",
                        "--max-render-seconds", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(x["source"], x["reason"]) for x in rejects] == [("d.jsonl:2", "template_limit")]
    assert "the chat template t.jinja ran longer than max_render_seconds (3 s)" in rejects[0]["message"]

