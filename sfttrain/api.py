"""The public Python surface: `train(config)` and `merge(adapter, out)`.

    setup (guard rails, no model)  ->  build (model, adapter, isolation proof, Trainer)  ->  fit
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sftprep.errors import UserError
from sftprep.pack.packing import mode

from .attention import AttentionPath, check_packed_rows, choose_attention, model_traits
from .checks import (build_stats, check_same_tokenizer, check_tokenizer, checkpoint_problem, has_tokenizer,
                     model_config, open_build, safetensors_problem)
from .config import DTYPES, ConfigError, TrainConfig

FINAL = "final"


@dataclass
class Setup:
    """What the guard rails established before any model is loaded."""

    config: TrainConfig
    manifest: dict[str, Any]
    eval_manifest: dict[str, Any] | None
    tokenizer: Any
    attention: AttentionPath
    resume_from: str | None
    traits: dict[str, Any] = field(default_factory=dict)
    resume_changes: list[str] = field(default_factory=list)
    """How this run differs from the checkpoint it resumes (accepted with --accept-changes)."""


@dataclass
class TrainResult:
    """How a run ended. `final_dir` is None when a signal stopped it (see `checkpoint`)."""

    output_dir: str
    final_dir: str | None
    checkpoint: str | None
    global_step: int
    train_loss: float | None
    eval_loss: float | None
    interrupted_by: str | None
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)


def setup(config: TrainConfig) -> Setup:
    """Every check that needs no model: manifest, checksums, tokenizer, quantization backend,
    attention path, logging backend, output folder / resume point.

    Raises:
        ConfigError / FileNotFoundError / ValueError: with a message that says how to fix it.
    """
    manifest, eval_manifest = check_inputs(config, config.data.verify_checksums)
    traits = model_traits(model_config(config.model.path))
    tokenizer = check_tokenizer(manifest, config.data.shards, config.model.path, config.model.tokenizer,
                                config.model.skip_tokenizer_check)
    attention = check_runtime(config, traits)
    check_packed_rows(traits, mode(manifest.get("packing")).shared, manifest.get("max_length"))
    resume_from, changes = _resume_point(config, manifest)
    return Setup(config, manifest, eval_manifest, tokenizer, attention, resume_from, traits, changes)


def check_inputs(config: TrainConfig, verify_checksums: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The checks that need neither torch nor transformers: the build folders and their manifests (and
    shards' footers), the model folder's config.json. Quick (no shard is read in full unless
    `verify_checksums`), so `sfttrain run` answers a mistake here before it imports the heavy libraries.
    Returns the training and evaluation manifests."""
    manifest = open_build(config.data.shards, verify_checksums)
    eval_manifest = None
    if config.data.eval:
        eval_manifest = open_build(config.data.eval, verify_checksums, flag="--eval")
        check_same_tokenizer(manifest, eval_manifest, config.data.eval)
    elif manifest.get("validation_shards"):  # the build's own held-out split
        eval_manifest = open_build(config.data.shards, split="validation")
    if config.train.eval_steps is not None and eval_manifest is None:
        raise ConfigError("--eval-steps needs evaluation shards: give --eval DIR, or build the shards with a "
                          "validation split (`eval: {fraction: 0.01}`)")
    model_config(config.model.path)
    return manifest, eval_manifest


def train(config: TrainConfig, *, callbacks: Iterable[Any] = (),
          on_start: Callable[[dict[str, Any]], None] | None = None, disable_tqdm: bool = False) -> TrainResult:
    """Train LoRA adapters (or the full model) on the shards of `config.data.shards`.

    Args:
        config: the resolved configuration.
        callbacks: extra `transformers.TrainerCallback`s (progress display, tests).
        on_start: called with the start-up summary once the model is ready, before the first step.
        disable_tqdm: silence the Trainer's own progress bar and log printing.

    Returns:
        The `TrainResult`; the adapter and tokenizer are in `final_dir` (OUTPUT_DIR/final).
    """
    with _holding(config.data.shards, config.data.eval):
        s = setup(config)
        trainer, stopper, summary = _build(s, list(callbacks), disable_tqdm)
        if on_start:
            on_start(summary)
        return _fit(s, trainer, stopper, summary)


