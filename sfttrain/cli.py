"""`sfttrain run` and `sfttrain merge`: build a config, call the API, print.

User errors (bad settings, missing or corrupted shards, tokenizer mismatch, no bitsandbytes for 4-bit)
print one message and exit with code 2, without a traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from .attention import IsolationError
from .config import ConfigError, config_from_dict, load_train_yaml

USER_ERRORS = (ConfigError, FileNotFoundError, IsolationError)


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="sftprep", prog_name="sfttrain")
def main() -> None:
    """Train LoRA / QLoRA adapters (or full models) on shards built by `sftprep build`."""


def _flag(name: str, help: str):
    return click.option(f"--{name}/--no-{name}", default=None, help=help)


_OPTIONS = [
    click.option("--model", help="Local base model folder (config.json + weights)."),
    click.option("--output-dir", help="Checkpoints and the final adapter go here."),
    click.option("--tokenizer", help="Tokenizer folder to check and save, when the model folder has none "
                 "[the build's copy, SHARDS/tokenizer/]."),
    click.option("--skip-tokenizer-check", is_flag=True, default=None,
                 help="Train without comparing the shards' tokenizer with the model's (embedding size still checked)."),
    click.option("--eval", "eval_", metavar="DIR", help="Evaluation shards (same tokenizer)."),
    click.option("--lora-r", type=int, help="LoRA rank [16]."),
    click.option("--lora-alpha", type=float, help="LoRA alpha [16]."),
    click.option("--lora-dropout", type=float, help="LoRA dropout [0.05]."),
    click.option("--lora-bias", help="none, all, lora_only [none]."),
    click.option("--target-modules", help="Comma-separated module names, or all-linear [all-linear]."),
    click.option("--modules-to-save", help="Comma-separated modules trained in full, e.g. lm_head,embed_tokens."),
    click.option("--full-finetune", is_flag=True, default=None, help="Train every weight instead of LoRA."),
    _flag("load-in-4bit", "Load the base model in 4 bits (QLoRA; bitsandbytes, CUDA or CPU)."),
    _flag("load-in-8bit", "Load the base model in 8 bits (LLM.int8; bitsandbytes, CUDA or CPU)."),
    click.option("--bnb-4bit-quant-type", help="nf4 or fp4 [nf4]."),
    _flag("bnb-4bit-use-double-quant", "Quantize the quantization constants [on]."),
    click.option("--bnb-4bit-compute-dtype", help="auto, bf16, fp16, fp32 [auto: the training dtype]."),
    click.option("--dtype", help="Weights dtype: auto, bf16, fp16, fp32 [auto]."),
    click.option("--attn-implementation",
                 help="auto, sdpa, eager, varlen (torch varlen_attn), flash_attention_2, flash_attention_3 [auto: "
                      "flash-attn, else torch varlen on a GPU in bf16/fp16; sdpa (eager without it) elsewhere]."),
    _flag("trust-remote-code", "Allow the model folder's own Python code."),
    _flag("bf16", "bf16 mixed precision [on where a CUDA GPU supports it]."),
    _flag("fp16", "fp16 mixed precision."),
    _flag("gradient-checkpointing", "Recompute activations in the backward pass."),
    click.option("--per-device-batch-size", "--per-device-train-batch-size", "per_device_batch_size", type=int,
                 help="Rows per device per micro-batch [1]."),
    click.option("--per-device-eval-batch-size", type=int, help="Rows per device per eval batch."),
    click.option("--gradient-accumulation-steps", type=int, help="Micro-batches per optimizer step [1]."),
    click.option("--learning-rate", type=float, help="Peak learning rate [2e-4]."),
    click.option("--lr-scheduler", "--lr-scheduler-type", "lr_scheduler", help="linear, cosine, constant, ... [cosine]."),
    click.option("--lr-scheduler-kwargs", metavar="JSON",
                 help="Scheduler arguments, e.g. '{\"min_lr_rate\": 0.05}' [min_lr_rate 0.1 for the min_lr "
                      "cosines; num_decay_steps 10% of the steps for warmup_stable_decay]."),
    click.option("--warmup-steps", type=int, help="Warm-up steps [0]."),
    click.option("--max-steps", type=int, help="Optimizer steps; -1 trains --num-epochs [-1]."),
    click.option("--num-epochs", "--num-train-epochs", "num_epochs", type=float,
                 help="Epochs when --max-steps is -1 [1]."),
    click.option("--optim", help="transformers optimizer: adamw_torch, paged_adamw_32bit, ... [adamw_torch]."),
    click.option("--weight-decay", type=float, help="[0]"),
    click.option("--max-grad-norm", type=float, help="Gradient clipping [1.0]."),
    click.option("--eval-steps", type=int, help="Evaluate every N steps (else once at the end)."),
    click.option("--save-steps", type=int, help="Checkpoint every N steps [500]."),
    click.option("--save-total-limit", type=int, help="Keep only the last N checkpoints [2]."),
    click.option("--logging-steps", type=int, help="Log every N steps [10]."),
    click.option("--neftune-alpha", "--neftune-noise-alpha", "neftune_alpha", type=float,
                 help="NEFTune noise alpha (e.g. 5)."),
    click.option("--report-to", help="none, tensorboard, wandb [none]."),
    click.option("--seed", type=int, help="Seed of init, dropout and data order [42]."),
    _flag("shuffle", "Shuffle rows each epoch [on]."),
    _flag("verify-checksums", "Hash every shard (sha256) at start-up [off: footers, rows and columns only; "
                              "`sftprep verify` hashes once]."),
    click.option("--dataloader-workers", type=int, help="Processes reading shards [0]."),
    click.option("--resume", is_flag=True, default=None, help="Continue from the last checkpoint in --output-dir."),
    click.option("--overwrite", is_flag=True, default=None, help="Start afresh in an --output-dir with checkpoints."),
]


def _with_options(f):
    for option in reversed(_OPTIONS):
        f = option(f)
    return f


@main.command()
@click.argument("source", metavar="SHARDS_OR_YAML")
@_with_options
def run(source: str, **flags: Any) -> None:
    """Train on the shards in SHARDS (a `sftprep build` folder), or as set in a YAML file; flags override.
    Paths in the file are relative to the file; paths given as flags, to the working directory."""
    flags["eval"] = flags.pop("eval_")
    if flags.pop("full_finetune"):
        flags["method"] = "full"
    try:
        p = Path(source)
        if p.is_file() and p.suffix.lower() not in (".yaml", ".yml"):
            data, where = {"shards": source}, "command line"  # a data file or a shard: say what to pass
        elif p.is_file():
            data, where = load_train_yaml(p), str(p)
        else:
            data, where = {"shards": source}, "command line"
        config = config_from_dict(data, flags, source=where)
        _run(config)
    except USER_ERRORS as e:
        _fail(e)
    except OSError as e:  # disk full or a folder gone while saving a checkpoint
        _fail(OSError(f"could not write {e.filename or 'the output'}: {e.strerror or e}; free space or "
                      "choose another --output-dir, then continue with --resume"))


def _quiet() -> None:
    """Keep the libraries' progress bars and deprecation notes out of the user's terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _run(config) -> None:
    from rich.console import Console

    from .api import train
    from .progress import RichProgress

    _quiet()
    console = Console(stderr=True)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, one rank speaks
    result = train(config, callbacks=[RichProgress(console)], disable_tqdm=True,
                   on_start=(lambda s: _print_start(console, s)) if main_rank else None)
    if main_rank:
        _print_end(console, result)
    if result.interrupted_by:
        sys.exit(130 if result.interrupted_by == "SIGINT" else 143)


