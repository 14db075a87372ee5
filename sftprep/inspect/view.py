"""`sftprep inspect`: a packed row or one sample, decoded, with the trained tokens marked.

The view is built as a list of small blocks (pure data), then printed either in colour through
rich or as plain text. Plain text marks what the model is trained on with `⟦` and `⟧`:

    ── row 0 of 34 · shard-train-00000.arrow row 0 · 2 samples, 1,020 tokens + 4 padding ─────────
    ── sample 85 · data/chat.jsonl:16 · 847 tokens, 420 trained ────────────────────────────
    <s><|im_start|>user
    What is the capital of France?<|im_end|>
    <|im_start|>assistant
    ⟦The capital of France is Paris.<|im_end|>⟧
    ── padding · 4 × </s> (id 2), label -100 ────────────────────────────────────────────────

Everything outside `⟦…⟧` has label -100. Special tokens are shown as their literal text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np

from ..errors import InputError
from ..pack.packing import mode
from ..tokenize.labels import IGNORE_INDEX
from ..write.shards import Flat, check_ids, flatten, list_parts, load
from .decode import decode_segments, token_strings
from .folder import read_rejects, read_sample_info

OPEN, CLOSE = "⟦", "⟧"
WIDTH = 88


@dataclass(slots=True)
class Rule:
    """A boundary line with a title: row header, sample start, padding."""
    title: str


@dataclass(slots=True)
class Body:
    """Decoded text as `(text, trained)` runs."""
    segments: list[tuple[str, bool]]


@dataclass(slots=True)
class Tokens:
    """Token table rows: `(position, id, piece, label)`."""
    rows: list[tuple[int, int, str, int]]


Block = Union[Rule, Body, Tokens]


# -- building the view ---------------------------------------------------------------------------

def view_row(folder: Path, manifest: dict[str, Any], load_tok: Callable[[], Any], row: int,
             tokens: bool = False) -> list[Block]:
    """The blocks showing packed row `row` (0-based over all shards, in manifest order).

    `load_tok` gives the tokenizer; it is called only once the row is known to exist.
    """
    table = load(folder)
    n = table.num_rows
    if not 0 <= row < n:
        valid = f"0-{n - 1}" if n else "none"
        raise InputError(f"--row {row} is out of range: this build has {n:,} rows (valid: {valid})")
    flat = _row(table, manifest, row)
    src = _provenance(folder, manifest)
    tok = load_tok()
    real, length = int(flat.real_tokens[0]), int(flat.row_lens[0])
    file, local = _shard_of(manifest, row)
    blocks: list[Block] = [Rule(f"row {row} of {n:,} · {file} row {local} · {len(flat.seq_lens)} "
                                f"sample(s), {real:,} tokens + {length - real:,} padding")]
    packing = mode(manifest.get("packing"))
    for j in range(len(flat.seq_lens)):
        blocks += _piece_blocks(tok, flat, j, src, tokens, f" · a piece ({packing.name} packing)" if packing.splits else "")
    if length > real:
        pad = int(flat.ids[flat.row_off[1] - 1])
        blocks.append(Rule(f"padding · {length - real:,} × {_token_text(tok, pad)} (id {pad}), label -100"))
    return blocks


def view_sample(folder: Path, manifest: dict[str, Any], load_tok: Callable[[], Any], sample_id: int,
                tokens: bool = False) -> list[Block]:
    """The blocks showing one sample, found by its id, with the row(s) it was packed into."""
    table = load(folder)
    sids, seq_off = list_parts(table.column("sample_ids"))
    hits = np.flatnonzero(sids == sample_id)
    if not len(hits):
        raise InputError(_unknown_sample(folder, manifest, sample_id, sids))
    rows = np.unique(np.searchsorted(seq_off, hits, side="right") - 1)
    src = _provenance(folder, manifest)
    tok = load_tok()
    blocks: list[Block] = []
    for row in rows.tolist():
        flat = _row(table, manifest, row)
        file, local = _shard_of(manifest, row)
        for j in np.flatnonzero(flat.sample_ids == sample_id).tolist():
            start = int(flat.piece_start[j])
            end = start + int(flat.seq_lens[j]) - 1
            where = f" · row {row} ({file} row {local}), positions {start}-{end}"
            blocks += _piece_blocks(tok, flat, j, src, tokens, where)
    return blocks


def view_source(folder: Path, manifest: dict[str, Any], load_tok: Callable[[], Any], name: str, count: int = 3,
                tokens: bool = False) -> list[Block]:
    """The first `count` train samples of recipe source `name` (`view_sample`)."""
    known = [s.get("name") for s in manifest.get("sources") or []]
    info = read_sample_info(folder, manifest)
    if name not in known or info is None or "source_name" not in info.schema.names:
        raise InputError(f"no source {name!r} in this build; its sources: {', '.join(map(str, known)) or 'none'}")
    cols = info.select(["sample_id", "source_name", "split"]).to_pydict()
    ids = [sid for sid, src, split in zip(cols["sample_id"], cols["source_name"], cols["split"])
           if src == name and split == "train"][:count]
    if not ids:
        raise InputError(f"source {name!r} has no sample in the train split (see `sftprep stats {folder}`)")
    return [b for sid in ids for b in view_sample(folder, manifest, load_tok, sid, tokens)]


def _provenance(folder: Path, manifest: dict[str, Any]) -> dict[int, str]:
    """sample id -> "file:line" (plus " · truncated" for samples cut to max_length)."""
    info = read_sample_info(folder, manifest)
    if info is None:
        return {}
    cols = [info.column(c).to_pylist() for c in ("sample_id", "source", "truncated")]
    named = len(manifest.get("sources") or []) > 1 and "source_name" in info.schema.names
    names = info.column("source_name").to_pylist() if named else [None] * len(cols[0])
    copies = info.column("repeat").to_pylist() if "repeat" in info.schema.names else [0] * len(cols[0])
    return {sid: src + (f" · source {name}" if name else "") + (f" · copy {k + 1}" if k else "")
            + (" · truncated" if cut else "") for sid, src, cut, name, k in zip(*cols, names, copies)}


def _piece_blocks(tok, flat: Flat, j: int, src: dict[int, str], tokens: bool, where: str) -> list[Block]:
    a = int(flat.piece_start[j])
    b = a + int(flat.seq_lens[j])
    ids, labels = flat.ids[a:b], flat.labels[a:b]
    sid = int(flat.sample_ids[j])
    trained = int((labels != IGNORE_INDEX).sum())
    title = f"sample {sid} · {src.get(sid, 'source unknown')} · {b - a:,} tokens, {trained:,} trained{where}"
    if tokens:
        return [Rule(title), Tokens([(i, int(t), p, int(lab)) for i, (t, p, lab)
                                     in enumerate(zip(ids, token_strings(tok, ids), labels))])]
    return [Rule(title), Body(decode_segments(tok, ids, labels))]


def _row(table, manifest: dict[str, Any], row: int) -> Flat:
    """One row of the build, flattened, its ids checked against the build's vocabulary before decoding."""
    flat = flatten(table.slice(row, 1))
    check_ids(flat.ids, manifest["tokenizer"].get("vocab_size"), "%s row %d" % _shard_of(manifest, row))
    return flat