@contextmanager
def _holding(*folders: str | None) -> Iterator[None]:
    """A shared lock on each build folder for the whole run: `sftprep build` refuses to rebuild a folder
    while it is read (and a build under way refuses the run), so the run trains on the build it checked."""
    from sftprep.api import hold_build

    with ExitStack() as held:
        for given in filter(None, folders):
            folder = Path(given) if Path(given).is_dir() else Path(given).parent
            if (folder / "manifest.json").is_file():  # anything else is refused by `setup`, and left untouched
                held.enter_context(hold_build(folder))
        yield


def _build(s: Setup, callbacks: list, disable_tqdm: bool):
    """Model, adapter, isolation proof and the Trainer that will run them."""
    from transformers import PrinterCallback

    from .attention import check_isolation
    from .chat_template import attach_build_template
    from .data import PackedCollator, ShardDataset
    from .model import apply_lora, load_model, lora_targets, parameter_counts
    from .trainer import ApplyLearningRate, ShardTrainer, StopOnSignal, training_arguments

    config = s.config
    attach_build_template(s.tokenizer, s.manifest, config.data.shards)  # saved with every checkpoint and the adapter
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    args = training_arguments(config, has_eval=s.eval_manifest is not None, disable_tqdm=disable_tqdm,
                              planned_steps=_planned_steps(build_stats(s.manifest)["rows"], config, world))
    model = load_model(config, s.attention)
    targets_note = lora_targets(model, config)[1] if config.lora.method != "full" else None
    model = apply_lora(model, config)
    if not config.quantized:
        model = model.to(args.device)  # the probe must run where training will (flash-attention is CUDA-only)
    collator = PackedCollator(s.attention, s.manifest["tokenizer"]["pad_id"])
    # One sample per row (packing none) needs no proof: padding is on the right, behind every token.
    isolation = (check_isolation(model, collator, s.manifest["tokenizer"]["vocab_size"],
                                 window=s.traits.get("window"), max_length=s.manifest.get("max_length"),
                                 chunk=s.traits.get("chunk"))
                 if mode(s.manifest.get("packing")).shared else None)
    stopper = StopOnSignal()
    # a resume with --accept-changes: the checkpoint's optimizer and scheduler would keep the old rate
    changed = [ApplyLearningRate(config.train.learning_rate)] if s.resume_changes else []
    trainer = ShardTrainer(
        model=model, args=args,
        train_dataset=ShardDataset(config.data.shards, s.manifest),
        eval_dataset=ShardDataset(config.data.eval or config.data.shards, s.eval_manifest) if s.eval_manifest else None,
        data_collator=collator, processing_class=s.tokenizer,
        callbacks=[stopper, *changed, *callbacks], shuffle=config.data.shuffle, run_info=_run_info(s))
    if disable_tqdm:
        trainer.remove_callback(PrinterCallback)
    summary = _summary(s, model, parameter_counts(model), isolation, args)
    summary["targets_note"] = targets_note
    summary["router_aux_coef"] = trainer.router.coef if trainer.router else None
    return trainer, stopper, summary


