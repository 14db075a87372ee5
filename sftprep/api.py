"""The public Python surface of the build: `build(config)` (and `load(dir)`, from `shards.py`).

    config --> OUT locked --> inputs (resolved once) + tokenizer --> build id --> OUT prepared (output.py)
           --> encode_all: read -> normalize -> render -> tokenize -> label -> truncate  (pipeline, encode)
           --> SampleStore (spill files) --> pack (packing) --> ShardSetWriter (shards)
           --> samples.feather, rejects.jsonl, tokenizer/ (output) --> manifest.json, last (manifest)

Every stage takes its own config section; this module is the only one that sees the whole
`BuildConfig`, and it writes nothing a reader may trust until the manifest is in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from .config import BuildConfig
from .errors import ConfigError
from .memory import MemoryBuild  # noqa: F401 (public: the in-memory build)
from .read import count_records, expand_inputs
from .render.export import preset_jinja
from .render.presets import PRESETS
from .scale.parts import part_size
from .scale.pipeline import encode_all, encoders_for, file_tasks, gc_paused, in_background
from .tokenize.cache import Cache, default_dir, parse_size
from .tokenizer import install_chat_template, load_fast, pad_id, tokenizer_identity
from .write.files import overlaps
from .write.manifest import tokenizer_dir, write_manifest
from .write.output import (TOKENIZER_DIR, OutLock, build_id, build_manifest, check_rejects, empty_inputs, hash_input,
                     hash_tokenizer, owned, prepare_out, remove_temps, source_entries, write_build)
from .write.store import SampleStore

SPILL_STEM = "tokens.spill"  # tokens.spill.{ids,labels}.tmp: removed at the end, or by the next build


def build(config: BuildConfig, progress: Callable[[int], None] | None = None, *,
          allow_code: bool = False) -> dict[str, Any]:
    """Read, render, tokenize, label, pack and write shards; return the manifest (and, under `cache`, what the
    sample cache gave: not written to manifest.json, since the shards are the same either way).

    Args:
        config: the resolved build configuration.
        progress: called with the number of records just processed, batch by batch; if it has a
            `start(total)` method, that is called first with about how many records will be read
            (None where inputs do not say cheaply: see `readers.count_records`).
        allow_code: let a `module:function` template import and run Python code.

    Raises:
        ConfigError / FileNotFoundError: a setting is wrong (nothing is written).
        RecordError: a bad record under `on_error="fail"` (no manifest is written).
        BuildError: too many records rejected (shards and rejects are left, no manifest).
    """
    if allow_code:
        config = dataclasses.replace(config, allow_code=True)
    lock = OutLock(Path(config.out))
    lock.acquire()  # before any work: a second build into OUT is refused at once
    # The cyclic garbage collector is paused for the build: it makes millions of short-lived objects
    # (parsed records, messages, packing plans) and no cycle worth chasing, and each full collection
    # would walk the caller's whole heap too (-0.6 s of 7.5 on 10k chats built from a process holding them).
    try:
        with gc_paused():
            return _build(config, progress)
    finally:
        lock.release()


def _build(config: BuildConfig, progress: Callable[[int], None] | None) -> dict[str, Any]:
    inputs = _inputs(config)  # per source
    tok = load_fast(config.tokenize.tokenizer)
    # file hashes (the build id) while the templates are compiled: hashlib works without the GIL
    hashes = in_background(_hash_sources, [p for paths in inputs for p in paths], tok.path,
                           config.template.chat_template)
    encoders = encoders_for(config, tok)  # validates template settings before any work
    input_info, tokenizer_hash = hashes()
    this_build = build_id(config, input_info, tokenizer_hash)
    samples_cache = Cache(Path(config.cache_dir).expanduser() if config.cache_dir else default_dir(),
                          parse_size(config.cache_max_size)) if config.cache else None
    tasks = file_tasks(config, inputs, {i["path"]: i["sha256"] for i in input_info}, tokenizer_hash, samples_cache)
    part = None
    if config.part is not None:  # what `sftprep merge` checks: parts 0..N-1 of one whole build (sftprep.scale.parts)
        part = {"index": config.part[0], "count": config.part[1],
                "of_build": build_id(dataclasses.replace(config, part=None), input_info, tokenizer_hash)}
    out = prepare_out(Path(config.out), this_build, config.overwrite)

    if hasattr(progress, "start"):
        progress.start(expected_records(config, [p for paths in inputs for p in paths]))
    store = SampleStore(out, SPILL_STEM)
    pad = pad_id(tok)
    # the vocabulary hash (for the manifest, ~0.2 s on a 129k vocabulary, much of it holding the GIL) is
    # worked out once the first batch is in the tokenizer
    identity: list[Callable[[], dict[str, Any]]] = []

    def start_identity() -> None:
        identity.append(in_background(tokenizer_identity, tok, config.tokenize.tokenizer))
    try:
        read, counts = encode_all(config, tasks, encoders, store, progress, start_identity, samples_cache)
        rejects = store.rejects
        if part is None:  # a part may hold few or no records: merge checks all parts' together
            check_rejects(config, rejects, read, out)
        store.seal()
        sources = source_entries(config, inputs, counts)
        shards, totals, extra = write_build(config, out, store, rejects, read, sources, pad, Path(config.tokenize.tokenizer))
        # a part may hold none of an input's records: merge warns over all parts
        empty = [] if part else empty_inputs([p for paths in inputs for p in paths], store.sources, rejects, sources)
        # --chat-template (the build's, not a source's own): the copy carries it
        chosen = [e.renderer.template_file for s, e in zip(config.recipe(), encoders)
                  if config.template.chat_template and s.template.chat_template == config.template.chat_template]
        if chosen:
            install_chat_template(out / TOKENIZER_DIR, chosen[0])
    except BaseException:
        remove_temps(out)  # a failed write (disk full...) leaves no *.tmp behind
        raise
    finally:
        store.remove()

    if samples_cache is not None:
        samples_cache.prune()  # the bound holds after every build
    identity = identity[0]() if identity else tokenizer_identity(tok, config.tokenize.tokenizer)
    manifest = build_manifest(
        config, build_id=this_build, inputs=input_info, template=_templates(config, encoders),
        warnings=[w for e in encoders for w in e.renderer.warnings] + (samples_cache.warnings if samples_cache else [])
        + empty,
        tokenizer={**identity, "files_sha256": tokenizer_hash, "path": TOKENIZER_DIR,
                   "source": str(tok.path.resolve()), "files": sorted(p.name for p in (out / TOKENIZER_DIR).iterdir())},
        max_token_id=max(store.max_id, pad), shards=shards, totals=totals, **extra, **({"part": part} if part else {}))
    write_manifest(out, manifest)
    # what came from the sample cache: for the summary, not the manifest (the build is the same either way)
    return {**manifest, "cache": samples_cache.report()} if samples_cache else manifest


def _hash_sources(inputs: list[Path], tokenizer: Path, chat_template: str | None) -> tuple[list[dict[str, str]], str]:
    """The manifest's input entries (path, sha256) and the tokenizer files' hash (with the `--chat-template`
    file's, which the build's tokenizer/ folder holds in place of the tokenizer's own)."""
    files = hash_tokenizer(tokenizer)
    if chat_template:
        files = hashlib.sha256(f"{files} chat_template {hash_input(Path(chat_template))}".encode()).hexdigest()
    return [{"path": str(p), "sha256": hash_input(p)} for p in inputs], files


def _templates(config: BuildConfig, encoders: list) -> Any:
    """The manifest's `template`: the one template's description, or each source's by name."""
    if not config.sources:
        return encoders[0].renderer.description
    return {s.name: e.renderer.description for s, e in zip(config.sources, encoders)}


def _inputs(config: BuildConfig) -> list[list[Path]]:
    """Each source's input files, resolved once (the list hashed is the list read)."""
    inputs = [_source_inputs(config, s.read.inputs) for s in config.recipe()]
    tokenizer = Path(config.tokenize.tokenizer)
    out = Path(config.out)
    if tokenizer.exists() and overlaps(tokenizer, out):
        raise ConfigError(f"the tokenizer {tokenizer} is inside the output folder --out {out} (or contains it): a "
                          "build replaces OUT/tokenizer/; copy the tokenizer elsewhere, or choose another folder")
    return inputs


def _source_inputs(config: BuildConfig, patterns: tuple[str, ...]) -> list[Path]:
    """One source's input files. A glob that sweeps in files of a previous build in `--out` (its
    rejects.jsonl) skips them; any other input that is, contains or lies inside `--out`, and a tokenizer
    there, is refused before any work: a build replaces its files."""
    out = Path(config.out)
    ours = owned(out) if out.is_dir() else set()
    inputs = []
    for p in expand_inputs(patterns):
        inside = out.resolve() in p.resolve().parents
        if inside and p.resolve().relative_to(out.resolve()).parts[0] in ours:
            continue
        if overlaps(p, out):
            raise ConfigError(f"input {p} {'is inside' if inside else 'contains'} the output folder --out {out}: "
                              "a build replaces files there; choose an output folder apart from the inputs")
        inputs.append(p)
    if not inputs:
        raise FileNotFoundError(f"no input outside the output folder {config.out}: "
                                f"{', '.join(patterns)} match only files the build writes")
    return inputs


def expected_records(config: BuildConfig, inputs: list[Path] | None = None) -> int | None:
    """About how many records the build reads (its part's share with `--part`); None where the inputs do
    not say cheaply (`readers.count_records`)."""
    counts = [count_records(p) for p in (inputs if inputs is not None else
                                         [p for paths in _inputs(config) for p in paths])]
    total = None if None in counts else sum(counts)
    limit = config.read.num_samples
    total = limit if limit and (total is None or total > limit) else total
    return total if total is None or config.part is None else part_size(total, config.part)


def hold_build(folder: str | Path):
    """A context manager that holds the build in `folder` while a reader (`sfttrain run`) uses it: a build
    into the folder is refused meanwhile, and a build under way refuses the reader (`OutLock.reading`)."""
    return OutLock(Path(folder)).reading()


def chat_template_for(manifest: dict[str, Any], tokenizer, folder: str | Path = ".") -> str | None:
    """The chat template matching the build's (the build in `folder`; `tokenizer` a transformers
    tokenizer of the build's vocabulary), or None when the build used no chat template."""
    cfg = (manifest.get("config") or {}).get("template") or {}
    name = cfg.get("name")
    if cfg.get("prompt") is not None or cfg.get("response_template") or not name:
        return None
    if name == "tokenizer":
        return _tokenizer_template(manifest, folder) or getattr(tokenizer, "chat_template", None)
    preset = PRESETS.get(name)
    if preset is None:
        return None
    plain = preset_jinja(preset, eos=tokenizer.eos_token or "", bos=None, system=cfg.get("system"))
    if not tokenizer.bos_token:
        return plain
    # With BOS written by the template, apply_chat_template(tokenize=True) gives the training ids, unless
    # the tokenizer treats text after a special token differently (SentencePiece's prefix space): then the
    # template leaves BOS to the tokenizer (tokenize its text output with special tokens).
    with_bos = preset_jinja(preset, eos=tokenizer.eos_token or "", bos=tokenizer.bos_token, system=cfg.get("system"))
    probe = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]
    try:
        from jinja2 import Template

        text = Template(plain).render(messages=probe, add_generation_prompt=False, bos_token=tokenizer.bos_token)
        same = (tokenizer(text).input_ids ==
                tokenizer(tokenizer.bos_token + text, add_special_tokens=False).input_ids)
    except Exception:  # noqa: BLE001 - any failure: keep the plain template
        return plain
    return with_bos if same else plain


def _tokenizer_template(manifest: dict[str, Any], build: str | Path) -> str | None:
    folder = tokenizer_dir(build, manifest)
    if folder is None:
        return None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None
