"""Training configuration: frozen dataclasses, one per concern, nested under `TrainConfig`.

A YAML file may use the sections (``model: {path: ..., dtype: bf16}``, ``lora: {r: 16}``, ...) or
the flat keys that mirror the command-line flags (``model: path``, ``lora_r: 16``,
``learning_rate: 5e-5``); flags override the file. Unknown keys are errors, with the closest known
key suggested. Every problem found is collected and raised once as a `ConfigError` that names the
flag / YAML key to fix. Nothing here imports torch, so `sfttrain --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sftprep.config import (Alias, Schema, as_tuple, check_choice, did_you_mean, flag, load_yaml,  # noqa: F401
                            make_tree, read_tree, to_plain)
from sftprep.errors import ConfigError

DTYPES = ("auto", "bf16", "fp16", "fp32")
ATTENTION = ("auto", "sdpa", "eager", "varlen", "flash_attention_2", "flash_attention_3")
QUANT_TYPES = ("nf4", "fp4")
LORA_BIAS = ("none", "all", "lora_only")
METHODS = ("lora", "full")
REPORT_TO = ("none", "tensorboard", "wandb")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay")


@dataclass(frozen=True)
class DataConfig:
    """Which shards to train and evaluate on."""

    shards: str | None = None
    """Folder written by `sftprep build` (first argument of `sfttrain run`)."""
    eval: str | None = field(default=None, metadata=flag(metavar="DIR"))
    """Folder of evaluation shards, built with the same tokenizer; default: the build's own validation split,
    when it holds one out (`eval: {fraction: 0.01}` in its recipe) (--eval)."""
    shuffle: bool = True
    """Shuffle rows each epoch (seeded by --seed and the epoch) (--shuffle/--no-shuffle)."""
    verify_checksums: bool = False
    """Run the whole `sftprep verify` at start-up (sha256 of every shard, the shard contract in every row, the
    samples file, the totals), once per machine; start-up then grows with the data. Without it, shards are
    checked by size-independent means (footer, rows, columns) and each row when it is read (--verify-checksums)."""


@dataclass(frozen=True)
class ModelConfig:
    """The base model, loaded from a local folder."""

    path: str | None = field(default=None, metadata=flag(aliases=(Alias("model_name_or_path"),)))
    """Local model folder with config.json and weights (--model)."""
    tokenizer: str | None = None
    """Tokenizer folder, when the model folder has none; default: the build's copy, SHARDS/tokenizer/
    (--tokenizer)."""
    skip_tokenizer_check: bool = False
    """Train without comparing the shards' tokenizer with the model's (or --tokenizer's, or the build's
    copy's), and with a model folder without a tokenizer whose embedding rows outnumber the tokenizer's by
    128 or more; the shards' ids must still fit the model's embeddings (--skip-tokenizer-check)."""
    dtype: str = "auto"
    """Weights dtype: auto (bf16/fp16 when bf16/fp16 mixed precision is on, else fp32), bf16, fp16, fp32 (--dtype)."""
    attn_implementation: str = "auto"
    """auto, sdpa, eager, varlen (torch varlen_attn), flash_attention_2, flash_attention_3; auto: flash-attn,
    else torch varlen on a GPU in bf16/fp16 (torch varlen for chunked attention as Llama-4's); sdpa (eager
    without it) elsewhere and for Falcon, Bloom (--attn-implementation)."""
    trust_remote_code: bool = False
    """Allow the model folder's own Python code (--trust-remote-code)."""


@dataclass(frozen=True)
class QuantConfig:
    """bitsandbytes quantization of the frozen base weights (QLoRA); runs on CUDA and on CPU."""

    load_in_4bit: bool = False
    """Load the base model in 4 bits (QLoRA; bitsandbytes, CUDA or CPU) (--load-in-4bit)."""
    load_in_8bit: bool = False
    """Load the base model in 8 bits (LLM.int8; bitsandbytes, CUDA or CPU) (--load-in-8bit)."""
    bnb_4bit_quant_type: str = "nf4"
    """nf4 or fp4 (--bnb-4bit-quant-type)."""
    bnb_4bit_use_double_quant: bool = True
    """Quantize the quantization constants too (--bnb-4bit-use-double-quant/--no-bnb-4bit-use-double-quant)."""
    bnb_4bit_compute_dtype: str = "auto"
    """dtype of the 4-bit matmuls: auto (the training dtype), bf16, fp16, fp32 (--bnb-4bit-compute-dtype)."""


@dataclass(frozen=True)
class LoraConfig:
    """What is trained: LoRA adapters (peft) or every weight."""

    method: str = field(default="lora", metadata=flag(choices=METHODS, aliases=(
        Alias("full_finetune", lambda v: "full" if v else "lora", bool, "Train every weight instead of LoRA."),)))
    """lora, or full for full fine-tuning (--full-finetune)."""
    r: int = 16
    """LoRA rank (--lora-r)."""
    alpha: float = 16
    """LoRA scaling numerator (--lora-alpha)."""
    dropout: float = 0.05
    """Dropout on the LoRA input (--lora-dropout)."""
    bias: str = "none"
    """Which biases train: none, all, lora_only (--lora-bias)."""
    target_modules: tuple[str, ...] = ("all-linear",)
    """Module names that get adapters, or all-linear: every linear layer but the LM head and a MoE model's
    routers/gates; fused expert weights are not linear layers (--target-modules, comma separated)."""
    modules_to_save: tuple[str, ...] = ()
    """Modules trained in full and saved with the adapter, e.g. lm_head,embed_tokens (--modules-to-save)."""


@dataclass(frozen=True)
class LoopConfig:
    """The training loop (handed to `transformers.TrainingArguments`)."""

    output_dir: str | None = None
    """Checkpoints and the final adapter go here (--output-dir)."""
    per_device_batch_size: int = field(default=1, metadata=flag(aliases=(Alias("per_device_train_batch_size"),)))
    """Rows per device per micro-batch (--per-device-batch-size)."""
    per_device_eval_batch_size: int | None = None
    """Rows per device per eval batch; default: the training one (--per-device-eval-batch-size)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (--gradient-accumulation-steps)."""
    learning_rate: float = 2e-4
    """Peak learning rate (--learning-rate)."""
    lr_scheduler: str = field(default="cosine", metadata=flag(aliases=(Alias("lr_scheduler_type"),)))
    """linear, cosine, constant, constant_with_warmup, ... (--lr-scheduler)."""
    lr_scheduler_kwargs: dict = field(default_factory=dict, metadata=flag(metavar="JSON"))
    """Extra arguments of the scheduler, a mapping (YAML) or JSON (flag). Defaults filled in: min_lr_rate 0.1
    for cosine_with_min_lr / cosine_warmup_with_min_lr; num_decay_steps (10% of the steps) for
    warmup_stable_decay (--lr-scheduler-kwargs '{"min_lr_rate": 0.05}')."""
    warmup_steps: int = 0
    """Linear warm-up steps (--warmup-steps)."""
    max_steps: int = -1
    """Optimizer steps; -1 trains --num-epochs epochs (--max-steps)."""
    num_epochs: float = field(default=1.0, metadata=flag(aliases=(Alias("num_train_epochs"),)))
    """Epochs, when --max-steps is -1 (--num-epochs)."""
    optim: str = "adamw_torch"
    """Any `transformers` optimizer name: adamw_torch, paged_adamw_32bit, paged_adamw_8bit, ... (--optim)."""
    weight_decay: float = 0.0
    """Weight decay of the optimizer (--weight-decay)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (--max-grad-norm)."""
    bf16: bool | None = None
    """bf16 mixed precision; unset: on where a CUDA GPU supports bf16 and --fp16 is off (--bf16/--no-bf16)."""
    fp16: bool = False
    """fp16 mixed precision (--fp16)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (--gradient-checkpointing)."""
    neftune_alpha: float | None = field(default=None, metadata=flag(aliases=(Alias("neftune_noise_alpha"),)))
    """NEFTune noise on the input embeddings while training (--neftune-alpha)."""
    eval_steps: int | None = None
    """Evaluate every N steps (needs --eval, or a build with a validation split); without it, once at the end
    (--eval-steps)."""
    save_steps: int = 500
    """Save a checkpoint (adapter, tokenizer, optimizer, data position) every N steps (--save-steps)."""
    save_total_limit: int | None = 2
    """Keep only the last N checkpoints; null in YAML keeps every one (--save-total-limit)."""
    logging_steps: int = 10
    """Log loss and learning rate every N steps (--logging-steps)."""
    report_to: str = "none"
    """none, tensorboard or wandb (--report-to)."""
    seed: int = 42
    """Seed of weights init, dropout and data order (--seed)."""
    resume: bool = False
    """Continue from the last checkpoint in --output-dir (--resume)."""
    overwrite: bool = False
    """Start afresh in an --output-dir that already holds checkpoints (--overwrite)."""
    accept_changes: bool = False
    """With --resume: continue although the last checkpoint was trained on another build, or with other
    settings (learning rate, batch size, seed, steps, LoRA, ...); the differences are printed, then applied
    (--accept-changes)."""
    dataloader_workers: int = 0
    """Worker processes reading shards (--dataloader-workers)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything `sfttrain run` needs; saved whole next to every checkpoint."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        problems = _check(self)
        if problems:
            raise ConfigError.listing("training config", problems)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> "TrainConfig":
        """Same as `config_from_dict`: flat keys (`model`, `lora_r`, ...) or sections."""
        return config_from_dict(data, overrides)

    @property
    def quantized(self) -> bool:
        return self.quant.load_in_4bit or self.quant.load_in_8bit


def _check(c: TrainConfig) -> list[str]:
    p: list[str] = []

    def choice(value: Any, allowed: tuple[str, ...], flag: str) -> None:
        check_choice(p, f"{flag} ", value, allowed)

    def at_least(value: Any, low: float, flag: str) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
            p.append(f"{flag} {value!r} must be a number >= {low}")

    if not c.data.shards:
        p.append("no shards: give the folder written by `sftprep build` (sfttrain run SHARDS) or `shards:` in the YAML")
    if not c.model.path:
        p.append("no model: give --model PATH (a local folder with config.json and weights)")
    if not c.train.output_dir:
        p.append("no output folder: give --output-dir DIR")
    choice(c.model.dtype, DTYPES, "--dtype")
    choice(c.model.attn_implementation, ATTENTION, "--attn-implementation")
    choice(c.quant.bnb_4bit_quant_type, QUANT_TYPES, "--bnb-4bit-quant-type")
    choice(c.quant.bnb_4bit_compute_dtype, DTYPES, "--bnb-4bit-compute-dtype")
    choice(c.lora.method, METHODS, "method")
    choice(c.lora.bias, LORA_BIAS, "--lora-bias")
    choice(c.train.report_to, REPORT_TO, "--report-to")
    choice(c.train.lr_scheduler, SCHEDULERS, "--lr-scheduler")
    if c.quant.load_in_4bit and c.quant.load_in_8bit:
        p.append("--load-in-4bit and --load-in-8bit exclude each other: pick one")
    if c.quantized and c.lora.method == "full":
        p.append("--full-finetune cannot train quantized weights: drop --load-in-4bit/--load-in-8bit, "
                 "or train LoRA adapters (QLoRA)")
    if c.train.bf16 and c.train.fp16:
        p.append("--bf16 and --fp16 exclude each other: pick one")
    if c.lora.method == "lora":
        at_least(c.lora.r, 1, "--lora-r")
        if not isinstance(c.lora.alpha, (int, float)) or c.lora.alpha <= 0:
            p.append(f"--lora-alpha {c.lora.alpha!r} must be a positive number")
        if not isinstance(c.lora.dropout, (int, float)) or not 0 <= c.lora.dropout < 1:
            p.append(f"--lora-dropout {c.lora.dropout!r} must be in [0, 1)")
        if not c.lora.target_modules:
            p.append("--target-modules is empty: give module names (q_proj,v_proj) or all-linear")
    t = c.train
    at_least(t.per_device_batch_size, 1, "--per-device-batch-size")
    at_least(t.gradient_accumulation_steps, 1, "--gradient-accumulation-steps")
    at_least(t.warmup_steps, 0, "--warmup-steps")
    at_least(t.save_steps, 1, "--save-steps")
    at_least(t.logging_steps, 1, "--logging-steps")
    at_least(t.dataloader_workers, 0, "--dataloader-workers")
    at_least(t.weight_decay, 0, "--weight-decay")
    at_least(t.max_grad_norm, 0, "--max-grad-norm")
    if t.per_device_eval_batch_size is not None:
        at_least(t.per_device_eval_batch_size, 1, "--per-device-eval-batch-size")
    if t.save_total_limit is not None:
        at_least(t.save_total_limit, 1, "--save-total-limit")
    if not isinstance(t.learning_rate, (int, float)) or t.learning_rate <= 0:
        p.append(f"--learning-rate {t.learning_rate!r} must be a positive number")
    if not isinstance(t.max_steps, int) or isinstance(t.max_steps, bool) or (t.max_steps < 1 and t.max_steps != -1):
        p.append(f"--max-steps {t.max_steps!r} must be a positive integer (or -1 to train --num-epochs)")
    if t.max_steps == -1 and (not isinstance(t.num_epochs, (int, float)) or t.num_epochs <= 0):
        p.append(f"--num-epochs {t.num_epochs!r} must be positive when --max-steps is not set")
    if t.neftune_alpha is not None and (not isinstance(t.neftune_alpha, (int, float)) or t.neftune_alpha <= 0):
        p.append(f"--neftune-alpha {t.neftune_alpha!r} must be a positive number")
    if t.eval_steps is not None:
        at_least(t.eval_steps, 1, "--eval-steps")  # and evaluation shards: `api.check_inputs`, once the build is read
    if not isinstance(t.lr_scheduler_kwargs, Mapping):
        p.append(f"--lr-scheduler-kwargs {t.lr_scheduler_kwargs!r} must be a mapping, e.g. '{{\"min_lr_rate\": 0.1}}'")
    if t.accept_changes and not t.resume:
        p.append("--accept-changes applies to --resume only: add --resume, or drop --accept-changes")
    if t.resume and t.overwrite:
        p.append("--resume and --overwrite exclude each other: continue the run, or start it afresh")
    return p


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "quant": QuantConfig, "lora": LoraConfig,
             "train": LoopConfig}

# Flat YAML keys and CLI override names -> (section, field). Every dataclass field is reachable by
# its own name, except where the flat name says which section it belongs to (lora_r, model, ...).
SHORTCUTS: dict[str, tuple[str, str]] = {
    **{f.name: (s, f.name) for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)
       if s not in ("lora", "model")},
    "model": ("model", "path"),
    "tokenizer": ("model", "tokenizer"),
    "skip_tokenizer_check": ("model", "skip_tokenizer_check"),
    "dtype": ("model", "dtype"),
    "attn_implementation": ("model", "attn_implementation"),
    "trust_remote_code": ("model", "trust_remote_code"),
    "method": ("lora", "method"),
    "lora_r": ("lora", "r"),
    "lora_alpha": ("lora", "alpha"),
    "lora_dropout": ("lora", "dropout"),
    "lora_bias": ("lora", "bias"),
    "target_modules": ("lora", "target_modules"),
    "modules_to_save": ("lora", "modules_to_save"),
}
_TUPLES = {("lora", "target_modules"), ("lora", "modules_to_save")}
# The names TRL / transformers users type are declared next to their fields (`Alias`); configs keep ours.
TRAIN_SCHEMA = Schema("training", TrainConfig, _SECTIONS, SHORTCUTS, scalars={"model": "path"})


def config_from_dict(data: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None,
                     source: str = "config") -> TrainConfig:
    """Build a `TrainConfig` from a YAML-shaped dict, then apply overrides (flat keys, None = unset).

    `model` may be a string (the model folder) or a mapping (the `model` section). Comma-separated
    strings are accepted for `target_modules` and `modules_to_save`.

    Raises:
        ConfigError: unknown keys (with the closest known key) or invalid values, all listed at once.
    """
    sections, _ = read_tree(TRAIN_SCHEMA, data, overrides, source)
    kwargs = sections["train"].get("lr_scheduler_kwargs")
    if isinstance(kwargs, str):
        try:
            sections["train"]["lr_scheduler_kwargs"] = json.loads(kwargs) if kwargs.strip() else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"--lr-scheduler-kwargs is not valid JSON ({e}): {kwargs!r}") from None
    for section, name in _TUPLES:
        if name in sections[section]:
            sections[section][name] = as_tuple(sections[section][name], split=",")
    for section, name in TRAIN_PATHS:
        if isinstance(sections[section].get(name), Path):
            sections[section][name] = str(sections[section][name])
    return make_tree(TRAIN_SCHEMA, sections, {})


TRAIN_PATHS = {("data", "shards"), ("data", "eval"), ("model", "path"), ("model", "tokenizer"),
               ("train", "output_dir")}
"""The training settings that are paths: in a YAML file, relative to the file."""


def load_train_yaml(path: str | Path) -> dict[str, Any]:
    """`load_yaml`, with the paths in it (shards, eval, model, tokenizer, output_dir) made relative to
    the file."""
    from sftprep.config import paths_from_file

    return paths_from_file(load_yaml(path), path, SHORTCUTS, TRAIN_PATHS)
