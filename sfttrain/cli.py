"""`sfttrain run` and `sfttrain merge`: build a config, call the API, print.

User errors (`sftprep.errors.USER_ERRORS`: bad settings, missing or corrupted shards, tokenizer
mismatch, no bitsandbytes for 4-bit) print one `Error: ...` line, as `sftprep` does, and exit with
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from sftprep.cli import fail as _fail
from sftprep.cli import setting_options, with_options
from sftprep.errors import USER_ERRORS

from .api import check_inputs
from .config import TRAIN_SCHEMA, ModelConfig, config_from_dict, load_train_yaml


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="sftprep", prog_name="sfttrain")
def main() -> None:
    """Train LoRA / QLoRA adapters (or full models) on shards built by `sftprep build`."""


@main.command()
@click.argument("source", metavar="SHARDS_OR_YAML")
@with_options(setting_options(TRAIN_SCHEMA, skip=("shards",)))  # SHARDS is the argument
def run(source: str, **flags: Any) -> None:
    """Train on the shards in SHARDS (a `sftprep build` folder), or as set in a YAML file; flags override.
    Paths in the file are relative to the file; paths given as flags, to the working directory."""
    try:
        p = Path(source)
        if p.is_file() and p.suffix.lower() not in (".yaml", ".yml"):
            data, where = {"shards": source}, "command line"  # a data file or a shard: say what to pass
        elif p.is_file():
            data, where = load_train_yaml(p), str(p)
        else:
            data, where = {"shards": source}, "command line"
        config = config_from_dict(data, flags, source=where)
        check_inputs(config)  # a mistake in the folders is answered before torch is imported (seconds)
        _run(config)
    except USER_ERRORS as e:
        _fail(e)
    except OSError as e:  # disk full or a folder gone while saving a checkpoint
        _fail(OSError(f"could not write {e.filename or 'the output'}: {e.strerror or e}; free space or "
                      "choose another --output-dir, then continue with --resume"))


def _quiet(quantized: bool = False) -> None:
    """Keep the libraries' progress bars and deprecation notes out of the user's terminal; and, unless
    the run is quantized, bitsandbytes' note that an optional CPU 4-bit kernel failed to download (it
    speaks whenever peft imports it, even when no weight is quantized)."""
    if not quantized:
        logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_cpu_kernel_note)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _not_the_cpu_kernel_note(record: logging.LogRecord) -> bool:
    return "gemm_4bit_forward" not in str(record.msg)


def _run(config) -> None:
    from rich.console import Console

    from .api import train
    from .progress import RichProgress

    _quiet(config.quantized)
    console = Console(stderr=True)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, one rank speaks
    result = None
    try:
        result = train(config, callbacks=[RichProgress(console)], disable_tqdm=True,
                       on_start=(lambda s: _print_start(console, s)) if main_rank else None)
    finally:
        _leave_process_group(finished=result is not None)
    if main_rank:
        _print_end(console, result)
    if result.interrupted_by:
        sys.exit(130 if result.interrupted_by == "SIGINT" else 143)


def _leave_process_group(finished: bool) -> None:
    """Under torchrun, close the job's process group while the interpreter is whole. Left to the
    interpreter's exit, gloo's threads are torn down with it and a rank can abort ("terminate called
    without an active exception") after its last step, failing a run that finished. The group outlives
    `destroy_process_group` while the finished Trainer's DDP wrapper (freed only by the garbage
    collector: the Trainer holds cycles) still references it, so: every rank done, the wrapper
    collected, then the group destroyed, its threads joined here. (A rank that failed waits for no other.)"""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def _print_start(console, s: dict[str, Any]) -> None:
    pct = 100 * s["trainable_params"] / max(1, s["total_params"])
    trained = f", {s['trained_tokens']:,} trained" if s["trained_tokens"] is not None else ""
    lines = [
        ("model", f"{s['model']} ({s['dtype']}, quantization: {s['quantization']})"),
        ("training", f"{s['method']}" + (f"; + router aux loss x {s['router_aux_coef']:g} (the model's "
                                           "output_router_logits)" if s.get("router_aux_coef") else "")),
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
    if s.get("targets_note"):
        lines.insert(2, ("targets", s["targets_note"]))
    if s.get("precision_warning"):
        lines.append(("precision", s["precision_warning"]))
    if s.get("resume_changes"):
        lines.append(("changed", "; ".join(s["resume_changes"]) + " (--accept-changes: applied)"))
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
@click.option("--dtype", default=ModelConfig.dtype, show_default=True, help="auto, bf16, fp16, fp32.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model folder's own Python code.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
def merge(adapter: str, model: str | None, out: str, dtype: str, trust_remote_code: bool, overwrite: bool) -> None:
    """Fold the LoRA adapter in ADAPTER_DIR into its base model (one trained on a 4-/8-bit base: into that base, dequantized); save model and tokenizer to --out."""
    from .api import check_merge, merge_base
    from .api import merge as merge_adapter

    try:
        check_merge(adapter, out, model, dtype, overwrite)  # a mistake is answered before torch is imported
        _quiet()
        path = merge_adapter(adapter, out, model=model, dtype=dtype, trust_remote_code=trust_remote_code,
                             overwrite=overwrite)
    except USER_ERRORS as e:
        _fail(e)
    from .checks import has_tokenizer

    saved = "model and tokenizer" if has_tokenizer(path) else "model (no tokenizer in the adapter or base model)"
    click.echo(f"merged {adapter} into {merge_base(adapter)} ({model or 'the base model it records'}); {saved} "
               f"in {path}")


if __name__ == "__main__":
    main()