def _print_start(console, s: dict[str, Any]) -> None:
    pct = 100 * s["trainable_params"] / max(1, s["total_params"])
    trained = f", {s['trained_tokens']:,} trained" if s["trained_tokens"] is not None else ""
    lines = [
        ("model", f"{s['model']} ({s['dtype']}, quantization: {s['quantization']})"),
        ("training", f"{s['method']}"),
        ("parameters", f"{s['trainable_params']:,} trainable of {s['total_params']:,} ({pct:.2f}%)"),
        ("data", f"{s['rows']:,} rows, {s['tokens']:,} tokens{trained}; max_length {s['max_length']}, "
                 f"packing {s['packing']}" + (f"; eval {s['eval_rows']:,} rows" if s["eval_rows"] else "")),
        ("attention", f"{s['attention']}" + (f"; {s['attention_why']}" if s.get("attention_why") else "")
                      + ("; one sample per row" if s["isolation_check"] is None else
                         f"; isolation verified: deviation {s['isolation_check']:.1e}")),
        ("batch", f"{s['batch_rows']} rows/step (x{s['world_size']} ranks) = ~{s['batch_tokens']:,} tokens"
                  + (f", ~{s['batch_trained_tokens']:,} trained" if s["batch_trained_tokens"] is not None else "")),
        ("steps", f"{s['steps']:,}" + (f", resuming from {s['resume_from']}" if s["resume_from"] else "")),
        ("output", s["output_dir"]),
    ]
    for k, v in lines:
        console.print(f"[bold]{k:>10}[/bold]  {v}", highlight=False, soft_wrap=True)


