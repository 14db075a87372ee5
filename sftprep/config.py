"""Build configuration: frozen dataclasses, one per stage, nested under `BuildConfig`.

The YAML file mirrors the tree (``read: {inputs: [...]}``, ``template: {name: chatml}``, ...), and
top-level shortcuts name the commonest keys (``inputs``, ``tokenizer``, ``max_length``, ...).
Unknown keys are errors, with the closest known key suggested. Every problem found is collected
and raised once as a `ConfigError` that names the YAML key / CLI flag to fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError
from .pack.packing import MODES
from .scale.parts import check_part, parse_part

FORMATS = ("auto", "text", "prompt_completion", "messages", "sharegpt", "alpaca")
TRAIN_ON = ("auto", "completion", "assistant", "last", "all")
TRUNCATION = ("keep_start", "keep_end", "drop")
TRUNCATION_UNITS = ("tokens", "turns")
PACKING = tuple(MODES)  # the packing modes (`packing.MODES`)
ON_ERROR = ("skip", "fail")
DEDUP = ("auto", "exact", "none")
MIX_BY = ("samples", "tokens")
MAX_LENGTH = 1 << 20  # 1,048,576 tokens: longer than any model's context today


@dataclass(frozen=True)
class Alias:
    """Another tool's name for a setting (TRL's), declared next to the field it sets."""

    name: str
    convert: Callable[[Any], Any] | None = None
    """How its value maps onto the field; None: as it is (then it is one more name of the same flag)."""
    kind: type = bool
    """With `convert`: the type of its own flag (a bool flag has a --no- form)."""
    help: str = ""


@dataclass(frozen=True)
class Flag:
    """How a setting reads on the command line beyond what its field says (name, type, default, docstring):
    `sftprep build` and `sfttrain run` make their options from the config dataclasses (`sftprep.cli`)."""

    short: str | None = None
    """A one-letter name too (-i)."""
    choices: tuple[str, ...] | None = None
    """The values the flag takes (checked by the command line, named in --help)."""
    aliases: tuple[Alias, ...] = ()
    repeat: bool = False
    """Given once per value (named in the singular: --input for `inputs`); `parse` turns the values into
    the setting, else they are a list."""
    parse: Callable[[tuple[str, ...]], Any] | None = None
    metavar: str | None = None


def flag(**details: Any) -> dict[str, Flag]:
    """A field's `metadata` saying how it reads on the command line (`Flag`)."""
    return {"flag": Flag(**details)}


def flag_of(f: dataclasses.Field) -> Flag:
    return f.metadata.get("flag") or Flag()


def _pairs(values: tuple[str, ...]) -> dict[str, str] | None:
    """--field OURS=YOURS ... -> {ours: yours}."""
    pairs = {}
    for v in values:
        if "=" not in v:
            raise ConfigError(f"--field {v!r} is not OURS=YOURS, e.g. --field prompt=question")
        k, _, theirs = v.partition("=")
        pairs[k.strip()] = theirs.strip()
    return pairs or None


def _kwargs(values: tuple[str, ...]) -> dict[str, Any] | None:
    """--template-kwarg KEY=VALUE ... -> {key: value read as YAML}."""
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--template-kwarg expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _kwarg_value(key.strip(), value)
    return out or None


def _kwarg_value(key: str, text: str) -> Any:
    import yaml

    try:
        return yaml_value(text, f"--template-kwarg {key}")
    except yaml.YAMLError as e:  # e.g. a `!!python/...` tag: the safe loader refuses it
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise ConfigError(f"--template-kwarg {key}: not a plain YAML value ({problem}); give text, a number, "
                          "true/false, a list or a mapping") from None


@dataclass(frozen=True)
class ReadConfig:
    """Where records come from and how they become conversations."""

    inputs: tuple[str, ...] = field(default=(), metadata=flag(short="-i", repeat=True))
    """Input files, folders or glob patterns (repeatable): JSONL, JSON, CSV/TSV, Parquet, Arrow/Feather or a
    `datasets.save_to_disk` folder (--input). A path that exists is read as it is, even with `*?[` in its name;
    `glob:PATTERN` always expands."""
    format: str = field(default="auto", metadata=flag(choices=FORMATS))
    """Record format: auto, text, prompt_completion, messages, sharegpt, alpaca (--format)."""
    fields: Mapping[str, str] = field(default_factory=dict, metadata=flag(repeat=True, parse=_pairs, aliases=(
        Alias("dataset_text_field", lambda v: {"text": v}, str, "TRL's name: the field holding the text (--field "
              "text=NAME)."),)))
    """Map our field names to yours: OURS=YOURS, e.g. --field prompt=question --field completion=answer
    ({prompt: question, completion: answer} in YAML)."""
    num_samples: int | None = field(default=None, metadata=flag(short="-n"))
    """Read only the first N records (preview a build) (--num-samples)."""
    on_error: str = field(default="skip", metadata=flag(choices=ON_ERROR))
    """What a bad record does: skip (listed in rejects.jsonl) or fail (stop, exit 2) (--on-error)."""
    max_reject_ratio: float = 0.5
    """Stop the build when more than this share of records is rejected (--max-reject-ratio)."""
    max_record_bytes: int = 64 << 20
    """The longest record in bytes (a JSON Lines line, a JSON array item or file, a CSV row); a longer one is rejected
    as `too_large` without being read into memory (--max-record-bytes)."""
    max_gzip_ratio: float = 100.0
    """A `.gz` input may inflate to this many times its compressed size (past its first 64 MiB); more stops
    the build as a gzip bomb (--max-gzip-ratio)."""
    max_blank_lines: int = 1_000_000
    """Empty lines in a row a JSON Lines file may hold; more stops the build there (--max-blank-lines)."""


