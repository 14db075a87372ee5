"""A YAML alias bomb (nine aliases of nine aliases..., 9^9 values from ten lines) in a build config or a
--template-kwarg is refused in one line naming where it is, before anything walks it."""

from __future__ import annotations

import pytest

from tests.conftest import MISTRAL, write_jsonl
from tests.limited import one_line_error, sftprep_limited


def alias_bomb(indent: str) -> str:
    """Ten YAML list items, each the previous one nine times: 9^9 values expanded."""
    items = [f"{indent}- &a0 [x, x, x, x, x, x, x, x, x]"]
    items += [f"{indent}- &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return "\n".join(items) + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["inputs", "template_kwargs"])
def test_a_yaml_alias_bomb_in_a_build_config_is_refused_naming_the_file(tmp_path, where):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "hi"}])
    bomb = f"inputs:\n{alias_bomb('  ')}" if where == "inputs" else \
        f"inputs: [d.jsonl]\ntemplate_kwargs:\n  k:\n{alias_bomb('    ')}"
    (tmp_path / "build.yaml").write_text(f"tokenizer: {MISTRAL}\nout: out\n{bomb}")
    line = one_line_error(sftprep_limited(tmp_path, "build", "build.yaml", timeout=30))
    assert line == ("Error: build.yaml: its aliases (*name) expand to more than 1,000,000 values (an alias bomb?); "
                    "write the values out, or use fewer aliases")


@pytest.mark.slow
def test_a_yaml_alias_bomb_in_a_template_kwarg_is_refused_naming_the_flag(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "hi"}])
    bomb = "[" + ", ".join(line.strip()[2:] for line in alias_bomb("").splitlines()) + "]"
    r = sftprep_limited(tmp_path, "build", "-i", "d.jsonl", "-t", MISTRAL, "-o", "out", "--template-kwarg",
                        f"k={bomb}", timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr  # click's usage lines, then the one error
    assert r.stderr.strip().splitlines()[-1] == (
        "Error: Invalid value for '--template-kwarg': --template-kwarg k: its aliases (*name) expand to more than "
        "1,000,000 values (an alias bomb?); write the values out, or use fewer aliases")


def test_a_yaml_alias_that_holds_itself_is_refused(tmp_path):
    from sftprep.config import ConfigError, load_yaml

    (tmp_path / "c.yaml").write_text("inputs: &a [d.jsonl, *a]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: an alias refers to a value that holds it \(a cycle\)"):
        load_yaml(tmp_path / "c.yaml")
