"""Guard rails run before the model is loaded: a complete manifest, whole shards, a tokenizer
that matches the model's. Each failure is a `ConfigError`/`FileNotFoundError` that says what is
wrong, the values involved, and how to fix it."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from sftprep.write.manifest import shard_path

from .config import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
IDENTITY_KEYS = ("vocab_size", "vocab_hash", "pad_id", "eos_id")


def open_build(folder: str | Path, verify_checksums: bool = False, flag: str = "SHARDS",
               split: str = "train") -> dict[str, Any]:
    """Read and check the manifest of a `sftprep build` folder and its shards, in time independent
    of the dataset's size: each shard must exist and open as an Arrow file (its footer, memory-mapped)
    with the manifest's row count and columns. `verify_checksums` also runs the whole `sftprep verify`
    (sha256 of every byte, the shard contract in every row, the samples file, the totals) on one
    rank per machine. Without it, each row is checked when read (`ShardDataset`).

    Raises:
        FileNotFoundError: no folder, no manifest (an unfinished build), or a missing shard.
        ValueError: an unreadable / unknown-version manifest, a truncated shard, or a failed checksum.
    """
    from sftprep.write.manifest import read_manifest

    p = Path(folder)
    if not p.exists():
        raise FileNotFoundError(f"{flag} {p} does not exist; build shards with `sftprep build`")
    try:
        manifest = read_manifest(p)
    except ValueError as e:  # unreadable or unknown-version manifest
        raise ConfigError(str(e)) from None
    folder = p if p.is_dir() else p.parent
    check_schema(manifest, folder / "manifest.json")
    if split != "train":  # its shards and totals as the manifest of that split (`split_manifest`)
        from sftprep.write.shards import split_manifest

        manifest = split_manifest(manifest, split)
    if not manifest["shards"]:
        raise ConfigError(f"{folder} holds no shards (the build kept no rows); check {folder}/rejects.jsonl")
    for s in manifest["shards"]:
        f = shard_path(folder, s["file"])
        if not f.is_file():
            raise FileNotFoundError(f"{f} is listed in {folder}/manifest.json but missing; "
                                    "rebuild with `sftprep build --overwrite`")
        _check_footer(f, s)
    if verify_checksums and int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
        _verify(folder, manifest)
    return manifest


def _verify(folder: Path, manifest: dict[str, Any]) -> None:
    """--verify-checksums: the whole `sftprep verify` (checksums, the shard contract in every row, samples
    file, totals), then every id within the manifest's `max_token_id`."""
    from sftprep import verify

    report = verify(folder)
    if not report.ok:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(report.counts.items()))
        raise ConfigError(f"--verify-checksums: {folder} fails `sftprep verify` ({counts}), first: "
                          f"{report.violations[0]}; rebuild with `sftprep build --overwrite` (or copy the files "
                          f"again); `sftprep verify {folder}` lists every violation")
    for s in manifest["shards"]:
        _check_max_id(shard_path(folder, s["file"]), manifest)


# -- the manifest is input: its schema, checked before anything relies on it ---------------------

_INT, _STR = "a whole number", "text"
# key -> (what it must be, required); checked in this order, the first problem reported
_SHARD_KEYS = {"file": (_STR, True), "rows": (_INT, True), "tokens": (_INT, True), "sha256": (_STR, True)}
_TOKENIZER_KEYS = {"vocab_size": (_INT, True), "vocab_hash": (_STR, True), "pad_id": (_INT, True),
                   "eos_id": (_INT, False), "bos_id": (_INT, False)}
_TOP_KEYS = {"max_length": (_INT, True), "packing": (_STR, True), "max_token_id": (_INT, False),
             "build_id": (_STR, False)}