@dataclass(frozen=True)
class TemplateConfig:
    """How a conversation becomes one string plus the character spans that are trained."""

    name: str | None = None
    """Preset: chatml, alpaca, llama2, mistral, vicuna, qa; `tokenizer` for the tokenizer's own chat_template
    (the default for chat records when it has one); `module:function` for a Python callable; omit for text /
    prompt+completion as they are (--template)."""
    prompt: str | None = None
    """Format string over record fields for the prompt, e.g. '### Q: {question}\\n' (--prompt)."""
    completion: str | None = None
    """Format string over record fields for the trained part, e.g. '{answer}' (--completion)."""
    system: str | None = None
    """System prompt used when a record has none (--system)."""
    response_template: str | None = None
    """TRL-style: train only on text after this marker, matched on characters (--response-template)."""
    instruction_template: str | None = None
    """TRL-style: with response_template, a marker that starts an untrained turn (--instruction-template)."""
    kwargs: Mapping[str, Any] = field(default_factory=dict, metadata=flag(repeat=True, parse=_kwargs))
    """A variable for a Jinja chat template, K=V with V read as YAML, e.g. --template-kwarg enable_thinking=false
    (repeatable; {enable_thinking: false} in YAML)."""
    stop_tokens: tuple[str, ...] = field(default=(), metadata=flag(repeat=True))
    """Another string that ends an assistant turn, besides EOS and generation_config.json's eos_token_id list
    (repeatable) (--stop-token)."""
    chat_template: str | None = field(default=None, metadata=flag(aliases=(Alias("chat_template_path"),)))
    """A Jinja chat template file used instead of the tokenizer's own (it implies --template tokenizer) and
    copied into the build's tokenizer/ folder, so sfttrain and the saved adapter carry it (--chat-template;
    TRL's `chat_template_path`)."""
    max_render_seconds: float = 10.0
    """A chat template's render may take this long; a longer one rejects its record as `template_limit`
    (--max-render-seconds)."""
    max_render_chars: int = 64 << 20
    """The most characters a chat template's render may write, or hold in one string or list it builds; more
    rejects its record as `template_limit` (--max-render-chars)."""

    def __post_init__(self) -> None:
        if self.chat_template and self.name is None:  # the file stands in for the tokenizer's own template
            object.__setattr__(self, "name", "tokenizer")


@dataclass(frozen=True)
class TokenizeConfig:
    """Tokenizer, labels and truncation."""

    tokenizer: str | None = field(default=None, metadata=flag(short="-t"))
    """Local tokenizer folder (with tokenizer.json) (--tokenizer)."""
    max_length: int = field(default=2048, metadata=flag(aliases=(Alias("max_seq_length"),)))
    """Tokens per training sequence (--max-length)."""
    truncation: str = field(default="keep_start", metadata=flag(choices=TRUNCATION, aliases=(Alias("truncation_mode"),)))
    """Samples longer than max_length: keep_start, keep_end or drop (--truncation)."""
    truncation_unit: str = field(default="tokens", metadata=flag(choices=TRUNCATION_UNITS))
    """What keep_start/keep_end cut for chat records: tokens (mid-turn) or turns (whole exchanges dropped
    from the end / from the start after the system message, so no kept answer loses its end token)
    (--truncation-unit)."""
    train_on: str = field(default="auto", metadata=flag(choices=TRAIN_ON, aliases=(
        Alias("completion_only_loss", lambda v: "completion" if v else "all", bool,
              "TRL's name: --train-on completion (or all with --no-...)."),
        Alias("assistant_only_loss", lambda v: "assistant" if v else "all", bool,
              "TRL's name: --train-on assistant (or all with --no-...)."))))
    """Which tokens are trained: completion, assistant, last, all; auto: all for text, completion for
    prompt/completion and alpaca, assistant turns for chat (--train-on)."""


@dataclass(frozen=True)
class PackConfig:
    """How samples become rows, and rows become shards."""

    mode: str = field(default="bfd", metadata=flag(choices=(*PACKING, "true", "false")))
    """bfd (best-fit-decreasing, no sample split), wrapped (fixed chunks) or none; TRL's true/false mean
    bfd/none (--packing)."""
    shard_size: int = 10_000
    """Rows per shard file at most (--shard-size)."""
    seed: int = 0
    """Seed of the row order written to the shards (--seed)."""


def _source_pairs(values: tuple[str, ...]) -> tuple[tuple[str, str], ...] | None:
    """--source NAME=GLOB ... -> ((name, glob), ...): a source's inputs (its other settings: YAML `sources:`)."""
    pairs = []
    for v in values:
        name, sep, pattern = v.partition("=")
        if not sep or not name.strip() or not pattern.strip():
            raise ConfigError(f"--source {v!r} is not NAME=GLOB, e.g. --source alpaca='data/alpaca*.jsonl'")
        pairs.append((name.strip(), pattern.strip()))
    return tuple(pairs) or None


@dataclass(frozen=True)
class MixConfig:
    """How the sources' samples become the build: duplicates, benchmark leakage, the held-out split, weights."""

    dedup: str = field(default="auto", metadata=flag(choices=DEDUP))
    """exact: a sample with the same token ids and labels as an earlier one (in any source) is kept once, the
    others listed in rejects.jsonl as `duplicate`; none: keep every copy; auto: exact for a recipe (a build
    with sources), none for a build of plain inputs, whose shards stay as they were (--dedup)."""
    mix_by: str = field(default="samples", metadata=flag(choices=MIX_BY))
    """What a source's `proportion` is a share of: the build's samples, or its tokens (--mix-by)."""
    eval_fraction: float | None = None
    """Hold out about this share of every source's samples (each sample by its own content hash, so it lands
    in the same split whatever the file order, parts or other sources) as the validation split,
    shard-validation-*.arrow (YAML `eval: {fraction: 0.01}`) (--eval-fraction)."""
    eval_samples: int | None = None
    """Hold out exactly this many samples (those of smallest content hash) as the validation split (YAML
    `eval: {samples: 500}`) (--eval-samples)."""
    decontaminate: tuple[str, ...] = field(default=(), metadata=flag(repeat=True))
    """Benchmark or eval files (JSON Lines, JSON, CSV, Parquet: any record format, or plain text): a training
    sample that shares a word n-gram with any of their items is dropped as `contaminated` (repeatable)
    (--decontaminate)."""
    decontaminate_ngram: int = 13
    """Words per n-gram for --decontaminate, after case-folding and dropping punctuation (13, as GPT-3 and
    Tulu 3) (--decontaminate-ngram)."""


