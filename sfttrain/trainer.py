"""The `transformers.Trainer` wiring: our sampler and collator, per-token loss, signals, saving.

    ShardDataset --EpochSampler (seed, epoch)--> DataLoader --accelerate.prepare--> batches dealt to ranks
        --PackedCollator--> input_ids, labels, position_ids --model--> LM head at trained positions only
        --per_token_loss--> loss per trained token (and accuracy, tokens/s in every log)

Everything that Trainer already does well (optimizers, schedulers, gradient accumulation,
checkpoints, logging, distributed, NEFTune, gradient checkpointing) is left to it; this module
only plugs in what it cannot know about packed shards, through its public hooks: the
`compute_loss_func` argument, `get_train_dataloader`, `compute_loss`, `log`, `evaluation_loop` and
callbacks (`SetSamplerEpoch`, `StopOnSignal`, `CheckGradients`, `ApplyLearningRate`), `save_model`,
which writes sfttrain.json into every checkpoint before the Trainer's trainer_state.json (a checkpoint
`--resume` can use always says which build and settings it was trained with), and `_save_checkpoint`,
whose failed writes (`saving`) leave no half checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from sftprep.errors import UserError

from .attention import REAL_TOKENS
from .config import ConfigError, TrainConfig, did_you_mean
from .data import EpochSampler
from .loss import LossMeter, next_token_targets, per_token_loss, router_loss, trained_head
from .model import bf16_on

RUN_FILE = "sfttrain.json"
log = logging.getLogger("sfttrain")


class TrainingDiverged(UserError, ArithmeticError):
    """A loss or gradient became NaN or infinite: training stopped before that step changed the weights."""


class CheckpointNotSaved(UserError, OSError):
    """Writing a checkpoint or the final adapter failed (disk full, quota, a file-size limit: torch's zip
    writer says `unexpected pos`, not ENOSPC); the half-written folder was removed."""


class ShardTrainer(Trainer):
    """Trainer with the epoch-seeded `EpochSampler` over memory-mapped shards, the
    loss at trained positions only, per-token eval loss, and in every training log: mean token
    accuracy, non-pad tokens/s, and tokens / trained tokens seen since the run began."""

    def __init__(self, *args, shuffle: bool = True, run_info: dict[str, Any] | None = None, **kwargs) -> None:
        self._shuffle = shuffle
        self.run_info = run_info
        self._sampler: EpochSampler | None = None
        self.meter, self.eval_meter = LossMeter(), LossMeter()
        self.seen: dict[str, float] | None = None  # cumulative, across ranks; restored from the log history
        self._since = time.perf_counter()
        self._step_losses: list[torch.Tensor] = []  # this optimizer step's micro-batch losses (no sync)
        self._warned_frozen = False
        self._head = None  # the trained positions' hidden states, caught during compute_loss (loss.py)
        super().__init__(*args, compute_loss_func=self._loss, **kwargs)
        self.router = router_loss(self.model)  # a MoE model's load-balancing loss, or None
        self.add_callback(SetSamplerEpoch(self))
        self.add_callback(CheckGradients(self))

    def _loss(self, outputs, labels, num_items_in_batch=None):
        meter = self.meter if self.model.training else self.eval_meter
        return per_token_loss(outputs, labels, num_items_in_batch, meter=meter, head=self._head)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's own, with the LM head computed at trained positions only, plus a MoE model's
        router aux loss over the real tokens (see `loss.py`)."""
        real = inputs.pop(REAL_TOKENS, None)
        if real is not None and model.training:
            self.meter.add_real(int(real))
        keep, _ = next_token_targets(inputs["labels"])
        with trained_head(self.accelerator.unwrap_model(model), keep) as self._head:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        aux = self._aux_loss(outputs, real, tuple(keep.shape))
        if aux is not None:
            (self.meter if model.training else self.eval_meter).add_aux(aux)
            if model.training:  # the step's mean over its micro-batches (and, through DDP's average, ranks)
                loss = loss + self.router.coef * aux.to(loss.device) / self.args.gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss

    def _aux_loss(self, outputs, real, shape: tuple[int, int]):
        """The router aux loss of this batch's real tokens (None for a model without one)."""
        if self.router is None:
            return None
        per_row = getattr(real, "per_row", None)
        mask = real.mask(shape[1]) if per_row is not None and len(per_row) == shape[0] else None
        return self.router(outputs, mask)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's, then sfttrain.json beside the weights: a checkpoint saves its model first and
        trainer_state.json last, so a checkpoint that `--resume` accepts always holds its run info."""
        super().save_model(output_dir, _internal_call)
        if self.run_info is not None and self.is_world_process_zero():
            write_run_info(output_dir or self.args.output_dir, self.run_info)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's, with any failure to write it one `CheckpointNotSaved` line, and the half-written
        checkpoint-N removed (`--resume` then takes the last complete one, which is left as it was)."""
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        with saving(folder, self.args.output_dir, self.is_world_process_zero()):
            super()._save_checkpoint(model, trial)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_losses.append(loss.detach())
        return loss

    def check_step(self, step: int) -> None:
        """Before optimizer step `step` changes the weights: a non-finite loss or gradient raises
        `TrainingDiverged` (the Trainer's log would hide it: it replaces a NaN loss by the mean so far);
        every gradient 0 while the loss is not is a dead optimizer, warned about once."""
        grads = [p.grad.detach() for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        largest = torch.nn.utils.get_total_norm(grads, norm_type=math.inf).item() if grads else 0.0  # fused, one sync
        loss = torch.stack(self._step_losses).sum().item() if self._step_losses else 0.0
        self._step_losses.clear()
        lr = f"--learning-rate {self.args.learning_rate:g}"
        if not (math.isfinite(loss) and math.isfinite(largest)):
            what = f"the loss is {loss}" if not math.isfinite(loss) else f"a gradient is {largest}"
            last = saved_checkpoints(self.args.output_dir)
            keep = (f"the last good checkpoint is {last[-1]} (continue with --resume --accept-changes and a lower "
                    "--learning-rate)" if last else "no checkpoint was saved: start again with a lower --learning-rate")
            raise TrainingDiverged(f"step {step}: {what} with {lr}: training stopped before this step changed the "
                                   f"weights, no adapter saved; {keep}")
        if largest == 0.0 and loss > 0.0 and not self._warned_frozen:
            self._warned_frozen = True
            log.warning(f"Warning: step {step}: every gradient is 0 while the loss is {loss:.4g}: the optimizer can no "
                        f"longer move the weights and the loss stays frozen ({lr} is likely too high: the "
                        "activations saturated); stop the run and lower --learning-rate")

    def _reduced(self, meter: LossMeter) -> dict[str, float]:
        """The meter's counts summed over ranks (a collective: every rank calls it at the same point)."""
        values = meter.take()
        if self.args.world_size > 1:
            t = torch.tensor([values[k] for k in LossMeter.FIELDS], dtype=torch.float64, device=self.args.device)
            values = dict(zip(LossMeter.FIELDS, self.accelerator.reduce(t, reduction="sum").tolist()))
        return values

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log (not eval, not the end summary)
            logs.update(self.take_throughput())
        super().log(logs, *args, **kwargs)

    def take_throughput(self) -> dict[str, float]:
        """Mean token accuracy, non-pad tokens/s since the last log, tokens and trained tokens seen."""
        values, now = self._reduced(self.meter), time.perf_counter()
        if self.seen is None:
            last = [h for h in self.state.log_history if "trained_tokens_seen" in h]
            self.seen = {"tokens": last[-1]["tokens_seen"] if last else 0,
                         "trained": last[-1]["trained_tokens_seen"] if last else 0}
            self.seen_at_start = dict(self.seen)
        self.seen["tokens"] += int(values["real"])
        self.seen["trained"] += int(values["trained"])
        out = {"tokens_per_s": values["real"] / max(now - self._since, 1e-9),
               "tokens_seen": self.seen["tokens"], "trained_tokens_seen": self.seen["trained"]}
        if values["trained"]:
            out["mean_token_accuracy"] = values["correct"] / values["trained"]
        if values["aux_batches"]:
            out["aux_loss"] = values["aux_sum"] / values["aux_batches"]
        self._since = now
        return out

    def run_totals(self, runtime: float) -> dict[str, float]:
        """After `train()`: tokens seen in all, and this run's non-pad tokens per second."""
        self.take_throughput()  # count the steps after the last log
        ran = self.seen["tokens"] - self.seen_at_start["tokens"]
        return {"tokens_seen": self.seen["tokens"], "trained_tokens_seen": self.seen["trained"],
                "train_tokens_per_s": ran / runtime if runtime > 0 else float("nan")}

    def evaluation_loop(self, *args, **kwargs):
        """The eval loss per trained token over the whole eval set (not a mean of batch means)."""
        self.eval_meter.take()
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        values = self._reduced(self.eval_meter)
        if values["trained"]:
            output.metrics[f"{prefix}_loss"] = values["loss_sum"] / values["trained"]
            output.metrics[f"{prefix}_mean_token_accuracy"] = values["correct"] / values["trained"]
            output.metrics[f"{prefix}_trained_tokens"] = int(values["trained"])
        if values["aux_batches"]:
            output.metrics[f"{prefix}_aux_loss"] = values["aux_sum"] / values["aux_batches"]
        return output

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """Our loader: the rows in `EpochSampler` order, the same on every rank; accelerate's `prepare`
        deals its batches out to the ranks (its documented job), so each rank trains disjoint rows.
        `SetSamplerEpoch` reshuffles it at each epoch, resumed ones included."""
        args, workers = self.args, self.args.dataloader_num_workers
        self._sampler = EpochSampler(len(self.train_dataset), seed=args.seed, shuffle=self._shuffle)
        loader = torch.utils.data.DataLoader(
            self.train_dataset, batch_size=args.train_batch_size, sampler=self._sampler,
            collate_fn=self.data_collator, num_workers=workers, pin_memory=args.dataloader_pin_memory,
            drop_last=args.dataloader_drop_last, persistent_workers=workers > 0 and args.dataloader_persistent_workers,
            prefetch_factor=args.dataloader_prefetch_factor if workers > 0 else None)
        return self.accelerator.prepare(loader)


class SetSamplerEpoch(TrainerCallback):
    """At each epoch's start, the epoch `EpochSampler` shuffles for: `int(state.epoch)`, which a
    resumed run restores from its checkpoint (a public hook, whatever wraps the dataloader)."""

    def __init__(self, trainer: ShardTrainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.trainer._sampler is not None:
            self.trainer._sampler.set_epoch(int(state.epoch or 0))
        return control


class CheckGradients(TrainerCallback):
    """Runs `ShardTrainer.check_step` before every optimizer step (on every rank: the gradients are
    the synchronised ones, so every rank stops together)."""

    def __init__(self, trainer: ShardTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.check_step(state.global_step + 1)
        return control


class ApplyLearningRate(TrainerCallback):
    """On a resume with --accept-changes: the checkpoint's optimizer and scheduler carry the old peak
    learning rate (they would silently keep it); this sets the new one, at the schedule's current point."""

    def __init__(self, learning_rate: float) -> None:
        self.learning_rate = learning_rate

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        lambdas = getattr(lr_scheduler, "lr_lambdas", None)  # transformers' schedules are LambdaLR
        for i, group in enumerate(optimizer.param_groups):
            group["initial_lr"] = self.learning_rate
            group["lr"] = self.learning_rate * (lambdas[i](lr_scheduler.last_epoch) if lambdas else 1.0)
        if hasattr(lr_scheduler, "base_lrs"):
            lr_scheduler.base_lrs = [self.learning_rate] * len(optimizer.param_groups)
            lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        return control


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The checkpoint-N folders in `output_dir`, oldest step first (complete or not)."""
    out = Path(output_dir)
    found = [p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()] if out.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def saved_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints (trainer_state.json, the Trainer's last write) in `output_dir`, oldest first."""
    return [p for p in checkpoint_folders(output_dir) if (p / "trainer_state.json").is_file()]


class StopOnSignal(TrainerCallback):
    """SIGTERM/SIGINT: finish the current optimizer step, save a checkpoint, stop.

    A second signal restores the previous handler and re-delivers the signal (stop at once).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                return

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


@contextmanager
def saving(folder: Path, output_dir: str | Path, main_process: bool = True) -> Iterator[None]:
    """Write `folder` (a checkpoint or the final adapter) whole or not at all: any error while the block
    writes it removes the folder and becomes one `CheckpointNotSaved` line naming it, the reason, the
    last complete checkpoint and how to continue."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 (OSError, torch's RuntimeError, safetensors' and tokenizers' own)
        if main_process:
            shutil.rmtree(folder, ignore_errors=True)
        last = saved_checkpoints(output_dir)
        keep = (f"the last complete checkpoint, {last[-1]}, is intact: free space (or raise the quota / file-size "
                "limit), then continue with --resume" if last else "no checkpoint was saved: free space (or raise "
                "the quota / file-size limit) and run again, or choose another --output-dir")
        raise CheckpointNotSaved(f"could not save {folder} ({_reason(e)}); it was removed; {keep}") from None


def _reason(e: Exception) -> str:
    """A write error in one line: an OSError's own words and file; else the last line of the library's message
    (torch's zip writer on a full disk: `[enforce fail at inline_container.cc:...] . unexpected pos 8768 vs 8662`)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    last = (str(e).strip().splitlines() or [""])[-1]
    return f"{type(e).__name__}: {last}: the disk may be full, over quota or past a file-size limit"


def write_run_info(folder: str | Path, info: dict[str, Any]) -> None:
    """sfttrain.json (config, build id, attention path), written whole or not at all (temp file, renamed)."""
    path = Path(folder, RUN_FILE)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(info, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def training_arguments(config: TrainConfig, *, has_eval: bool, disable_tqdm: bool,
                       planned_steps: int = 1) -> TrainingArguments:
    """`TrainingArguments` from our config; an unknown --optim becomes a ConfigError."""
    from transformers.training_args import OptimizerNames

    t = config.train
    known = [o.value for o in OptimizerNames]
    if t.optim not in known:
        raise ConfigError(f"--optim {t.optim!r} is not a transformers optimizer{did_you_mean(t.optim, known)}; "
                          "e.g. adamw_torch, paged_adamw_32bit, paged_adamw_8bit, adafactor")
    checkpointing = "activation_checkpointing" if any(
        f.name == "activation_checkpointing" for f in dataclasses.fields(TrainingArguments)) else "gradient_checkpointing"
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and not all(os.environ.get(k) for k in ("RANK", "MASTER_ADDR", "MASTER_PORT")):
        check_world(1)  # a launcher's variables half set: no process group can form
    try:
        args = _arguments(config, checkpointing, has_eval, disable_tqdm, planned_steps)
    except ValueError as e:  # a combination TrainingArguments refuses (e.g. bf16 on hardware without it)
        raise ConfigError(f"invalid training settings: {e}") from None
    check_world(args.world_size)
    return args


def check_world(joined: int) -> None:
    """Refuse a launcher's WORLD_SIZE > 1 that formed no process group: every process would train
    the same rows alone, into the same folder."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and joined != launched:
        raise ConfigError(f"WORLD_SIZE={launched} is set but this process joined a job of {joined} (no process "
                          "group formed): each process would train the same rows alone. Launch with `torchrun "
                          "--nproc_per_node N sfttrain run ...` or `accelerate launch`, or unset WORLD_SIZE")


def scheduler_kwargs(name: str, given: dict[str, Any], planned_steps: int) -> dict[str, Any]:
    """The scheduler's arguments: `given`, plus the ones `name` cannot start without."""
    kwargs = dict(given)
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr") and not {"min_lr", "min_lr_rate"} & set(kwargs):
        kwargs["min_lr_rate"] = 0.1
    if name == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
        kwargs["num_decay_steps"] = max(1, planned_steps // 10)
    return kwargs


def _arguments(config: TrainConfig, checkpointing: str, has_eval: bool, disable_tqdm: bool,
               planned_steps: int) -> TrainingArguments:
    t = config.train
    return TrainingArguments(
        output_dir=t.output_dir,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size or t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        lr_scheduler_kwargs=scheduler_kwargs(t.lr_scheduler, t.lr_scheduler_kwargs, planned_steps),
        warmup_steps=t.warmup_steps,
        max_steps=t.max_steps,
        num_train_epochs=t.num_epochs,
        optim=t.optim,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=bf16_on(config),
        fp16=t.fp16,
        **{checkpointing: t.gradient_checkpointing,  # renamed activation_checkpointing in transformers 5.x
           f"{checkpointing}_kwargs": {"use_reentrant": False} if t.gradient_checkpointing else None},
        neftune_noise_alpha=t.neftune_alpha,
        eval_strategy="steps" if has_eval and t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        report_to=t.report_to,
        seed=t.seed,
        data_seed=t.seed,
        dataloader_num_workers=t.dataloader_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # on CPU, ranks under torchrun form one gloo job (not N copies)
        remove_unused_columns=False,  # our collator's keys (position_ids, cu_seq_lens) are all used
        include_num_input_tokens_seen="all",
        prediction_loss_only=True,  # evaluation needs the loss only: no logits are gathered
        disable_tqdm=disable_tqdm,
        use_cache=False,
    )