def _kind_of(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return _INT if value >= 0 else "negative"
    return _STR if isinstance(value, str) else None


def _check_keys(entry: Any, keys: dict[str, tuple[str, bool]], where: str) -> str | None:
    """The first problem of `entry` against `keys` (None when it conforms)."""
    if not isinstance(entry, dict):
        return f"{where} must be an object, got {type(entry).__name__}"
    for key, (kind, required) in keys.items():
        if key not in entry or (entry[key] is None and not required):
            if required:
                return f"{where} lacks the key {key!r}"
            continue
        if _kind_of(entry[key]) != kind:
            return f"{where}.{key} must be {kind}, got {type(entry[key]).__name__} {entry[key]!r:.40}"
    return None


def check_schema(manifest: dict[str, Any], path: Path) -> None:
    """Refuse a manifest whose fields start-up relies on are missing, of the wrong type, or whose totals
    disagree with its shards: one line naming the key, before any shard or model is opened.

    Raises:
        ConfigError: the first problem found, and how to fix it.
    """
    shards = manifest.get("shards")
    problem = _check_keys(manifest, _TOP_KEYS, "the manifest")
    if problem is None and not isinstance(shards, list):
        problem = f"'shards' must be a list, got {type(shards).__name__}" if "shards" in manifest else \
            "the manifest lacks the key 'shards'"
    if problem is None:
        problem = _check_keys(manifest.get("tokenizer"), _TOKENIZER_KEYS, "tokenizer") if "tokenizer" in manifest \
            else "the manifest lacks the key 'tokenizer'"
    for i, s in enumerate(shards if problem is None else []):
        problem = problem or _check_keys(s, _SHARD_KEYS, f"shards[{i}]")
    totals = manifest.get("totals") or {}
    if problem is None and isinstance(totals, dict):
        for key in ("rows", "tokens"):
            listed = sum(s[key] for s in shards)
            if key in totals and totals[key] != listed:
                problem = (f"totals.{key} is {totals[key]!r} but the shards list {listed} (the sum of "
                           f"shards[].{key})")
                break
    if problem is not None:
        raise ConfigError(f"{path}: {problem}; the manifest was edited or damaged: rebuild with "
                          "`sftprep build --overwrite`")


def id_bound(manifest: dict[str, Any]) -> tuple[int, str]:
    """The largest token id the shards may hold and where that bound comes from: the manifest's
    `max_token_id` (written by every build since it was added), else, for older builds, the
    tokenizer's last id (every id a tokenizer writes is below its vocabulary size)."""
    if manifest.get("max_token_id") is not None:
        return int(manifest["max_token_id"]), "max_token_id"
    return int(manifest["tokenizer"]["vocab_size"]) - 1, "the tokenizer's vocab_size - 1 (a build without max_token_id)"


def _check_max_id(f: Path, manifest: dict[str, Any]) -> None:
    """With --verify-checksums: the shard's largest id, read in full, is within the manifest's bound."""
    import pyarrow.compute as pc

    from sftprep.write.shards import open_shard

    table = open_shard(f)
    top = pc.max(pc.list_flatten(table.column("input_ids"))).as_py()
    bound, what = id_bound(manifest)
    if top is not None and (top > bound or top < 0):
        raise ConfigError(f"{f} holds token id {top}, beyond {what} {bound} in its manifest: the shard was "
                          "changed after the build; rebuild with `sftprep build --overwrite`")


def _check_footer(f: Path, entry: dict[str, Any]) -> None:
    """The shard opens as an Arrow IPC file with the manifest's rows and the contract's columns
    (reads the footer and batch headers of the memory map, not the data)."""
    import pyarrow as pa

    from sftprep.write.shards import TRAINED_COLUMNS

    try:
        reader = pa.ipc.open_file(pa.memory_map(str(f)))
        rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{f} is not a complete Arrow file ({e}); it was truncated or overwritten: rebuild with "
                          "`sftprep build --overwrite` (or copy the file again)") from None
    missing = [c for c in TRAINED_COLUMNS if c not in reader.schema.names]
    if missing or rows != int(entry["rows"]):
        what = f"lacks the columns {', '.join(missing)}" if missing else f"holds {rows} rows, not {entry['rows']}"
        raise ConfigError(f"{f} {what} as its manifest says; rebuild with `sftprep build --overwrite`")


# -- the trainer's own files: checked before they are loaded -------------------------------------

