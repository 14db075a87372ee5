"""Progress for `sfttrain run` (a `TrainerCallback`): on a terminal, a rich bar with each log as a line
above it; elsewhere (a pipe, a CI log, `nohup`), one plain line per log with step/total and the ETA, since
a bar drawn into a file is cut to 80 columns."""

from __future__ import annotations

import datetime
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

_SHOWN = ("loss", "aux_loss", "mean_token_accuracy", "eval_loss", "eval_aux_loss", "eval_mean_token_accuracy",
          "learning_rate", "grad_norm", "tokens_per_s", "trained_tokens_seen", "epoch")
_WHOLE = ("tokens_per_s", "trained_tokens_seen")  # counts and rates: read as whole numbers


class RichProgress(TrainerCallback):
    """Steps done / planned with the last loss, non-pad tokens/s and trained tokens seen; each log becomes
    one readable line (above the bar on a terminal; with the ETA elsewhere)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task = None
        self.last_loss: float | None = None
        self.last_rate: str = ""
        self.started: tuple[float, int] | None = None  # (time, step) when this run's steps began

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.started = (time.monotonic(), state.global_step)
        if not self.console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, loss="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            loss = (f"loss {self.last_loss:.4f}" if self.last_loss is not None else "") + self.last_rate
            self.progress.update(self.task, completed=state.global_step, loss=loss)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_loss" in logs:  # the end summary
            return
        if "loss" in logs:
            self.last_loss = float(logs["loss"])
            if "tokens_per_s" in logs:
                self.last_rate = (f"  {_fmt(logs['tokens_per_s'], whole=True)} tok/s  "
                                  f"{_fmt(logs.get('trained_tokens_seen', 0), whole=True)} trained tokens")
            self.on_step_end(args, state, control)
        parts = [f"{k} {_fmt(logs[k], whole=k in _WHOLE)}" for k in _SHOWN if k in logs]
        if not parts:
            return
        if self.progress is None:
            parts.append(f"eta {self._eta(state)}")
        line = f"step {state.global_step}/{state.max_steps}: " + ", ".join(parts)
        (self.progress.console if self.progress else self.console).print(line, highlight=False, soft_wrap=True)

    def _eta(self, state) -> str:
        """Time left at the pace of this run's steps so far (H:MM:SS)."""
        if self.started is None or state.global_step <= self.started[1]:
            return "?"
        pace = (time.monotonic() - self.started[0]) / (state.global_step - self.started[1])
        return str(datetime.timedelta(seconds=round(pace * max(0, state.max_steps - state.global_step))))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _fmt(value, whole: bool = False) -> str:
    """Every number one way, with thousands separators: counts and rates (`whole`) and integers rounded,
    the others to 4 decimals, or 3 significant digits below 0.01 (learning rates)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if whole or isinstance(value, int):
        return f"{value:,.0f}"
    return f"{value:.3g}" if 0 < abs(value) < 1e-2 else f"{value:,.4f}"