def _shard_of(manifest: dict[str, Any], row: int) -> tuple[str, int]:
    """Global row -> (shard file, row inside it)."""
    for s in manifest["shards"]:
        if row < s["rows"]:
            return s["file"], row
        row -= s["rows"]
    return "?", row


def _unknown_sample(folder: Path, manifest: dict[str, Any], sample_id: int, sids: np.ndarray) -> str:
    for r in read_rejects(folder, manifest):
        if r.get("sample_id") == sample_id:
            return (f"sample {sample_id} ({r.get('source')}) was dropped at build time: {r.get('reason')}: "
                    f"{r.get('message')} (see {manifest.get('rejects_file', 'rejects.jsonl')})")
    if not len(sids):
        return f"sample {sample_id} is not in this build: it holds no samples"
    return (f"sample {sample_id} is not in this build: its sample ids run from {int(sids.min())} to "
            f"{int(sids.max())} ({len(np.unique(sids)):,} samples kept)")


def _token_text(tok, token_id: int) -> str:
    return escape(token_strings(tok, [token_id])[0])


def escape(piece: str) -> str:
    """A token piece on one line: newlines and tabs written as `\\n`, `\\t`."""
    return piece.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


# -- output --------------------------------------------------------------------------------------

LEGEND = f"trained tokens are shown as {OPEN}…{CLOSE}; everything else has label -100 (masked)"


def format_plain(blocks: list[Block], legend: bool = True) -> str:
    """Plain text: rules as `── title ──…`, trained text inside ⟦…⟧, token tables in columns."""
    lines = [LEGEND] if legend else []
    for block in blocks:
        if isinstance(block, Rule):
            lines.append(_rule(block.title))
        elif isinstance(block, Body):
            lines.append(marked(block.segments))
        else:
            lines += _token_lines(block.rows)
    return "\n".join(lines) + "\n"


def marked(segments: list[tuple[str, bool]]) -> str:
    """`(text, trained)` runs as one string with the trained runs inside ⟦…⟧."""
    return "".join(f"{OPEN}{t}{CLOSE}" if trained else t for t, trained in segments)


def _rule(title: str) -> str:
    head = f"── {title} "
    return head + "─" * max(3, WIDTH - len(head))


def _token_lines(rows: list[tuple[int, int, str, int]]) -> list[str]:
    out = [f"{'pos':>6}  {'id':>7}  {'piece':<24}  label"]
    for pos, tid, piece, lab in rows:
        shown = f"{OPEN}{lab}{CLOSE}" if lab != IGNORE_INDEX else str(lab)
        out.append(f"{pos:>6}  {tid:>7}  {escape(piece):<24}  {shown}")
    return out


TRAINED_STYLE, MASKED_STYLE = "bold green", "dim"


def print_rich(blocks: list[Block], console) -> None:
    """Colour: trained text bold green, masked text dim; rules and tables drawn by rich."""
    from rich.table import Table
    from rich.text import Text

    legend = Text.assemble(("trained", TRAINED_STYLE), " tokens are bold green; ",
                           ("masked", MASKED_STYLE), " ones (label -100) are dim")
    console.print(legend, highlight=False)
    for block in blocks:
        if isinstance(block, Rule):
            console.print(Text(_rule(block.title), style="cyan"), soft_wrap=True)
        elif isinstance(block, Body):
            text = Text()
            for t, trained in block.segments:
                text.append(t, TRAINED_STYLE if trained else MASKED_STYLE)
            console.print(text, highlight=False, soft_wrap=True)
        else:
            table = Table("pos", "id", "piece", "label", box=None, pad_edge=False)
            for pos, tid, piece, lab in block.rows:
                style = TRAINED_STYLE if lab != IGNORE_INDEX else MASKED_STYLE
                table.add_row(str(pos), str(tid), Text(escape(piece)), str(lab), style=style)
            console.print(table)