def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not whole (None when it is), read without torch: an 8-byte header
    length, a JSON header, and tensors that end where the file ends (a cut file ends early)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little") if size >= 8 else None
            if length is None or length > size - 8:
                return f"{path} is truncated ({size:,} bytes, shorter than its own header)"
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except OSError as e:
        return f"{path} cannot be read ({e.strerror or e})"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"{path} has a damaged header (not the JSON a safetensors file starts with)"
    if 8 + length + end != size:
        return f"{path} is truncated: {size:,} bytes where its header lists {8 + length + end:,}"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why `--resume` cannot continue from a checkpoint folder (None when it can): trainer_state.json
    (written last, in place) must be whole JSON, the adapter there, every .safetensors whole and every
    torch file (optimizer, scheduler, RNG state) a whole zip archive."""
    for name in ("trainer_state.json", "adapter_config.json"):
        try:
            json.loads((folder / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue  # trainer_state.json is there (`saved_checkpoints`); a full fine-tune has no adapter
        except (OSError, ValueError):
            return f"{folder / name} is truncated or unreadable"
    if (folder / "adapter_config.json").is_file() and not (folder / "adapter_model.safetensors").is_file():
        return f"{folder / 'adapter_model.safetensors'} is missing"
    for f in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            return problem
    for f in sorted(p for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".bin")):
        if not zipfile.is_zipfile(f):
            return f"{f} is truncated (not a whole torch file)"
    return None


def model_config(model_path: str | Path) -> dict[str, Any]:
    """The model folder's config.json, without importing transformers."""
    p = Path(model_path)
    if not p.is_dir():
        raise FileNotFoundError(f"--model {p} is not a folder; sfttrain loads local models only "
                                f"(download one first, e.g. `hf download ORG/NAME --local-dir {p}`)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"--model {p} has no config.json; give the folder of a Hugging Face model")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg} is not valid JSON: {e}") from None


def _vocab_size(config: dict[str, Any]) -> int | None:
    for c in (config, config.get("text_config") or {}):
        if isinstance(c.get("vocab_size"), int):
            return c["vocab_size"]
    return None


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def check_tokenizer(manifest: dict[str, Any], shards: str | Path, model_path: str | Path,
                    tokenizer_path: str | Path | None = None, skip_check: bool = False):
    """Check the shards' tokenizer against the model's; return the tokenizer to save with adapters.

    The shards' ids must fit the model's embedding (`vocab_size` in config.json): their vocabulary,
    and their largest id (the manifest's `max_token_id`). The tokenizer compared with the build's
    identity (vocabulary hash, size, pad and EOS ids) is the model folder's own when it has one, then
    `tokenizer_path` if given; when neither exists, the build's copy in SHARDS/tokenizer/ (it must be
    the tokenizer the shards were built with), and without that copy the run is refused, since
    nothing can be compared. A model folder without a tokenizer must not have many more embedding rows
    than the build's tokenizer has tokens (`_check_spare_rows`). `skip_check` (--skip-tokenizer-check)
    skips the identity comparisons and that one (never the embedding bounds). The tokenizer returned is
    the model's (or `tokenizer_path`'s), else the build's copy.

    Raises:
        ConfigError: a mismatch, naming the differing fields and how to fix it.
    """
    from sftprep.write.manifest import tokenizer_dir
    from sftprep.tokenizer import load_tokenizer

    built = manifest.get("tokenizer") or {}
    _check_embeddings(manifest, shards, model_path)
    if not skip_check and not has_tokenizer(model_path):
        _check_spare_rows(built, model_path)
    candidates = [(Path(model_path), "model")] if has_tokenizer(model_path) else []
    if tokenizer_path:
        candidates.append((Path(tokenizer_path), "--tokenizer"))
    own = tokenizer_dir(shards, manifest)
    if not candidates and not skip_check:
        if own is None:
            raise ConfigError(
                f"cannot check the tokenizer of the shards in {shards}: the model folder {model_path} has no "
                f"tokenizer, no --tokenizer was given, and the build has no copy of its own ({built.get('name')}) "
                "in tokenizer/; pass --tokenizer DIR (the tokenizer the model was trained with), or "
                "--skip-tokenizer-check to train without this check")
        candidates.append((own, "build's copy"))
    tokenizer = None
    for path, what in candidates:
        if not skip_check:
            _compare_identity(built, path, what, shards)
        if what != "build's copy":
            tokenizer = tokenizer or load_tokenizer(path)
    if tokenizer is None and own is not None:
        tokenizer = load_tokenizer(own)  # saved with the adapter; identity is the build's own
    return tokenizer