SOURCE_MIX = ("choose", "repeat", "proportion")
"""A source's mixing keys: at most one per source."""
SOURCE_SETTINGS = ("format", "fields", "on_error", "template", "prompt", "completion", "system", "response_template",
                   "instruction_template", "template_kwargs", "stop_tokens", "chat_template", "train_on", "truncation",
                   "truncation_unit")
"""What a source may set for itself (as the build's YAML keys); the rest (tokenizer, max_length, packing...)
is build-wide."""
TEMPLATE_CHOICE = ("name", "prompt", "completion", "response_template", "instruction_template", "chat_template")
"""The template settings that choose how text is made: a source that sets one inherits none of the build's."""


@dataclass(frozen=True)
class SourceConfig:
    """One source of a recipe (a `sources:` item): its records, what it sets differently from the build, its
    weight and its held-out share."""

    name: str
    inputs: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    """Its own `format`, `fields`, `template` (a name, or a mapping), `train_on`, `truncation`...: the build's
    YAML keys; what it does not set comes from the build."""
    choose: int | None = None
    """Exactly this many samples: a seeded subset, or the whole source repeated plus a subset."""
    repeat: float | None = None
    """Every sample this many times; a fraction takes that share of the samples once more (2.5: all twice,
    half of them a third time)."""
    proportion: float | None = None
    """This share of the build's samples (or tokens, with `mix_by: tokens`)."""
    eval_fraction: float | None = None
    """This source's validation share (its `eval: {fraction: F}`), instead of the build's."""
    eval_samples: int | None = None
    """This source's validation samples (its `eval: {samples: N}`), instead of the build's."""

    @property
    def mixing(self) -> tuple[str, float] | None:
        """(key, value) of its mixing setting, None when it is taken as it is."""
        return next(((k, getattr(self, k)) for k in SOURCE_MIX if getattr(self, k) is not None), None)


@dataclass(frozen=True)
class Source:
    """A source as the build reads it: the build's sections with the source's own settings applied."""

    name: str
    read: ReadConfig
    template: TemplateConfig
    tokenize: TokenizeConfig
    spec: SourceConfig | None = None
    """None: the build has no `sources:` (its inputs are one source, `DEFAULT_SOURCE`)."""


DEFAULT_SOURCE = "default"