def _fit(s: Setup, trainer, stopper, summary: dict[str, Any]) -> TrainResult:
    """Run the Trainer (resuming where asked); save adapter + tokenizer to OUTPUT_DIR/final."""
    import signal

    from .trainer import saving

    stopper.install()
    try:
        out = trainer.train(resume_from_checkpoint=s.resume_from)
    except UserError as e:  # e.g. an edited shard's row, perhaps read in a DataLoader worker
        raise _unwrapped(e) from None
    finally:
        stopper.restore()
    output_dir = s.config.train.output_dir
    result = TrainResult(output_dir=output_dir, final_dir=None, checkpoint=None, global_step=out.global_step,
                         train_loss=out.training_loss, eval_loss=None, interrupted_by=None, summary=summary,
                         metrics=dict(out.metrics), log_history=list(trainer.state.log_history))
    result.metrics.update(trainer.run_totals(out.metrics.get("train_runtime", 0.0)))
    if stopper.signum is not None:
        result.interrupted_by = signal.Signals(stopper.signum).name
        result.checkpoint = str(Path(output_dir) / f"checkpoint-{out.global_step}")
        return result
    if s.eval_manifest is not None:
        done = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == out.global_step]
        metrics = done[-1] if done else trainer.evaluate()  # the Trainer may have just evaluated the last step
        result.eval_loss = metrics.get("eval_loss")
        result.metrics.update(metrics)
    final = Path(output_dir) / FINAL
    with saving(final, output_dir, trainer.is_world_process_zero()):
        trainer.save_model(str(final))  # with sfttrain.json
    result.final_dir = str(final)
    return result


def check_merge(adapter: str | Path, out: str | Path, model: str | Path | None = None, dtype: str = "auto",
                overwrite: bool = False) -> str:
    """What `merge` checks before importing torch (so `sfttrain merge` answers a mistake at once): the
    adapter folder, the base model's config.json, the --dtype, an --out it may write. Returns the base
    model folder: `model`, else the one the adapter records."""
    adapter, out = Path(adapter), Path(out)
    cfg_file = adapter / "adapter_config.json"
    if not adapter.is_dir():
        raise FileNotFoundError(f"adapter folder {adapter} does not exist")
    if not cfg_file.is_file():
        hint = " (it holds a full model already: load it directly)" if (adapter / "config.json").is_file() else ""
        raise ConfigError(f"{adapter} is not a LoRA adapter folder: no adapter_config.json{hint}")
    try:
        recorded = json.loads(cfg_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        recorded, damaged = None, f"{cfg_file} is truncated or unreadable"
    else:
        damaged = safetensors_problem(adapter / "adapter_model.safetensors")
    if damaged:
        raise ConfigError(f"{damaged}: the adapter is damaged; merge another checkpoint (or copy the files again)")
    base = str(model or recorded)
    model_config(base)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} is not empty; pass --overwrite to replace it, or choose another folder")
    trained = trained_quantization(adapter)
    if trained is not None and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{adapter} was trained on a {_quant_kind(trained)} base: merging it needs bitsandbytes "
                          "to rebuild that base and dequantize it (pip install bitsandbytes); merged into the "
                          "full-precision weights, the result would not be the model that was trained")
    return base


def trained_quantization(adapter: str | Path) -> TrainConfig | None:
    """The training config of an adapter trained on a 4-/8-bit base (from its sfttrain.json), else None."""
    from .trainer import RUN_FILE

    run = Path(adapter) / RUN_FILE
    try:
        saved = json.loads(run.read_text(encoding="utf-8"))["config"]
        quant = saved.get("quant") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no run info (an adapter from elsewhere): nothing says it was trained quantized
    if not (quant.get("load_in_4bit") or quant.get("load_in_8bit")):
        return None
    return TrainConfig.from_dict(saved)


def merge_base(adapter: str | Path) -> str:
    """Which weights `merge` folds the adapter into, in words."""
    trained = trained_quantization(adapter)
    if trained is None:
        return "its base model's weights"
    return (f"the dequantized {_quant_kind(trained)} base it was trained on (the full-precision weights would "
            "differ from it by the quantization error)")


def _unwrapped(e: UserError) -> UserError:
    """A user error raised in a DataLoader worker comes back as "Caught X in DataLoader worker process 0.
    Original Traceback ... module.X: message" (torch): the one-line message again."""
    text = str(e)
    if not text.startswith("Caught ") or "\n" not in text:
        return e
    return type(e)(text.rstrip().splitlines()[-1].split(": ", 1)[-1])


