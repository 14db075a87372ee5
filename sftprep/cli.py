"""`sftprep` command line: a thin click layer over `sftprep.api`."""

from __future__ import annotations

import dataclasses
import functools
import sys
import typing
from pathlib import Path
from typing import Any, NoReturn

import click

from .config import BUILD_SCHEMA, Alias, BuildConfig, ExecutorConfig, Flag, Schema, field_help, flag_of
from .errors import USER_ERRORS, ConfigError


def fail(e: BaseException) -> NoReturn:
    """Print a user error as one line (`Error: ...`, click's own prefix) and exit with code 2."""
    click.echo(f"Error: {e}", err=True)
    sys.exit(2)


def user_errors(fn):
    """Turn errors the user can fix (`sftprep.errors.USER_ERRORS`) into one line and exit code 2;
    anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            fail(e)
        except KeyboardInterrupt:
            click.echo("Interrupted: nothing was marked complete (no manifest written); run the same "
                       "command again to finish.", err=True)
            sys.exit(130)
        except OSError as e:  # disk full, unwritable folder...
            fail(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sftprep")
def main() -> None:
    """Build SFT data once: raw records -> tokenized, label-masked, packed Arrow shards.

    \b
      sftprep build --input data.jsonl --tokenizer tok/ --template chatml --out shards/
      python -c "import pandas as pd; print(pd.read_feather('shards/shard-train-00000.arrow'))"
    """


def setting_options(schema: Schema, *, skip: tuple[str, ...] = ()) -> list:
    """Every setting of `schema` as a click option, made from its config dataclass field alone: the flag is
    the flat key (`--max-length`; a repeatable one in the singular, `--input`), the type, default and help
    come from the field and its docstring, the rest from its `Flag` (a short name, choices, TRL's names;
    a TRL name whose value maps differently, such as --completion-only-loss, is a flag of its own).
    `sftprep build` and `sfttrain run` have no other list of their settings."""
    options = []
    for key, cls, f in schema.settings():
        if key in skip:
            continue
        options.append(_option(key, cls, f))
        options += [_alias_option(a) for a in flag_of(f).aliases if a.convert is not None]
    return options


def dataclass_options(cls: type) -> list:
    """Every field of dataclass `cls` as a click option under its own name (`ExecutorConfig`)."""
    return [_option(f.name, cls, f) for f in dataclasses.fields(cls)]


def with_options(options: list):
    """Decorate a click command with `options`, in their order on --help."""
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def _option(key: str, cls: type, f: dataclasses.Field):
    spec = flag_of(f)
    kind = _kind(cls, f.name)
    name = key[:-1] if spec.repeat and key.endswith("s") else key
    long = ["--" + n.replace("_", "-") for n in (name, *(a.name for a in spec.aliases if a.convert is None))]
    extra: dict[str, Any] = {"metavar": spec.metavar} if spec.metavar else {}
    if kind is bool:
        decls = [f"{long[0]}/--no-{long[0][2:]}", *long[1:]]
        return click.option(*decls, key, default=None, help=field_help(cls, f.name))
    if spec.choices:
        extra["type"] = click.Choice(spec.choices)
    elif kind in (int, float):
        extra["type"] = kind
    if spec.repeat:
        extra.update(multiple=True, callback=lambda ctx, param, values: _repeated(spec, values))
    return click.option(*([spec.short] if spec.short else []), *long, key, help=field_help(cls, f.name), **extra)


def _alias_option(alias: Alias):
    dashed = "--" + alias.name.replace("_", "-")
    decls = [f"{dashed}/--no-{dashed[2:]}"] if alias.kind is bool else [dashed]
    return click.option(*decls, alias.name, default=None, help=alias.help,
                        **({} if alias.kind is bool else {"type": alias.kind}))


def _repeated(spec: Flag, values: tuple[str, ...]) -> Any:
    if not values:
        return None
    try:
        return spec.parse(values) if spec.parse else list(values)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None


def _kind(cls: type, name: str) -> type | None:
    """bool, int or float for a field of that type (None allowed), else None (text on the command line)."""
    hint = typing.get_type_hints(cls)[name]
    kinds = [t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (bool, int, float) else None


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@with_options(setting_options(BUILD_SCHEMA) + dataclass_options(ExecutorConfig))
@click.option("--allow-code", is_flag=True, help=field_help(BuildConfig, "allow_code"))  # never a setting of a file
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@user_errors
def build(config: str | None, quiet: bool, allow_code: bool, **flags: Any) -> None:
    """Build shards from CONFIG (a YAML file) and/or flags; flags override the file. Paths in the
    file are relative to the file; paths given as flags, to the working directory.

    \b
    Example:
      sftprep build --input fixtures/data/alpaca_en.json --tokenizer fixtures/tokenizers/mistral \\
                    --template alpaca --max-length 1024 --out shards/
    """
    from .api import build as run_build
    from .config import config_from_dict, load_build_yaml

    import signal

    signal.signal(signal.SIGTERM, _raise_interrupt)  # a killed build says so, like Ctrl-C
    data = load_build_yaml(config) if config else {}
    where = {k: flags.pop(k) for k in ("executor", "ray_address", "parts", "parts_dir")}
    where = ExecutorConfig(**{k: v for k, v in where.items() if v is not None})
    cfg = config_from_dict(data, flags, source=config or "config")
    with _progress(quiet) as advance:
        if where.executor == "ray":
            from .scale.executors import build_ray

            manifest = build_ray(cfg, where.parts, where.ray_address, where.parts_dir, allow_code, progress=advance)
        else:
            manifest = run_build(cfg, progress=advance, allow_code=allow_code)
    if not quiet:
        print_summary(manifest)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


class _progress:
    """A rich progress bar over records: done / about how many (`readers.count_records`), rate and
    ETA; a count and rate alone where the inputs do not say how many they hold. Shown only on a
    terminal, and only once records flow (so an early error prints alone)."""

    def __init__(self, quiet: bool) -> None:
        self.bar, self.total = None, None
        self.enabled = not quiet and _console().is_terminal

    def __enter__(self):
        return self if self.enabled else None

    def start(self, total: int | None) -> None:
        self.total = total

    def __call__(self, n: int) -> None:
        if self.bar is None:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            count = [BarColumn(), MofNCompleteColumn(), TextColumn("records")] if self.total else \
                [SpinnerColumn(), TextColumn("{task.completed:,} records")]
            eta = [TextColumn("eta"), TimeRemainingColumn()] if self.total else []
            self.bar = Progress(TextColumn("tokenizing"), *count, _Rate(), TimeElapsedColumn(), *eta,
                                transient=True, console=_console())
            self.bar.start()
            self.task = self.bar.add_task("tokenizing", total=self.total)
        self.bar.advance(self.task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _Rate():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:,.0f}/s" if task.speed else "")

    return Rate()


def _console():
    from rich.console import Console

    return Console(stderr=True)


def print_summary(manifest: dict[str, Any]) -> None:
    """The end-of-build table: what was read, kept, dropped (by reason), tokens and fill."""
    from rich.console import Console
    from rich.table import Table

    t = manifest["totals"]
    out = manifest["config"]["out"]
    table = Table(title=f"sftprep build -> {len(manifest['shards'])} shard(s)", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("records read", f"{t['records_read']:,}")
    template = manifest["template"]
    table.add_row("template", template if isinstance(template, str) else "per source (below)")
    table.add_row("samples kept", f"{t['samples_kept']:,}")
    table.add_row("samples dropped", f"{t['samples_dropped']:,}")
    for reason, n in t["dropped_by_reason"].items():
        table.add_row(f"  {reason}", f"{n:,}")
    table.add_row("samples truncated", f"{t['samples_truncated']:,}")
    table.add_row("tokens", f"{t['tokens']:,}")
    share = t["trained_tokens"] / t["tokens"] if t["tokens"] else 0
    table.add_row("trained tokens", f"{t['trained_tokens']:,} ({share:.1%})")
    table.add_row("rows", f"{t['rows']:,} x {manifest['max_length']}")
    if t["fill_ratio"] is not None:
        table.add_row("fill ratio", f"{t['fill_ratio']:.4f}")
    if "validation" in t:
        v = t["validation"]
        table.add_row("validation split", f"{v['samples']:,} samples, {v['trained_tokens']:,} trained tokens")
    Console().print(table)
    if manifest.get("config", {}).get("sources"):
        click.echo("sources (share of trained tokens): " + ", ".join(
            f"{s['name']} {s['trained_share']:.1%} ({s['selected']:,} samples"
            + (f", {s['validation']:,} validation" if s.get("validation") else "") + ")"
            for s in manifest.get("sources", [])))
        if isinstance(template, dict):
            click.echo("templates: " + ", ".join(f"{k}: {v}" for k, v in template.items()))
    if manifest.get("cache"):
        click.echo(f"sample cache: {manifest['cache']['summary']} ({manifest['cache']['folder']})")
    for warning in manifest.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    if t["samples_dropped"]:
        click.echo(f"dropped samples are listed in {out}/{manifest['rejects_file']}")
    click.echo(f"shards and manifest in {out}/  (next: sftprep inspect {out} --row 0, or sfttrain run {out} "
               "--model MODEL)")


def _out_console(color: bool | None = None):
    """A rich console on stdout: colour when asked or on a terminal; wide when piped."""
    from rich.console import Console

    if color:
        return Console(force_terminal=True, color_system="standard", highlight=False)
    tty = sys.stdout.isatty()
    return Console(highlight=False, width=None if tty else 120)


@main.command("merge")
@click.argument("part_dirs", metavar="PART_DIRS...", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", required=True, help=BUILD_SCHEMA.help("out"))
@click.option("--overwrite", is_flag=True, help=BUILD_SCHEMA.help("overwrite"))
@click.option("-q", "--quiet", is_flag=True, help="No summary.")
@user_errors
def merge_(part_dirs: tuple[str, ...], out: str, overwrite: bool, quiet: bool) -> None:
    """Join the parts of a build (`sftprep build --part I/N`, I = 0..N-1) into one build: their samples
    packed again over all parts, not tokenized again; the same shards as one build of all the data.

    \b
      sftprep merge parts/part-* --out shards/
    """
    from .scale.merge import merge

    manifest = merge(list(part_dirs), out, overwrite=overwrite)
    if not quiet:
        print_summary(manifest)


@main.command("inspect")
@click.argument("build_dir", metavar="DIR", type=click.Path())
@click.option("--row", type=int, help="Packed row to show (0-based over all shards; default 0).")
@click.option("--sample", "sample_id", type=int, help="Sample id to show (its index in the input).")
@click.option("--source", "source_name", help="Show the first train samples of this recipe source (its `name`).")
@click.option("--count", type=int, default=3, show_default=True, help="Samples to show with --source.")
@click.option("--tokens", is_flag=True, help="Token by token: position, id, piece, label.")
@click.option("--plain", is_flag=True, help="No colour: trained text inside ⟦…⟧ (the default when piped).")
@click.option("--color", is_flag=True, help="Colour even when piped (e.g. into `less -R`).")
@click.option("-t", "--tokenizer", help="Decode with this tokenizer folder [the copy in BUILD_DIR/tokenizer/].")
@user_errors
def inspect_(build_dir: str, row: int | None, sample_id: int | None, source_name: str | None, count: int,
             tokens: bool, plain: bool, color: bool, tokenizer: str | None) -> None:
    """Show a packed row, one sample, or a recipe source's samples decoded, trained text marked, with each
    sample's source.

    \b
      sftprep inspect shards/ --row 12
      sftprep inspect shards/ --sample 345 --tokens
      sftprep inspect shards/ --source glaive --count 5
    """
    from .inspect.decode import load_build_tokenizer
    from .inspect.folder import read_build
    from .inspect.view import format_plain, print_rich, view_row, view_sample, view_source

    if sum(x is not None for x in (row, sample_id, source_name)) > 1:
        raise ConfigError("give one of --row, --sample and --source")
    folder, manifest = read_build(build_dir)
    load_tok = lambda: load_build_tokenizer(folder, manifest, tokenizer)  # noqa: E731 (only once the row exists)
    if source_name is not None:
        blocks = view_source(folder, manifest, load_tok, source_name, count, tokens)
    elif sample_id is not None:
        blocks = view_sample(folder, manifest, load_tok, sample_id, tokens)
    else:
        blocks = view_row(folder, manifest, load_tok, row or 0, tokens)
    if color or (not plain and sys.stdout.isatty()):
        print_rich(blocks, _out_console(color=True if color else None))
    else:
        click.echo(format_plain(blocks), nl=False)


@main.command()
@click.argument("build_dir", metavar="DIR", type=click.Path())
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also draw the histograms into this picture (e.g. stats.png).")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@user_errors
def stats(build_dir: str, plot_path: str | None, as_json: bool) -> None:
    """Totals and distributions: sample lengths, trained tokens, fill, drops, per input file.

    \b
      sftprep stats shards/ --plot stats.png
    """
    import json

    from .inspect.stats import collect, plot, print_stats, summarize

    collected = collect(build_dir)
    result = summarize(collected)
    if as_json:
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print_stats(result, _out_console())
    if plot_path:
        out = plot(collected, plot_path)
        click.echo(f"histograms written to {out}", err=as_json)


@main.command()
@click.argument("build_dir", metavar="DIR", type=click.Path())
@click.option("--max-errors", type=int, default=20, show_default=True, help="Violations to list.")
@user_errors
def verify(build_dir: str, max_errors: int) -> None:
    """Re-check checksums and every invariant of the shard contract; exit 1 when one fails.

    \b
      sftprep verify shards/ && sfttrain run shards/ ...
    """
    from .inspect.verify import format_report, verify as run_verify

    report = run_verify(build_dir)
    click.echo(format_report(report, max_errors), nl=False)
    if not report.ok:
        sys.exit(1)


@main.command("diff")
@click.argument("build_a", metavar="A", type=click.Path())
@click.argument("build_b", metavar="B", type=click.Path())
@click.option("--show", type=int, default=3, show_default=True,
              help="Changed samples to show decoded (unified diff).")
@click.option("-t", "--tokenizer", help="Decode with this tokenizer folder [the copy in each build's tokenizer/].")
@user_errors
def diff_(build_a: str, build_b: str, show: int, tokenizer: str | None) -> None:
    """What changed from build A to build B: settings, tokenizer, totals, and samples (decoded).

    \b
      sftprep diff shards-alpaca/ shards-chatml/ --show 5
    """
    from .inspect.diff import diff, format_diff

    click.echo(format_diff(diff(build_a, build_b), show, tokenizer), nl=False)


if __name__ == "__main__":
    main()


@main.group("cache")
def cache_() -> None:
    """The sample cache: each input file's tokenized samples, reused by a build that changes only what does
    not decide them (max_length, truncation, packing, seed, mixing, split, dedup, other inputs).

    \b
      sftprep cache list
      sftprep cache prune --max-size 20GB
      sftprep cache clear
    """


_CACHE_DIR = click.option("--cache-dir", help=BUILD_SCHEMA.help("cache_dir"))


@cache_.command("list")
@_CACHE_DIR
@user_errors
def cache_list(cache_dir: str | None) -> None:
    """Every entry: the input it was made from, its tokens, size on disk and last use (oldest first)."""
    import datetime

    from .tokenize.cache import default_dir, list_entries

    folder = Path(cache_dir).expanduser() if cache_dir else default_dir()
    listed = sorted(list_entries(folder), key=lambda e: e["used"])
    for e in listed:
        used = datetime.datetime.fromtimestamp(e["used"]).strftime("%Y-%m-%d %H:%M")
        click.echo(f"{e['key']}  {used}  {_size(e['size']):>10}  {e['tokens']:>12,} tokens  {e['input']}")
    total = sum(e["size"] for e in listed)
    click.echo(f"{len(listed)} entries, {_size(total)} in {folder}")


def _size(n: int) -> str:
    """1.5 GiB, 12.0 MiB, 340 KiB, 812 B."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@cache_.command("prune")
@_CACHE_DIR
@click.option("--max-size", required=True, help="Keep at most this much (e.g. 20GB, 512MB): least recently used go first.")
@user_errors
def cache_prune(cache_dir: str | None, max_size: str) -> None:
    """Remove entries, least recently used first, until the cache holds at most --max-size."""
    from .tokenize.cache import Cache, default_dir, list_entries, parse_size

    folder = Path(cache_dir).expanduser() if cache_dir else default_dir()
    removed = Cache(folder).prune(parse_size(max_size))
    left = sum(e["size"] for e in list_entries(folder))
    click.echo(f"removed {len(removed)} entries; {_size(left)} left in {folder}")


@cache_.command("clear")
@_CACHE_DIR
@user_errors
def cache_clear(cache_dir: str | None) -> None:
    """Remove every entry."""
    from .tokenize.cache import clear, default_dir

    folder = Path(cache_dir).expanduser() if cache_dir else default_dir()
    click.echo(f"removed {clear(folder)} files from {folder}")
