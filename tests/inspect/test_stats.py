"""`sftprep stats` through the CLI: the numbers a person reads agree with samples.feather, the shards
and rejects.jsonl; `--json` for machines; `--plot` writes a real PNG."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import sftprep
from sftprep.write.shards import open_table
from tests.conftest import DATA, MISTRAL, write_jsonl, sftprep_cli

EXTRA = [
    {"instruction": "Say hi.", "output": "Hi!"},
    {"oops": 1},                                        # unknown_format
    {"instruction": "Say nothing.", "output": ""},      # empty_output
    {"instruction": "Count.", "output": " ".join(str(i) for i in range(1, 101))},  # truncated
]


run = sftprep_cli


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats")
    extra = write_jsonl(tmp / "extra.jsonl", EXTRA)
    out = tmp / "out"
    r = run("build", "-i", DATA / "alpaca_en.json", "-i", extra, "-t", MISTRAL, "--template", "alpaca",
            "--max-length", 256, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    info = open_table(out / "samples.feather")
    return out, str(extra), info


def histogram_lines(output: str, title: str) -> list[tuple[str, int]]:
    """The (label, count) lines under a text histogram's title line."""
    lines = output.splitlines()
    start = lines.index(title) + 1
    out = []
    for line in lines[start:]:
        m = re.fullmatch(r"\s+(\S+) [█ ]*?\s*([\d,]+)", line)
        if not m:
            break
        out.append((m.group(1), int(m.group(2).replace(",", ""))))
    return out


def test_totals_and_drops_by_reason(built):
    out, extra, _ = built
    r = run("stats", out)
    assert r.exit_code == 0, r.output
    text = r.output
    for label, value in [("records read", "44"), ("samples kept", "42"), ("samples dropped", "2"),
                         ("dropped: empty_output", "1"), ("dropped: unknown_format", "1")]:
        assert re.search(rf"│ +{re.escape(label)} +│ +{value} │", text), label
    m = sftprep.read_manifest(out)
    assert re.search(rf"│ samples truncated +│ +{m['totals']['samples_truncated']} │", text)
    assert re.search(rf"│ fill ratio +│ +{m['totals']['fill_ratio']:.4f} │", text)


def test_sample_length_histograms_count_every_sample(built):
    out, _, info = built
    text = run("stats", out).output
    for title, column in [("tokens per sample", "num_tokens"), ("trained tokens per sample", "num_trained")]:
        values = info.column(column).to_numpy()
        bins = histogram_lines(text, title)
        assert len(bins) == 10 and sum(n for _, n in bins) == 42
        for label, n in bins:  # each bin's count is the number of samples in [lo, hi]
            lo, hi = (int(x.replace(",", "")) for x in label.split("-"))
            assert n == int(((values >= lo) & (values <= hi)).sum()), (title, label)
    # truncated samples pile up in the last bin, at max_length
    assert histogram_lines(text, "tokens per sample")[-1][1] >= int(info.column("truncated").to_numpy(
        zero_copy_only=False).sum())


def test_distribution_table_and_samples_per_row(built):
    out, _, info = built
    text = run("stats", out).output
    tokens = info.column("num_tokens").to_numpy()
    row = re.search(r"│ tokens per sample +│(.*)│", text).group(1).split("│")
    p50, p90, p99 = (f"{np.percentile(tokens, q):,.0f}" for q in (50, 90, 99))
    expected = [str(tokens.min()), p50, p90, p99, str(tokens.max()), f"{tokens.mean():,.1f}"]
    assert [c.strip() for c in row] == expected
    per_row = [len(s) for s in sftprep.load(out).column("seq_lens").to_pylist()]
    expected = [(str(v), per_row.count(v)) for v in sorted(set(per_row))]
    assert histogram_lines(text, "samples per row") == expected


def test_per_input_file_counts(built):
    out, extra, info = built
    text = run("stats", out).output
    tokens = info.column("num_tokens").to_numpy()
    en = [s.startswith(str(DATA / "alpaca_en.json")) for s in info.column("source").to_pylist()]
    trunc = info.column("truncated").to_numpy(zero_copy_only=False)
    en_row = re.search(r"│ \S*alpaca_en\.json +│(.*)│", text).group(1).split("│")
    assert [c.strip() for c in en_row] == ["40", "0", str(trunc[en].sum()), f"{tokens[en].sum():,}",
                                           f"{info.column('num_trained').to_numpy()[en].sum():,}"]
    extra_row = re.search(r"│ \S*extra\.jsonl +│(.*)│", text).group(1).split("│")
    assert [c.strip() for c in extra_row][:3] == ["2", "2", "1"]
    assert f"dropped from {extra}: empty_output 1, unknown_format 1" in text


def test_json_for_machines(built):
    out, extra, info = built
    r = run("stats", out, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["totals"] == sftprep.read_manifest(out)["totals"]
    assert s["samples"]["count"] == 42 and s["samples"]["tokens"]["max"] == 256
    assert s["samples"]["truncated"] == int(info.column("truncated").to_numpy(zero_copy_only=False).sum())
    assert s["dropped_by_reason"] == {"empty_output": 1, "unknown_format": 1}
    files = {f["file"]: f for f in s["per_file"]}
    assert files[extra]["samples"] == 2 and files[extra]["dropped_by_reason"] == s["dropped_by_reason"]
    assert sum(s["histograms"]["sample_tokens"]["counts"]) == 42
    assert s["histograms"]["sample_tokens"]["edges"][-1] == 256
    assert sum(s["histograms"]["samples_per_row"]["counts"]) == s["rows"]["count"] == s["totals"]["rows"]


@pytest.mark.slow
def test_plot_writes_a_png_of_the_histograms(built, tmp_path):
    from matplotlib.image import imread

    out, _, _ = built
    png = tmp_path / "stats.png"
    r = run("stats", out, "--plot", png, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["samples"]["count"] == 42  # the message about the picture went to stderr
    assert f"histograms written to {png}" in r.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    pixels = imread(png)
    assert pixels.shape[:2] == (750, 1100)  # 11 x 7.5 inches at 100 dpi
    assert pixels[..., :3].std() > 0.05  # bars, axes and text, not a blank canvas
    # coloured bars: the blue of the first panel is there
    assert ((pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.3)).sum() > 1000


def test_plot_without_matplotlib_is_a_one_line_message(built, tmp_path, monkeypatch):
    import sys

    out, _, _ = built
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as in a plain install: import fails
    r = run("stats", out, "--plot", tmp_path / "stats.png")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "Error: --plot needs matplotlib, a dependency of sftprep missing from this environment: pip install matplotlib" in r.output
    assert "samples" in r.output  # the statistics were printed first


def test_missing_build_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run("stats", tmp_path / "empty")
    assert r.exit_code == 2
    assert r.output == f"Error: {tmp_path / 'empty'} is not a sftprep build (no manifest.json)\n"