@dataclass(frozen=True)
class BuildConfig:
    """Everything `sftprep build` needs; saved whole in the manifest."""

    read: ReadConfig = field(default_factory=ReadConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    sources: tuple[SourceConfig, ...] = field(default=(), metadata=flag(repeat=True, parse=_source_pairs,
                                                                         metavar="NAME=GLOB"))
    """A recipe: named sources, each with its own inputs (--source NAME=GLOB, repeatable); their own format,
    template, train_on, truncation, weight (choose / repeat / proportion) and eval share go in the YAML
    `sources:` list."""
    out: str | None = field(default=None, metadata=flag(short="-o"))
    """Output folder for shards and manifest (--out)."""
    workers: int = 1
    """Processes that render and tokenize in parallel (--workers)."""
    overwrite: bool = False
    """Replace an output folder that holds a different build (--overwrite)."""
    allow_code: bool = False
    """Let a `module:function` template import and run Python code: a config naming code is code, so only for
    configs you trust; `build(config, allow_code=True)` from Python, never from a YAML file, which is data
    (--allow-code)."""
    cache: bool = True
    """Keep each input file's tokenized samples in the sample cache and reuse them when a later build changes
    only what does not decide them (max_length, truncation, packing, seed, mixing, split, dedup, other
    inputs): the same shards, in seconds (--cache/--no-cache)."""
    cache_dir: str | None = None
    """The sample cache's folder; default $SFTPREP_CACHE, else the user cache folder (~/.cache/sftprep)
    (--cache-dir)."""
    cache_max_size: str = "20GB"
    """The most the sample cache holds; least recently used entries go first (--cache-max-size)."""
    part: tuple[int, int] | None = None
    """Build only part I of N, counting from 0: the records whose index in the whole input is I modulo N, e.g.
    2/8 (YAML `part: 2/8`); then `sftprep merge` the N part folders into the whole build (--part)."""

    def __post_init__(self) -> None:
        problems = _check(self)
        if problems:
            raise ConfigError.listing("build config", problems)

    @property
    def dedups(self) -> bool:
        """Whether duplicates are dropped (`MixConfig.dedup`)."""
        return self.mix.dedup == "exact" or (self.mix.dedup == "auto" and bool(self.sources))

    def recipe(self) -> list[Source]:
        """The sources a build reads, in order: its `sources`, or its inputs as one source."""
        if not self.sources:
            return [Source(DEFAULT_SOURCE, self.read, self.template, self.tokenize)]
        return [resolve_source(self, s) for s in self.sources]

    def to_dict(self) -> dict[str, Any]:
        d = to_plain(dataclasses.asdict(self))
        if d["part"] is None:  # a whole build's manifest (and build id) as before parts existed
            del d["part"]
        return d


def _check(c: BuildConfig) -> list[str]:
    p: list[str] = []

    def choice(value: str, allowed: tuple[str, ...], key: str) -> None:
        check_choice(p, f"{key}=", value, allowed)

    if not c.read.inputs and not c.sources:
        p.append("no input: give --input FILE (or `inputs:` in the YAML), or sources (--source NAME=GLOB)")
    if c.read.inputs and c.sources:
        p.append("give inputs per source (`sources: [{name: ..., inputs: [...]}]`, --source NAME=GLOB), or "
                 "--input without sources, not both")
    if not c.tokenize.tokenizer:
        p.append("no tokenizer: give --tokenizer PATH (a local folder with tokenizer.json)")
    if not c.out:
        p.append("no output folder: give --out DIR")
    p += _check_sections(c.read, c.template, c.tokenize)
    choice(c.pack.mode, tuple(MODES), "packing")
    if c.tokenize.max_length < 8:
        p.append(f"max_length={c.tokenize.max_length} is too small (at least 8 tokens)")
    if c.tokenize.max_length > MAX_LENGTH:
        p.append(f"max_length={c.tokenize.max_length:,} is larger than any model trains on (at most "
                 f"{MAX_LENGTH:,} tokens; every packed row is max_length tokens wide)")
    if c.pack.shard_size < 1:
        p.append(f"shard_size={c.pack.shard_size} must be at least 1 row")
    if c.workers < 1:
        p.append(f"workers={c.workers} must be at least 1")
    if c.part is not None:
        p += check_part(c.part, c.pack.mode)
    p += _check_mix(c)
    if c.read.num_samples is not None and c.read.num_samples < 1:
        p.append(f"num_samples={c.read.num_samples} must be at least 1")
    if not 0 <= c.read.max_reject_ratio <= 1:
        p.append(f"max_reject_ratio={c.read.max_reject_ratio} must be between 0 and 1")
    for section, key in (("read", "max_record_bytes"), ("read", "max_gzip_ratio"), ("read", "max_blank_lines"),
                         ("template", "max_render_chars")):
        if getattr(getattr(c, section), key) < 1:
            p.append(f"{key}={getattr(getattr(c, section), key)} must be at least 1")
    if c.template.max_render_seconds <= 0:
        p.append(f"max_render_seconds={c.template.max_render_seconds} must be more than 0")
    return p


def _check_sections(read: ReadConfig, template: TemplateConfig, tokenize: TokenizeConfig) -> list[str]:
    """Problems in the settings a source may set for itself (the build's, or one source's)."""
    p: list[str] = []
    check_choice(p, "format=", read.format, FORMATS)
    check_choice(p, "on_error=", read.on_error, ON_ERROR)
    check_choice(p, "truncation=", tokenize.truncation, TRUNCATION)
    check_choice(p, "truncation_unit=", tokenize.truncation_unit, TRUNCATION_UNITS)
    check_choice(p, "train_on=", tokenize.train_on, TRAIN_ON)
    t = template
    if t.chat_template and t.name != "tokenizer":
        p.append(f"chat_template={t.chat_template!r} (--chat-template) is a Jinja chat template, used as "
                 f"`--template tokenizer` uses the tokenizer's own: drop template={t.name!r} or set it to "
                 "tokenizer")
    if (t.prompt is None) != (t.completion is None):
        p.append("template.prompt and template.completion go together: give both (--prompt and --completion)")
    if t.prompt is not None and t.name is not None:
        p.append("give either a template name (--template) or a prompt/completion format pair, not both")
    if t.instruction_template and not t.response_template:
        p.append("instruction_template needs response_template too (--response-template)")
    if t.response_template and t.name is not None and t.name != "none":
        p.append("response_template applies to text you render yourself; it cannot be combined with "
                 f"--template {t.name} (the template already knows what the assistant says)")
    return p


def _check_mix(c: BuildConfig) -> list[str]:
    """Problems in the recipe: mixing, the held-out split, dedup, decontamination, and each source's own
    settings (named by source)."""
    m, p = c.mix, []
    check_choice(p, "dedup=", m.dedup, DEDUP)
    check_choice(p, "mix_by=", m.mix_by, MIX_BY)
    p += _check_eval(m.eval_fraction, m.eval_samples, "eval")
    if m.decontaminate_ngram < 1:
        p.append(f"decontaminate_ngram={m.decontaminate_ngram} must be at least 1 word")
    names = [s.name for s in c.sources]
    for name in sorted({n for n in names if names.count(n) > 1}):
        p.append(f"source {name!r} is listed twice: give each source its own name")
    shares = [s.proportion for s in c.sources if s.proportion is not None]
    for s in c.sources:
        where = f"source {s.name!r}"
        if not s.inputs:
            p.append(f"{where}: no inputs: give `inputs: [FILE, ...]` (or --source {s.name}=GLOB)")
        set_keys = [k for k in SOURCE_MIX if getattr(s, k) is not None]
        if len(set_keys) > 1:
            p.append(f"{where}: {' and '.join(set_keys)} both set: give at most one of choose, repeat, proportion")
        if s.choose is not None and s.choose < 1:
            p.append(f"{where}: choose={s.choose} must be at least 1 sample")
        if s.repeat is not None and s.repeat <= 0:
            p.append(f"{where}: repeat={s.repeat} must be more than 0")
        if s.proportion is not None and not 0 < s.proportion <= 1:
            p.append(f"{where}: proportion={s.proportion} must be more than 0 and at most 1")
        p += [f"{where}: {x}" for x in _check_eval(s.eval_fraction, s.eval_samples, "eval")]
        try:
            r = resolve_source(c, s)
        except ConfigError as e:
            p.append(f"{where}: {e}")
            continue
        p += [f"{where}: {x}" for x in _check_sections(r.read, r.template, r.tokenize)]
    if sum(shares) > 1 + 1e-9:
        listed = ", ".join(f"{s.name} {s.proportion:g}" for s in c.sources if s.proportion is not None)
        p.append(f"the sources' proportions sum to {sum(shares):g} ({listed}): they are shares of one build, at "
                 "most 1 in all")
    elif shares and len(shares) == len(c.sources) and abs(sum(shares) - 1) > 1e-9:
        p.append(f"every source has a proportion, and they sum to {sum(shares):g}: they must sum to 1 (or take "
                 "the proportion off a source to let it fill the rest)")
    elif shares and abs(sum(shares) - 1) <= 1e-9 and len(shares) < len(c.sources):
        rest = ", ".join(s.name for s in c.sources if s.proportion is None)
        p.append(f"the proportions sum to 1, which leaves no share for {rest}: lower them, or give {rest} a "
                 "proportion too")
    return p


def _check_eval(fraction: float | None, samples: int | None, key: str) -> list[str]:
    p = []
    if fraction is not None and samples is not None:
        p.append(f"{key}: give fraction or samples, not both")
    if fraction is not None and not 0 < fraction < 1:
        p.append(f"{key}.fraction={fraction} must be between 0 and 1 (e.g. 0.01)")
    if samples is not None and samples < 1:
        p.append(f"{key}.samples={samples} must be at least 1")
    return p


def resolve_source(c: BuildConfig, s: SourceConfig) -> Source:
    """The build's read / template / tokenize sections with source `s`'s own settings applied: a source that
    sets any of `TEMPLATE_CHOICE` inherits none of the build's (a prompt/completion source in a chat build)."""
    sections, _ = read_tree(BUILD_SCHEMA, s.settings, None, f"source {s.name!r}")
    _convert(sections)
    template = c.template
    if any(k in sections["template"] for k in TEMPLATE_CHOICE):
        template = dataclasses.replace(template, **{k: None for k in TEMPLATE_CHOICE})
    try:
        return Source(s.name, dataclasses.replace(c.read, **sections["read"], inputs=s.inputs),
                      dataclasses.replace(template, **sections["template"]),
                      dataclasses.replace(c.tokenize, **sections["tokenize"]), s)
    except TypeError as e:
        raise ConfigError(f"invalid setting: {e}") from None


def sources_from(value: Any, where: str) -> tuple[SourceConfig, ...]:
    """YAML `sources:` (a list of mappings) as `SourceConfig`s.

    Raises:
        ConfigError: listing every key that is unknown, build-wide, or of the wrong type, by source.
    """
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: `sources` must be a list of sources (`- name: ...`), got {type(value).__name__}")
    out, p = [], []
    for k, item in enumerate(value):
        if not isinstance(item, Mapping):
            p.append(f"{where}: sources[{k}] must be a mapping (name, inputs, ...), got {type(item).__name__}")
            continue
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            p.append(f"{where}: sources[{k}] has no `name` (each source is named: in the manifest, stats, rejects)")
            continue
        spec: dict[str, Any] = {"name": name.strip(), "settings": {}}
        for key, v in item.items():
            key = str(key)
            if key == "name":
                continue
            if key in ("inputs", "input"):
                spec["inputs"] = as_tuple(v)
            elif key == "eval":
                if not isinstance(v, Mapping) or set(v) - {"fraction", "samples"}:
                    p.append(f"{where}: source {name!r}: `eval` must be {{fraction: F}} or {{samples: N}}")
                    continue
                spec.update({f"eval_{e}": x for e, x in v.items()})
            elif key in (*SOURCE_MIX, "eval_fraction", "eval_samples"):  # the last two: as a manifest saves them
                spec[key] = v
            elif key == "settings" and isinstance(v, Mapping):  # a manifest's config (`to_dict`)
                spec["settings"].update(v)
            elif key in SOURCE_SETTINGS or BUILD_SCHEMA.aliases.get(key, ("",))[0] in SOURCE_SETTINGS:
                spec["settings"][key] = v
            elif BUILD_SCHEMA.target(key) is not None or key in BUILD_SCHEMA.sections or key in ("mix", "sources"):
                p.append(f"{where}: source {name!r}: `{key}` is build-wide: set it at the top level of the config")
            else:
                known = ["name", "inputs", "eval", *SOURCE_MIX, *SOURCE_SETTINGS]
                p.append(f"{where}: source {name!r}: unknown key `{key}`{did_you_mean(key, known)}")
        for key in ("choose", "repeat", "proportion", "eval_fraction", "eval_samples"):
            problem = type_problem(SourceConfig, key, spec.get(key))
            if problem:
                p.append(f"{where}: source {name!r}: `{key.replace('eval_', 'eval.')}` {problem}")
        out.append(SourceConfig(**spec))
    if p:
        raise ConfigError.listing("build config", p)
    return tuple(out)


def _merge_sources(given: tuple[SourceConfig, ...], pairs: tuple[tuple[str, str], ...]) -> tuple[SourceConfig, ...]:
    """--source NAME=GLOB on top of the YAML's sources: a named one gets these inputs; a new name, a new source."""
    by_name = {s.name: s for s in given}
    added: dict[str, list[str]] = {}
    for name, pattern in pairs:
        added.setdefault(name, []).append(pattern)
    out = [dataclasses.replace(s, inputs=tuple(added[s.name])) if s.name in added else s for s in given]
    return tuple(out) + tuple(SourceConfig(n, tuple(g)) for n, g in added.items() if n not in by_name)


EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorConfig:
    """Where `sftprep build` runs: in this process, or as parts on Ray tasks merged at the end. Command-line
    only (`sftprep.scale.executors.build_ray` from Python): it never changes the shards, so no manifest holds it."""

    executor: str = "local"
    """local (this process, with --workers) or ray: the build as parts on Ray tasks (this machine, or
    --ray-address), then merged into --out (--executor)."""
    ray_address: str | None = None
    """Ray cluster to join with --executor ray, e.g. auto or ray://head:10001 (--ray-address)."""
    parts: int | None = None
    """Parts for --executor ray; default: the cluster's CPUs (--parts)."""
    parts_dir: str | None = None
    """Where --executor ray writes the parts; default OUT/.parts, removed after the merge (a folder given here
    is kept); on a cluster, storage every node sees (--parts-dir)."""

    def __post_init__(self) -> None:
        p: list[str] = []
        check_choice(p, "executor=", self.executor, EXECUTORS)
        if self.executor != "ray" and (self.ray_address, self.parts, self.parts_dir) != (None, None, None):
            p.append("--ray-address, --parts and --parts-dir go with --executor ray")
        if self.parts is not None and self.parts < 1:
            p.append(f"parts={self.parts} must be at least 1")
        if p:
            raise ConfigError.listing("build config", p)


VOLATILE = ("out", "workers", "overwrite", "cache", "cache_dir", "cache_max_size")
"""Settings that never change the shards: left out of a build's identity and of `sftprep diff`."""


def shard_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """A `BuildConfig.to_dict()` (as saved in a manifest) without the `VOLATILE` settings."""
    return {k: v for k, v in config.items() if k not in VOLATILE}


def check_choice(problems: list[str], label: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Add `label` + value "is not one of ..." (with the closest allowed value) to `problems`."""
    if value not in allowed:
        problems.append(f"{label}{value!r} is not one of {', '.join(allowed)}{did_you_mean(value, allowed)}")


def did_you_mean(value: str, known: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(str(value), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def to_plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    return x


# Top-level YAML shortcuts and CLI override keys: name -> (section, field).
SHORTCUTS: dict[str, tuple[str | None, str]] = {
    "inputs": ("read", "inputs"),
    "input": ("read", "inputs"),
    "format": ("read", "format"),
    "fields": ("read", "fields"),
    "num_samples": ("read", "num_samples"),
    "on_error": ("read", "on_error"),
    "max_reject_ratio": ("read", "max_reject_ratio"),
    "max_record_bytes": ("read", "max_record_bytes"),
    "max_gzip_ratio": ("read", "max_gzip_ratio"),
    "max_blank_lines": ("read", "max_blank_lines"),
    "tokenizer": ("tokenize", "tokenizer"),
    "max_length": ("tokenize", "max_length"),
    "truncation": ("tokenize", "truncation"),
    "truncation_unit": ("tokenize", "truncation_unit"),
    "train_on": ("tokenize", "train_on"),
    "packing": ("pack", "mode"),
    "shard_size": ("pack", "shard_size"),
    "seed": ("pack", "seed"),
    "system": ("template", "system"),
    "prompt": ("template", "prompt"),
    "completion": ("template", "completion"),
    "response_template": ("template", "response_template"),
    "instruction_template": ("template", "instruction_template"),
    "template_kwargs": ("template", "kwargs"),
    "stop_tokens": ("template", "stop_tokens"),
    "chat_template": ("template", "chat_template"),
    "max_render_seconds": ("template", "max_render_seconds"),
    "max_render_chars": ("template", "max_render_chars"),
    "dedup": ("mix", "dedup"),
    "mix_by": ("mix", "mix_by"),
    "eval_fraction": ("mix", "eval_fraction"),
    "eval_samples": ("mix", "eval_samples"),
    "decontaminate": ("mix", "decontaminate"),
    "decontaminate_ngram": ("mix", "decontaminate_ngram"),
}
_TOP = ("out", "workers", "overwrite", "part", "sources", "cache", "cache_dir", "cache_max_size")  # allow_code is never read from a file: a YAML file is data


def _packing_value(value: Any) -> Any:
    """TRL's `packing: true / false` -> bfd / none."""
    if value in (True, False, "true", "false"):
        return "bfd" if value in (True, "true") else "none"
    return value


@dataclass(frozen=True)
class Schema:
    """How a YAML-shaped dict (and flag overrides with the same names) maps onto a tree of config
    sections: one loader, `read_tree`, for `sftprep build` and `sfttrain run`.

        {"max_length": 512, "pack": {"seed": 1}, "max_seq_length": 512, "template": "chatml"}
          shortcut -> (section, field)   section mapping   alias -> shortcut   scalar section -> one field
    """

    what: str
    """"build" / "training": named in error messages."""
    root: type
    """The dataclass holding the sections (`BuildConfig`, `TrainConfig`)."""
    sections: Mapping[str, type]
    """Section name -> its dataclass."""
    shortcuts: Mapping[str, tuple[str, str]]
    """Flat key -> (section, field)."""
    aliases: Mapping[str, tuple[str, Callable[[Any], Any] | None]] = field(default_factory=dict)
    """Other tools' names (TRL's) -> (our key, how the value maps; None: as it is). Those declared next to
    their fields (`Flag.aliases`) join these."""
    scalars: Mapping[str, str] = field(default_factory=dict)
    """A section given as a plain value -> the field it sets (`template: chatml` -> template.name)."""
    top: tuple[str, ...] = ()
    """Fields of the root dataclass itself."""
    values: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    """Our key -> how its value maps (`packing: true` -> bfd)."""

    def __post_init__(self) -> None:
        declared = {a.name: (key, a.convert) for key, _, f in self.settings() for a in flag_of(f).aliases}
        object.__setattr__(self, "aliases", {**declared, **self.aliases})

    def settings(self) -> list[tuple[str, type, dataclasses.Field]]:
        """(flat key, its dataclass, the field) of every setting a flat key reaches, section by section, then
        the root's own: what the command line offers, each under its flat key."""
        keys: dict[tuple[str | None, str], str] = {}
        for k, target in self.shortcuts.items():
            keys.setdefault(target, k)
        for k, name in self.scalars.items():
            keys.setdefault((k, name), k)
        out = [(keys[(s, f.name)], cls, f) for s, cls in self.sections.items() for f in dataclasses.fields(cls)
               if (s, f.name) in keys]
        return out + [(f.name, self.root, f) for f in dataclasses.fields(self.root) if f.name in self.top]

    def target(self, key: str) -> tuple[str | None, str] | None:
        """(section, field) a flat key sets, (None, field) for a root field, None if unknown."""
        if key in self.aliases:
            key = self.aliases[key][0]
        if key in self.shortcuts:
            return self.shortcuts[key]
        if key in self.scalars:
            return key, self.scalars[key]
        return (None, key) if key in self.top else None

    def help(self, key: str) -> str:
        """`--help` text of the flag for `key`: the field's docstring and default (`field_help`)."""
        section, name = self.target(key)
        return field_help(self.sections[section] if section else self.root, name)


def read_tree(schema: Schema, data: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None,
              source: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Sort the keys of `data` (from `source`), then of `overrides` (None = unset), into
    `({section: {field: value}}, {root field: value})`.

    Raises:
        ConfigError: unknown keys (with the closest known key), a section that is not a mapping, or a
            value of the wrong type (`type_problem`), all listed at once, each naming `source` and its key.
    """
    sections: dict[str, dict[str, Any]] = {name: {} for name in schema.sections}
    top: dict[str, Any] = {}
    problems: list[str] = []

    def set_field(section: str | None, name: str, value: Any, where: str, written: str) -> None:
        problem = type_problem(schema.sections[section] if section else schema.root, name, value)
        if problem:
            problems.append(f"{where}: `{written}` {problem}")
        (sections[section] if section else top)[name] = value

    def put(key: str, value: Any, where: str) -> None:
        written = key
        if key in schema.aliases:
            key, convert = schema.aliases[key]
            value = convert(value) if convert else value
        if key in schema.values:
            value = schema.values[key](value)
        if key in schema.scalars and not isinstance(value, Mapping):
            set_field(key, schema.scalars[key], value, where, written)
        elif key in schema.sections:
            if not isinstance(value, Mapping):
                problems.append(f"{where}: `{key}` must be a mapping, got {type(value).__name__}")
                return
            known = [f.name for f in dataclasses.fields(schema.sections[key])]
            for k, v in value.items():
                if k in known:
                    set_field(key, k, v, where, f"{key}.{k}")
                else:
                    problems.append(f"{where}: unknown key `{key}.{k}`{did_you_mean(k, known)}")
        elif key in schema.shortcuts:
            set_field(*schema.shortcuts[key], value, where, written)
        elif key in schema.top:
            set_field(None, key, value, where, written)
        else:
            known = sorted({*schema.sections, *schema.shortcuts, *schema.top, *schema.aliases})
            problems.append(f"{where}: unknown key `{key}`{did_you_mean(key, known)}")

    for k, v in (data or {}).items():
        put(str(k), v, source)
    for k, v in (overrides or {}).items():
        if v is not None:
            put(k, v, "command line")
    if problems:
        raise ConfigError.listing(f"{schema.what} config", problems)
    return sections, top


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


@functools.lru_cache(maxsize=None)
def _scalar_kind(cls: type, name: str) -> tuple[type, bool] | None:
    """(bool / int / float / str, whether None is allowed) for a scalar field of dataclass `cls`;
    None for the others (lists, mappings, parts), which their own converters check."""
    hint = typing.get_type_hints(cls)[name]
    parts = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = [t for t in parts if t is not type(None)]
    return (kinds[0], len(kinds) < len(parts)) if len(kinds) == 1 and kinds[0] in _KINDS else None


def _fits(kind: type, value: Any) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is int:
        return isinstance(value, numbers.Integral)
    if kind is float:
        return isinstance(value, numbers.Real)
    return isinstance(value, (str, os.PathLike))


def type_problem(cls: type, name: str, value: Any) -> str | None:
    """What is wrong with the type of `value` for field `name` of config dataclass `cls` ("must be a
    number, got the text '2e-4'..."), or None when it fits (or is not a scalar field)."""
    kind = _scalar_kind(cls, name)
    if kind is None or _fits(kind[0], value) or (value is None and kind[1]):
        return None
    got = "nothing (null)" if value is None else f"the text {value!r}" if isinstance(value, str) else repr(value)
    fix = ""
    if isinstance(value, str) and kind[0] in (int, float):
        try:
            float(value)
            fix = " (write it without quotes)"
        except ValueError:
            pass
    return f"must be {_KINDS[kind[0]]}, got {got}{fix}"


def make_tree(schema: Schema, sections: dict[str, dict[str, Any]], top: dict[str, Any]) -> Any:
    """The root dataclass from `read_tree`'s output (its `__post_init__` checks the values)."""
    try:
        return schema.root(**{name: cls(**sections[name]) for name, cls in schema.sections.items()}, **top)
    except TypeError as e:  # a value of the wrong shape reached a dataclass
        raise ConfigError(f"invalid {schema.what} config: {e}") from None


def as_tuple(value: Any, split: str | None = None) -> tuple[str, ...]:
    """A list setting as a tuple of strings: None -> (), one string -> itself (or split on `split`)."""
    if value is None:
        return ()
    if isinstance(value, (str, Path)):
        return tuple(v.strip() for v in str(value).split(split) if v.strip()) if split else (str(value),)
    return tuple(str(v) for v in value)


BUILD_SCHEMA = Schema("build", BuildConfig,
                      {"read": ReadConfig, "template": TemplateConfig, "tokenize": TokenizeConfig, "pack": PackConfig,
                       "mix": MixConfig},
                      SHORTCUTS, scalars={"template": "name"}, top=_TOP,
                      values={"packing": _packing_value, "part": parse_part})


def config_from_dict(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                     source: str = "config") -> BuildConfig:
    """Build a `BuildConfig` from a YAML-shaped dict, then apply CLI overrides (same key names).

    `template` may be a string (the preset name) or a mapping. Unknown keys raise `ConfigError`.
    """
    data, overrides = dict(data), dict(overrides or {})
    given = sources_from(data.pop("sources"), source) if data.get("sources") is not None else ()
    pairs = overrides.pop("sources", None) or ()
    evals = data.pop("eval", None)
    if evals is not None:  # `eval: {fraction: F}` / `{samples: N}`: the mix section's eval_* keys
        if not isinstance(evals, Mapping) or set(evals) - {"fraction", "samples"}:
            raise ConfigError.listing("build config", [f"{source}: `eval` must be {{fraction: F}} or {{samples: N}}"])
        data.update({f"eval_{k}": v for k, v in evals.items()})
    sections, top = read_tree(BUILD_SCHEMA, data, overrides, source)
    _convert(sections)
    if "decontaminate" in sections["mix"]:
        sections["mix"]["decontaminate"] = as_tuple(sections["mix"]["decontaminate"])
    if given or pairs:
        top["sources"] = _merge_sources(given, tuple(pairs))
    return make_tree(BUILD_SCHEMA, sections, top)


def _convert(sections: dict[str, dict[str, Any]]) -> None:
    """List and mapping settings as the dataclasses hold them (a YAML list or string -> a tuple...)."""
    read, template = sections["read"], sections["template"]
    if "inputs" in read:
        read["inputs"] = as_tuple(read["inputs"])
    if "fields" in read:
        read["fields"] = dict(read["fields"] or {})
    if "kwargs" in template:
        template["kwargs"] = dict(template["kwargs"] or {})
    if "stop_tokens" in template:
        template["stop_tokens"] = as_tuple(template["stop_tokens"])


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls`, white space folded: the one text
    that documents a setting (read by `--help`)."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, doc in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            docs[node.target.id] = " ".join(doc.value.value.split())
    return docs


_FLAG_NOTE = re.compile(r"\s*\(--[^()]*\)")  # "(--max-length)": the docs name the flag; --help needs not


def field_help(cls: type, name: str) -> str:
    """`--help` text for field `name` of config dataclass `cls`: its docstring, without the
    parenthesised flag it names, then `[default: ...]` from the field itself (none for unset ones)."""
    text = _FLAG_NOTE.sub("", field_docs(cls).get(name, "")).strip()
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    if value is None or value is False or (isinstance(value, (tuple, dict)) and not value):
        return text
    shown = "on" if value is True else ",".join(value) if isinstance(value, tuple) else str(value)
    return f"{text} [default: {shown}]"


@functools.lru_cache(maxsize=None)
def _yaml_loader() -> type:
    """PyYAML's safe loader, reading `2e-4` / `1E-5` as numbers, as YAML 1.2 (and TRL / axolotl configs)
    do; PyYAML follows YAML 1.1, where a float needs a dot (`2.0e-4`) and `2e-4` is text."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                                 list("-+0123456789."))
    return Loader


MAX_YAML_VALUES = 1_000_000
"""Values a YAML document may hold with its aliases expanded: a config holds hundreds; an alias bomb (nine
aliases of nine aliases ..., 9^9 values from a few lines) would hang whatever walks it."""


def yaml_value(text: str, where: str = "the YAML") -> Any:
    """A YAML document (a config file, a `--template-kwarg` value) as Python values (`_yaml_loader`),
    refused (`ConfigError` naming `where`) if its aliases expand past MAX_YAML_VALUES or into a cycle."""
    import yaml

    value = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader)
    _check_expansion(value, where)
    return value


def _check_expansion(value: Any, where: str) -> None:
    """Count `value`'s values as if its aliases were copies, each shared part once (so in time linear
    in the document), stopping at MAX_YAML_VALUES."""
    sizes: dict[int, int] = {}  # id of a list or mapping -> its expanded size; -1 while it is being counted

    def size(v: Any) -> int:
        if not isinstance(v, (list, dict)):
            return 1
        n = sizes.get(id(v))
        if n == -1:
            raise ConfigError(f"{where}: an alias refers to a value that holds it (a cycle); write the value out")
        if n is None:
            sizes[id(v)] = -1
            n = 1 + sum(size(x) for x in (v.values() if isinstance(v, dict) else v))
            if n > MAX_YAML_VALUES:
                raise ConfigError(f"{where}: its aliases (*name) expand to more than {MAX_YAML_VALUES:,} values "
                                  "(an alias bomb?); write the values out, or use fewer aliases")
            sizes[id(v)] = n
        return n

    try:
        size(value)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with clear errors for a missing or malformed file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    try:
        data = yaml_value(p.read_text(encoding="utf-8"), str(p))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:  # a binary file, or text in another encoding
        raise ConfigError(f"{p}: not a YAML text file (byte {e.start} is not UTF-8); give a UTF-8 YAML "
                          "config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def paths_from_file(data: dict[str, Any], path: str | Path, keys: Mapping[str, tuple[str, str]],
                    fields: set[tuple[str, str]]) -> dict[str, Any]:
    """Make the relative paths of a YAML file's `data` relative to the file's folder, not the working
    directory. `fields` are the `(section, key)` pairs that hold paths (a string or a list of them);
    `keys` maps top-level keys to their `(section, key)` (`("", "out")` for a top-level one)."""
    base = Path(path).parent

    def fix(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [fix(v) for v in value]
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            return str(base / value)
        return value

    out = dict(data)
    for key, value in data.items():
        if isinstance(value, Mapping):
            out[key] = {k: fix(v) if (key, k) in fields else v for k, v in value.items()}
        elif keys.get(key) in fields:
            out[key] = fix(value)
    return out


BUILD_PATHS = {("read", "inputs"), ("tokenize", "tokenizer"), ("", "out"), ("template", "chat_template"),
               ("mix", "decontaminate"), ("", "cache_dir")}
"""The build settings that are paths: in a YAML file, relative to the file."""


def load_build_yaml(path: str | Path) -> dict[str, Any]:
    """`load_yaml`, with the paths in it (inputs, tokenizer, chat_template, decontaminate, out, and each
    source's inputs and chat_template) made relative to the file."""
    aliases = {a: SHORTCUTS[key] for a, (key, _) in BUILD_SCHEMA.aliases.items() if key in SHORTCUTS}
    keys = {**SHORTCUTS, **aliases, **{k: ("", k) for k in _TOP}}
    data = paths_from_file(load_yaml(path), path, keys, BUILD_PATHS)
    if isinstance(data.get("sources"), list):
        data["sources"] = [paths_from_file(item, path, {**keys, "input": ("read", "inputs")}, BUILD_PATHS)
                           if isinstance(item, Mapping) else item for item in data["sources"]]
    return data