def merge(adapter: str | Path, out: str | Path, model: str | Path | None = None, dtype: str = "auto",
          trust_remote_code: bool = False, overwrite: bool = False) -> Path:
    """Fold a LoRA adapter into its base model and save the result (with the tokenizer) to `out`.

    Args:
        adapter: a folder written by `sfttrain run` (OUTPUT_DIR/final or a checkpoint).
        out: where the merged model goes.
        model: the base model folder; default: the one the adapter records.
        dtype: auto (the base's own), bf16, fp16 or fp32.

    An adapter trained on a 4-/8-bit base (its sfttrain.json says so) is folded into that base
    rebuilt with the same bitsandbytes settings and dequantized: the weights it was trained against,
    not the full-precision ones (`merge_base` says which).
    """
    adapter, out = Path(adapter), Path(out)
    base = check_merge(adapter, out, model, dtype, overwrite)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import quantization_config

    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "auto": "auto"}
    trained = trained_quantization(adapter)  # the base it was trained on: rebuilt, then dequantized
    base_model = AutoModelForCausalLM.from_pretrained(
        str(base), dtype=names[dtype], local_files_only=True, trust_remote_code=trust_remote_code,
        quantization_config=quantization_config(trained) if trained is not None else None)
    if trained is not None:
        base_model = base_model.dequantize()
        if dtype != "auto":
            base_model = base_model.to(names[dtype])
    merged = PeftModel.from_pretrained(base_model, str(adapter)).merge_and_unload()
    if out.exists() and overwrite:
        shutil.rmtree(out)
    merged.save_pretrained(str(out))
    tok_dir = adapter if has_tokenizer(adapter) else Path(base) if has_tokenizer(base) else None
    if tok_dir is not None:
        AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True).save_pretrained(str(out))
    return out


# -- helpers -----------------------------------------------------------------------------------

def _check_report_to(report_to: str) -> None:
    needs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(report_to, ())
    if needs and not any(importlib.util.find_spec(m) for m in needs):
        raise ConfigError(f"--report-to {report_to} needs the {needs[0]} package: `pip install {needs[0]}` "
                          "(or --report-to none)")


def check_runtime(config: TrainConfig, traits) -> AttentionPath:
    """What this machine must offer for `config` (quantization backend, reporting packages, a GPU for
    fp16), checked before the model loads; returns the attention path chosen for the model."""
    from .model import check_quantization_backend, cuda_available, precision_note, resolve_dtype

    check_quantization_backend(config)
    _check_report_to(config.train.report_to)
    cuda = cuda_available()
    precision_note(config)  # refuses what this machine cannot run
    half = str(resolve_dtype(config)).endswith(("bfloat16", "float16"))
    return choose_attention(config.model.attn_implementation, cuda=cuda, half=half, traits=traits)


def _resume_point(config: TrainConfig, manifest: dict[str, Any]) -> tuple[str | None, list[str]]:
    """The checkpoint to resume from (None: start afresh) and how this run differs from it (accepted
    with --accept-changes, else refused)."""
    from .trainer import checkpoint_folders, saved_checkpoints

    out = Path(config.train.output_dir)
    _check_writable(out)
    checkpoints = checkpoint_folders(out)
    if not config.train.resume:
        if checkpoints and not config.train.overwrite:
            raise ConfigError(f"--output-dir {out} already holds {checkpoints[-1].name}: pass --resume to continue "
                              "that run, --overwrite to start afresh, or choose another --output-dir")
        return None, []
    last = _last_whole(saved_checkpoints(out), out)
    shape = adapter_changes(last, config)
    if shape:
        raise ConfigError(f"--resume: the adapter in {last} has another shape than this run's: {'; '.join(shape)}; "
                          "a checkpoint's weights fit only the adapter they were trained in (--accept-changes "
                          "cannot apply this): resume with its settings, or start a new --output-dir")
    changes = resume_changes(last, config, manifest)
    if changes and not config.train.accept_changes:
        raise ConfigError(f"--resume: this run differs from {last}: {'; '.join(changes)}; resume with the same "
                          "shards and settings, pass --accept-changes to continue with these changes, or start a "
                          "new --output-dir")
    return str(last), changes


