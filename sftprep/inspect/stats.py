"""`sftprep stats`: what a build holds, from its manifest plus distributions computed from
`samples.feather`, the shards' `seq_lens` and `rejects.jsonl`.

`collect()` reads the arrays (never a whole token column: only list offsets and `seq_lens`),
`summarize()` turns them into a JSON-able dict, `print_stats()` prints it for a person and `plot()`
draws the histograms (matplotlib, imported only there).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingExtra
from ..pack.packing import mode
from ..write.shards import load, row_sizes
from .folder import read_build, read_rejects, read_sample_info, source_file

BINS = 10


@dataclass(slots=True)
class Collected:
    """The raw numbers behind the statistics of one build."""
    folder: Path
    manifest: dict[str, Any]
    sample_tokens: np.ndarray    # per kept sample
    sample_trained: np.ndarray
    truncated: np.ndarray        # bool per kept sample
    files: list[str]             # input file of each kept sample
    row_tokens: np.ndarray       # per row: sum(seq_lens)
    samples_per_row: np.ndarray
    rejects: list[dict[str, Any]]


def collect(path: str | Path) -> Collected:
    """Read what the statistics need from the build in `path`."""
    folder, manifest = read_build(path)
    row_tokens, per_row = row_sizes(load(folder))
    info = read_sample_info(folder, manifest)
    if info is None:
        raise FileNotFoundError(f"{folder / manifest.get('samples_file', 'samples.arrow')} is missing; "
                                "rebuild with `sftprep build --overwrite`")
    if "split" in info.schema.names:  # the distributions are the train split's (its rows are those loaded)
        import pyarrow.compute as pc

        info = info.filter(pc.equal(info.column("split").cast("string"), "train"))
    return Collected(
        folder=folder, manifest=manifest,
        sample_tokens=info.column("num_tokens").to_numpy(),
        sample_trained=info.column("num_trained").to_numpy(),
        truncated=info.column("truncated").to_numpy(zero_copy_only=False).astype(bool),
        files=[source_file(s) for s in info.column("source").to_pylist()],
        row_tokens=row_tokens,
        samples_per_row=per_row,
        rejects=read_rejects(folder, manifest),
    )


def summary(values: np.ndarray) -> dict[str, float | int | None]:
    """min, percentiles, max and mean of `values` (None for an empty array)."""
    if not len(values):
        return {k: None for k in ("min", "p50", "p90", "p99", "max", "mean")}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"min": int(values.min()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "max": int(values.max()), "mean": round(float(values.mean()), 2)}


def histogram(values: np.ndarray, hi: int, bins: int = BINS) -> dict[str, list[int]]:
    """Counts in `bins` equal integer bins over [0, hi] (the last bin includes `hi`)."""
    hi = max(int(hi), int(values.max()) if len(values) else 0, 1)
    edges = np.unique(np.ceil(np.linspace(0, hi, bins + 1)).astype(np.int64))
    counts, _ = np.histogram(values, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def summarize(c: Collected) -> dict[str, Any]:
    """The statistics as a JSON-able dict (what `sftprep stats --json` prints)."""
    m = c.manifest
    max_length, packed = m["max_length"], mode(m.get("packing")).padded
    fill = c.row_tokens / max_length if packed else np.zeros(0)
    values, counts = np.unique(c.samples_per_row, return_counts=True)
    kept = int(len(c.sample_tokens))
    return {
        "build": str(c.folder),
        "build_id": m.get("build_id"),
        "tokenizer": m["tokenizer"].get("name"),
        "template": m.get("template"),
        "max_length": max_length,
        "packing": m.get("packing"),
        "totals": m.get("totals", {}),
        "samples": {
            "count": kept,
            "tokens": summary(c.sample_tokens),
            "trained": summary(c.sample_trained),
            "trained_share": round(float(c.sample_trained.sum() / max(1, c.sample_tokens.sum())), 6),
            "truncated": int(c.truncated.sum()),
            "without_trained_tokens": int((c.sample_trained == 0).sum()),
        },
        "rows": {
            "count": int(len(c.row_tokens)),
            "fill_ratio": m.get("totals", {}).get("fill_ratio"),
            "fill": summary(np.round(fill * 100).astype(np.int64)) if packed else None,
            "samples_per_row": summary(c.samples_per_row),
        },
        "dropped_by_reason": m.get("totals", {}).get("dropped_by_reason", {}),
        "histograms": {
            "sample_tokens": histogram(c.sample_tokens, max_length),
            "trained_tokens": histogram(c.sample_trained, max_length),
            "samples_per_row": {"values": values.tolist(), "counts": counts.tolist()},
            "row_fill_percent": histogram(np.round(fill * 100), 100) if packed else None,
        },
        "per_file": _per_file(c),
        "per_source": [{k: v for k, v in s.items() if k != "inputs"} for s in m.get("sources") or []],
    }


def _per_file(c: Collected) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = defaultdict(lambda: {"samples": 0, "tokens": 0, "trained_tokens": 0,
                                                           "truncated": 0, "dropped": 0,
                                                           "dropped_by_reason": Counter()})
    for f in (i["path"] for i in c.manifest.get("inputs", [])):
        rows[str(f)]  # list every input, even one that gave nothing
    per_sample = zip(c.files, c.sample_tokens.tolist(), c.sample_trained.tolist(), c.truncated.tolist())
    for f, n, t, tr in per_sample:
        r = rows[f]
        r["samples"] += 1
        r["tokens"] += n
        r["trained_tokens"] += t
        r["truncated"] += int(tr)
    for rej in c.rejects:
        r = rows[source_file(str(rej.get("source", "?")))]
        r["dropped"] += 1
        r["dropped_by_reason"][rej.get("reason", "?")] += 1
    return [{"file": f, **r, "dropped_by_reason": dict(sorted(r["dropped_by_reason"].items()))}
            for f, r in rows.items()]


# -- output --------------------------------------------------------------------------------------

def print_stats(stats: dict[str, Any], console) -> None:
    """Print the statistics with rich: totals, distributions, text histograms, per-file table."""
    from rich.table import Table
    from rich.text import Text

    t = stats["totals"]
    console.print(Text(f"sftprep stats: {stats['build']}", style="bold"))
    console.print(Text(f"tokenizer {stats['tokenizer']} · template {stats['template']} · max_length "
                       f"{stats['max_length']} · packing {stats['packing']}"))
    totals = Table(show_header=False, title="totals (manifest)", title_justify="left")
    totals.add_column(style="bold")
    totals.add_column(justify="right")
    for key in ("records_read", "samples_kept", "samples_dropped", "samples_truncated", "tokens",
                "trained_tokens", "rows", "fill_ratio"):
        if t.get(key) is not None:
            totals.add_row(key.replace("_", " "), _num(t[key]))
    if t.get("tokens"):
        totals.add_row("trained share", f"{t['trained_tokens'] / t['tokens']:.1%}")
    for reason, n in stats["dropped_by_reason"].items():
        totals.add_row(f"  dropped: {reason}", _num(n))
    console.print(totals)

    dist = Table("per sample / per row", title="distributions", title_justify="left")
    for name in ("min", "p50", "p90", "p99", "max", "mean"):
        dist.add_column(name, justify="right")
    dist.add_row("tokens per sample", *_cells(stats["samples"]["tokens"]))
    dist.add_row("trained tokens per sample", *_cells(stats["samples"]["trained"]))
    dist.add_row("samples per row", *_cells(stats["rows"]["samples_per_row"]))
    if stats["rows"]["fill"] is not None:
        dist.add_row("row fill %", *_cells(stats["rows"]["fill"]))
    console.print(dist)

    h = stats["histograms"]
    console.print(Text(text_histogram("tokens per sample", h["sample_tokens"])))
    console.print(Text(text_histogram("trained tokens per sample", h["trained_tokens"])))
    spr = {"edges": None, "labels": [str(v) for v in h["samples_per_row"]["values"]],
           "counts": h["samples_per_row"]["counts"]}
    console.print(Text(text_histogram("samples per row", spr)))

    files = Table("input file", title="per input file", title_justify="left")
    for name in ("samples", "dropped", "truncated", "tokens", "trained"):
        files.add_column(name, justify="right")
    for r in stats["per_file"]:
        files.add_row(Text(r["file"], overflow="fold"), _num(r["samples"]), _num(r["dropped"]),
                      _num(r["truncated"]), _num(r["tokens"]), _num(r["trained_tokens"]))
    console.print(files)
    if len(stats["per_source"]) > 1:
        _print_sources(stats["per_source"], console)
    for r in stats["per_file"]:
        if r["dropped"]:
            reasons = ", ".join(f"{k} {v:,}" for k, v in r["dropped_by_reason"].items())
            console.print(Text(f"dropped from {r['file']}: {reasons}"))


SOURCE_COLUMNS = ("records", "kept", "duplicate", "contaminated", "rejected", "validation", "selected", "tokens",
                  "trained_tokens", "truncated", "trained_share")


def _print_sources(sources: list[dict[str, Any]], console) -> None:
    """The recipe's accounting: what became of each source's records, and its share of the trained tokens."""
    from rich.table import Table

    table = Table("source", title="per source", title_justify="left")
    for name in SOURCE_COLUMNS:
        table.add_column(name.replace("_", " "), justify="right")
    for s in sources:
        rejected = s.get("rejected", {})
        cells = {**s, "duplicate": rejected.get("duplicate", 0), "contaminated": rejected.get("contaminated", 0),
                 "rejected": sum(n for r, n in rejected.items() if r not in ("duplicate", "contaminated"))}
        table.add_row(s["name"], *(f"{cells[c]:.1%}" if c == "trained_share" else _num(cells.get(c, 0))
                                   for c in SOURCE_COLUMNS))
    console.print(table)


def text_histogram(title: str, hist: dict[str, Any], width: int = 40) -> str:
    """A histogram as lines of `█` bars, one per bin (`edges`) or per value (`labels`)."""
    counts = hist["counts"]
    if hist.get("edges") is not None:
        e = hist["edges"]
        last = len(counts) - 1  # bins are [lo, hi) except the last, which includes hi
        labels = [f"{e[i]:>6,}-{e[i + 1] - (i < last):<6,}" for i in range(len(counts))]
    else:
        labels = [f"{lab:>13}" for lab in hist["labels"]]
    top = max(counts, default=0) or 1
    lines = [title]
    for label, n in zip(labels, counts):
        bar = "█" * int(round(width * n / top)) if n else ""
        lines.append(f"  {label} {bar:<{width}} {n:,}")
    return "\n".join(lines)


def _num(v) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:.4f}" if isinstance(v, float) else str(v)


def _cells(s: dict[str, Any]) -> list[str]:
    def cell(k: str) -> str:
        if s[k] is None:
            return "-"
        return f"{s[k]:,.0f}" if k in ("p50", "p90", "p99") else f"{s[k]:,.1f}" if k == "mean" else _num(s[k])

    return [cell(k) for k in ("min", "p50", "p90", "p99", "max", "mean")]


# -- picture -------------------------------------------------------------------------------------

def plot(c: Collected, path: str | Path) -> Path:
    """Draw four histograms (tokens and trained tokens per sample, samples per row, row fill) into
    a PNG (or any format matplotlib knows by the suffix of `path`)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise MissingExtra("--plot needs matplotlib, a dependency of sftprep missing from this environment: "
                           "pip install matplotlib (the statistics above need nothing more)") from None

    m = c.manifest
    max_length = m["max_length"]
    fig = Figure(figsize=(11, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    (a, b), (d, e) = fig.subplots(2, 2)
    hi = max(max_length, int(c.sample_tokens.max()) if len(c.sample_tokens) else 1)
    bins = np.linspace(0, hi, 41)
    for ax, values, title, colour in ((a, c.sample_tokens, "tokens per sample", "tab:blue"),
                                      (b, c.sample_trained, "trained tokens per sample", "tab:green")):
        ax.hist(values, bins=bins, color=colour)
        ax.axvline(max_length, color="tab:red", linestyle="--", label=f"max_length {max_length}")
        ax.set(title=title, xlabel="tokens", ylabel="samples")
        ax.legend()
    values, counts = np.unique(c.samples_per_row, return_counts=True)
    d.bar(values, counts, color="tab:purple")
    d.set(title="samples per row", xlabel="samples in the row", ylabel="rows")
    d.xaxis.set_major_locator(MaxNLocator(integer=True))
    if mode(m.get("packing")).padded and len(c.row_tokens):
        e.hist(100 * c.row_tokens / max_length, bins=np.linspace(0, 100, 21), color="tab:orange")
        e.set(title="row fill", xlabel="% of max_length that is real tokens", ylabel="rows")
    else:
        e.hist(c.row_tokens, bins=bins, color="tab:orange")
        e.set(title="row length (unpacked)", xlabel="tokens", ylabel="rows")
    for ax in (a, b, d, e):  # counts of samples and rows are whole numbers
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    t = m.get("totals", {})
    fill = f", fill {t['fill_ratio']:.1%}" if t.get("fill_ratio") is not None else ""
    fig.suptitle(f"{c.folder.name}: {len(c.sample_tokens):,} samples, {len(c.row_tokens):,} rows x "
                 f"{max_length} ({m.get('packing')}){fill}, {t.get('samples_dropped', 0):,} dropped")
    out = Path(path)
    fig.savefig(out)
    return out