def _check_embeddings(manifest: dict[str, Any], shards: str | Path, model_path: str | Path) -> None:
    """The shards' vocabulary and largest id fit the model's embedding matrix (config.json alone)."""
    built = manifest.get("tokenizer") or {}
    size = _vocab_size(model_config(model_path))
    if size is None:
        return
    if built.get("vocab_size", 0) > size:
        raise ConfigError(
            f"tokenizer mismatch: the shards in {shards} use a vocabulary of {built['vocab_size']} tokens "
            f"({built.get('name')}) but the model in {model_path} has only {size} embeddings; rebuild the "
            "shards with the model's tokenizer (`sftprep build --tokenizer MODEL_DIR`)")
    top, what = id_bound(manifest)
    if top >= size:
        raise ConfigError(
            f"the shards in {shards} hold token id {top} ({what} in manifest.json) but the model in {model_path} "
            f"has only {size} embeddings (ids 0..{size - 1}); rebuild the shards with the model's tokenizer "
            "(`sftprep build --tokenizer MODEL_DIR --overwrite`)")


SPARE_ROWS = 128
"""Embedding rows a model may hold beyond its tokenizer's length: padding the matrix to a multiple of 128
(or 64) is common; more than that says the model was made for another vocabulary."""


def _check_spare_rows(built: dict[str, Any], model_path: str | Path) -> None:
    """A model folder without a tokenizer (made from a config, as in tests and demos) whose embedding
    matrix is much larger than the build's tokenizer: nothing ties the two together, so the run is refused
    (--skip-tokenizer-check passes) rather than train rows no token will ever use."""
    size, vocab = _vocab_size(model_config(model_path)), built.get("vocab_size")
    if size is None or not isinstance(vocab, int) or size - vocab < SPARE_ROWS:
        return
    raise ConfigError(
        f"the model in {model_path} has {size:,} embedding rows but the shards' tokenizer ({built.get('name')}) "
        f"has {vocab:,} tokens, and the model folder has no tokenizer to say they belong together: a model made "
        f"for another vocabulary? Make it with vocab_size={vocab} (e.g. `LlamaConfig(vocab_size=len(tokenizer))`) "
        "or save the tokenizer in its folder; or pass --skip-tokenizer-check to train it as it is")


def _compare_identity(built: dict[str, Any], path: Path, what: str, shards: str | Path) -> None:
    from sftprep.tokenizer import load_fast, tokenizer_identity

    ident = tokenizer_identity(load_fast(path), path)  # tokenizers only: fast, no transformers
    owner = what if what == "build's copy" else f"{what}'s"
    diffs = [f"{k} {built.get(k)!s:.12} in the shards, {ident.get(k)!s:.12} in the {owner}"
             for k in IDENTITY_KEYS if built.get(k) != ident.get(k)]
    if not diffs:
        return
    if what == "build's copy":
        raise ConfigError(
            f"tokenizer mismatch: the shards in {shards} were built with {built.get('name')}, but the tokenizer "
            f"in {path} is another one: {'; '.join(diffs)}. The folder mixes two builds: rebuild it with "
            "`sftprep build --overwrite`, or pass --tokenizer DIR (the shards' tokenizer)")
    raise ConfigError(
        f"tokenizer mismatch: the shards in {shards} were built with {built.get('name')}, which differs "
        f"from the {what}'s tokenizer ({path}): {'; '.join(diffs)}. "
        f"Rebuild the shards with `sftprep build --tokenizer {path}`, or train the model they were built for")


def check_same_tokenizer(train: dict[str, Any], other: dict[str, Any], where: str) -> None:
    a, b = train.get("tokenizer") or {}, other.get("tokenizer") or {}
    diffs = [k for k in IDENTITY_KEYS if a.get(k) != b.get(k)]
    if diffs:
        raise ConfigError(f"--eval {where} was built with a different tokenizer than the training shards "
                          f"({', '.join(diffs)} differ); rebuild it with `sftprep build --tokenizer "
                          f"{a.get('source') or a.get('path')}`")


def build_stats(manifest: dict[str, Any]) -> dict[str, Any]:
    """Rows, tokens and trained tokens of a build, from its manifest (no shard is read)."""
    totals = manifest.get("totals", {})
    return {"rows": int(totals.get("rows", sum(s["rows"] for s in manifest["shards"]))),
            "tokens": int(totals.get("tokens", sum(s["tokens"] for s in manifest["shards"]))),
            "trained_tokens": totals.get("trained_tokens"),
            "max_length": manifest.get("max_length"), "packing": manifest.get("packing")}