def _last_whole(complete: list[Path], out: Path) -> Path:
    """The newest checkpoint whose files are whole (`checkpoint_problem`); a damaged newer one (a write cut
    by a full disk or a kill) is passed over with a warning naming its damaged file."""
    from .trainer import log

    damaged = []
    for folder in reversed(complete):
        problem = checkpoint_problem(folder)
        if problem is None:
            if damaged:
                log.warning(f"Warning: --resume: {damaged[0]}; resuming from {folder}, the last complete checkpoint")
            return folder
        damaged.append(problem)
    if damaged:
        raise ConfigError(f"--resume: no complete checkpoint in {out}: {damaged[0]}; run without --resume "
                          "(--overwrite) to start again")
    raise ConfigError(f"--resume: {out} holds no checkpoint to continue from; run without --resume")


def adapter_changes(checkpoint: Path, config: TrainConfig) -> list[str]:
    """How this run's adapter would differ in shape from the checkpoint's (method, rank, modules trained
    in full: from its adapter_config.json; target modules: from its sfttrain.json, as given)."""
    from .trainer import RUN_FILE

    lc, cfg_file = config.lora, checkpoint / "adapter_config.json"
    saved = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else None
    if (saved is None) != (lc.method == "full"):
        return [f"it trained {'every weight' if saved is None else 'a LoRA adapter'}, this run --method {lc.method}"]
    if saved is None:
        return []
    out = [] if saved.get("r") == lc.r else [f"--lora-r {saved.get('r')} -> {lc.r}"]
    was, now = sorted(saved.get("modules_to_save") or []), sorted(lc.modules_to_save)
    if was != now:
        out.append(f"--modules-to-save {','.join(was) or '(none)'} -> {','.join(now) or '(none)'}")
    try:
        targets = json.loads((checkpoint / RUN_FILE).read_text(encoding="utf-8"))["config"]["lora"]["target_modules"]
    except (OSError, ValueError, KeyError, TypeError):
        return out  # no record of the flag: peft's expanded list cannot be compared with a pattern
    if sorted(targets) != sorted(lc.target_modules):
        out.append(f"--target-modules {','.join(targets)} -> {','.join(lc.target_modules)}")
    return out


# Settings that change nothing the run learns: where things are written, how often, how data is read.
_BOOKKEEPING = {("data", "shards"), ("data", "eval"), ("data", "verify_checksums"), ("model", "tokenizer"),
                ("model", "skip_tokenizer_check"), ("train", "output_dir"), ("train", "resume"),
                ("train", "overwrite"), ("train", "accept_changes"), ("train", "save_steps"),
                ("train", "save_total_limit"), ("train", "logging_steps"), ("train", "eval_steps"),
                ("train", "report_to"), ("train", "dataloader_workers"), ("train", "per_device_eval_batch_size")}


def resume_changes(checkpoint: Path, config: TrainConfig, manifest: dict[str, Any]) -> list[str]:
    """How a run of `config` on the build of `manifest` differs from the one that saved `checkpoint`
    (its sfttrain.json): the build, then each setting that changes what is learnt ("learning_rate
    0.0002 -> 0.001"). A checkpoint without sfttrain.json can vouch for nothing: that is a difference."""
    from .trainer import RUN_FILE

    run = checkpoint / RUN_FILE
    try:
        saved = json.loads(run.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [f"{run} is missing or unreadable, so neither its build nor its settings are known"]
    changes = []
    before, now = saved.get("data", {}).get("build_id"), manifest.get("build_id")
    if before != now:
        changes.append(f"it was trained on build {before}, {config.data.shards} holds build {now}")
    old, new = saved.get("config", {}), config.to_dict()
    for section, fields in new.items():
        for name, value in fields.items():
            was = old.get(section, {}).get(name, value)
            if (section, name) not in _BOOKKEEPING and was != value:
                changes.append(f"{name} {was!r} -> {value!r}")
    return changes


def _check_writable(out: Path) -> None:
    """Refuse an output folder that cannot be created or written, before any model is loaded."""
    probe = out / f".sfttrain-write-test-{os.getpid()}"  # one per rank: ranks check at the same time
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output-dir {out} is not writable ({e.strerror or e}); choose another "
                          "folder or fix its permissions / free space") from None