def _print_end(console, r) -> None:
    m = r.metrics
    parts = [f"{r.global_step} steps"]
    if r.train_loss is not None:
        parts.append(f"train loss {r.train_loss:.4f}")
    if r.eval_loss is not None:
        parts.append(f"eval loss {r.eval_loss:.4f}")
    if "train_runtime" in m:
        parts.append(f"{m['train_runtime']:.1f}s")
    if m.get("train_tokens_per_s") == m.get("train_tokens_per_s"):  # not NaN
        parts.append(f"{m['train_tokens_per_s']:,.0f} non-pad tokens/s")
    if m.get("trained_tokens_seen"):
        parts.append(f"{m['trained_tokens_seen']:,} trained tokens seen")
    if r.interrupted_by:
        console.print(f"stopped by {r.interrupted_by}: " + ", ".join(parts) + f"; checkpoint saved in {r.checkpoint} "
                      "(continue with --resume)", highlight=False, soft_wrap=True)
    else:
        from .checks import has_tokenizer

        saved = "adapter and tokenizer" if has_tokenizer(r.final_dir) else \
            "adapter (no tokenizer: the model folder has none and neither has the build; pass --tokenizer)"
        console.print("done: " + ", ".join(parts) + f"; {saved} in {r.final_dir}", highlight=False,
                      soft_wrap=True)


@main.command()
@click.argument("adapter", metavar="ADAPTER_DIR")
@click.option("--model", help="Base model folder [the one recorded in the adapter].")
@click.option("--out", required=True, help="Folder for the merged model.")
@click.option("--dtype", default="auto", show_default=True, help="auto, bf16, fp16, fp32.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model folder's own Python code.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
def merge(adapter: str, model: str | None, out: str, dtype: str, trust_remote_code: bool, overwrite: bool) -> None:
    """Fold the LoRA adapter in ADAPTER_DIR into its base model; save model and tokenizer to --out."""
    from .api import merge as merge_adapter

    _quiet()
    try:
        path = merge_adapter(adapter, out, model=model, dtype=dtype, trust_remote_code=trust_remote_code,
                             overwrite=overwrite)
    except USER_ERRORS as e:
        _fail(e)
    from .checks import has_tokenizer

    saved = "model and tokenizer" if has_tokenizer(path) else "model (no tokenizer in the adapter or base model)"
    click.echo(f"merged {adapter} into {model or 'the base model it records'}; {saved} in {path}")


if __name__ == "__main__":
    main()