def _run_info(s: Setup) -> dict[str, Any]:
    return {"config": s.config.to_dict(),
            "data": {"shards": s.config.data.shards, "build_id": s.manifest.get("build_id"),
                     "tokenizer": s.manifest.get("tokenizer"), "template": s.manifest.get("template"),
                     "template_config": (s.manifest.get("config") or {}).get("template")},
            "attention": s.attention.name}


def _describe_method(config: TrainConfig) -> str:
    if config.lora.method == "full":
        return "full fine-tune"
    lc = config.lora
    return (f"LoRA r={lc.r} alpha={lc.alpha:g} dropout={lc.dropout:g} bias={lc.bias} "
            f"targets={','.join(lc.target_modules)}"
            + (f" modules_to_save={','.join(lc.modules_to_save)}" if lc.modules_to_save else ""))


def _quant_kind(config: TrainConfig) -> str:
    """The quantization in words, without importing torch: "4-bit nf4 double-quant", "8-bit (...)", "none"."""
    q = config.quant
    if q.load_in_8bit:
        return "8-bit (bitsandbytes LLM.int8)"
    if q.load_in_4bit:
        return f"4-bit {q.bnb_4bit_quant_type}{' double-quant' if q.bnb_4bit_use_double_quant else ''}"
    return "none"


def _describe_quant(config: TrainConfig) -> str:
    if config.quant.load_in_4bit:
        from .model import compute_dtype

        return f"{_quant_kind(config)}, compute {str(compute_dtype(config)).replace('torch.', '')}"
    return _quant_kind(config)


def _planned_steps(rows: int, config: TrainConfig, world: int) -> int:
    t = config.train
    if t.max_steps > 0:
        return t.max_steps
    batches = -(-(-(-rows // world)) // t.per_device_batch_size)
    per_epoch = max(1, -(-batches // t.gradient_accumulation_steps))
    return math.ceil(per_epoch * t.num_epochs)


def _summary(s: Setup, model, counts: tuple[int, int], isolation: float, args) -> dict[str, Any]:
    from .model import precision_note

    stats = build_stats(s.manifest)
    world = args.world_size
    rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    mean_tokens = stats["tokens"] / max(1, stats["rows"])
    trained = stats["trained_tokens"]
    c = s.config
    return {
        "model": c.model.path,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "method": _describe_method(c),
        "quantization": _describe_quant(c),
        "trainable_params": counts[0],
        "total_params": counts[1],
        "rows": stats["rows"], "tokens": stats["tokens"], "trained_tokens": trained,
        "max_length": stats["max_length"], "packing": stats["packing"],
        "eval_rows": build_stats(s.eval_manifest)["rows"] if s.eval_manifest else None,
        "attention": s.attention.name,
        "precision_warning": precision_note(c),
        "attention_why": s.attention.why,
        "isolation_check": isolation,
        "world_size": world,
        "batch_rows": rows_per_step,
        "batch_tokens": round(rows_per_step * mean_tokens),
        "batch_trained_tokens": round(rows_per_step * trained / max(1, stats["rows"])) if trained is not None else None,
        "steps": _planned_steps(stats["rows"], c, world),
        "output_dir": c.train.output_dir,
        "resume_from": s.resume_from,
        "resume_changes": s.resume_changes,
    }
