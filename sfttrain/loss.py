"""The loss, computed only where it is trained.

A causal LM head turns every position of a (batch, length) row into vocabulary logits, and the
usual loss then upcasts them all to fp32: (B, L, V) twice over, although on chat data most
positions are prompt (label -100) and train nothing. Here the LM head only sees the hidden
states of the positions whose *next* label is trained:

    labels      -100 -100  x1   x2  -100  y1   -100 (pad)
    kept        pos 1 predicts x1, pos 2 predicts x2, pos 4 predicts y1   -> logits (3, V)

`trained_head(model, keep)` installs a forward pre-hook on the model's output embedding that
selects those rows (whatever the model does after its head, e.g. Gemma-2's logit soft-capping,
still applies: it is elementwise). `per_token_loss` then runs the cross-entropy in chunks, each
upcast to fp32 inside a checkpoint, so no fp32 copy of all the logits is ever kept for backward.
Loss and gradients are those of the full-logits computation.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from sftprep.tokenize.labels import IGNORE_INDEX

CHUNK = 4096
"""Positions per cross-entropy chunk: one fp32 chunk of logits lives at a time."""


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): `keep[b, t]` is True where position t predicts a trained label; `targets`
    are those labels in row-major order (the order of `hidden[keep]`)."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[..., :-1] = labels[..., 1:]
    keep = shifted != IGNORE_INDEX
    return keep, shifted[keep]


@contextlib.contextmanager
def trained_head(model, keep: torch.Tensor):
    """While active, the output embedding of `model` computes logits at `keep` positions only
    (its input (B, L, H) becomes (N, H); the model returns (N, V) logits)."""
    head = model.get_output_embeddings()
    if head is None:
        yield
        return

    def select(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("input")
        if hidden is None or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(keep.shape):
            return None  # not the (B, L, H) call we expect: leave it alone
        picked = hidden[keep.to(hidden.device)]
        return ((picked,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "input": picked})

    handle = head.register_forward_pre_hook(select, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_ce_sum(logits: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Summed cross-entropy of (N, V) logits, fp32 one chunk at a time (recomputed in backward)."""
    from torch.utils.checkpoint import checkpoint

    total = logits.new_zeros((), dtype=torch.float32)
    for i in range(0, max(1, logits.shape[0]), chunk):
        part, tgt = logits[i:i + chunk], targets[i:i + chunk].to(logits.device)
        if torch.is_grad_enabled() and part.requires_grad:
            total = total + checkpoint(_ce_sum, part, tgt, use_reentrant=False)
        else:
            total = total + _ce_sum(part, tgt)
    return total


class LossMeter:
    """Summed loss, trained tokens, correct top-1 predictions and real (non-pad) tokens since the
    meter was last taken: per-token eval loss, mean token accuracy and throughput. Counts stay on
    the device until taken (no host sync per micro-batch)."""

    FIELDS = ("loss_sum", "correct", "trained", "real")

    def __init__(self) -> None:
        self.values: dict[str, Any] = dict.fromkeys(self.FIELDS, 0)

    def add(self, logits: torch.Tensor, targets: torch.Tensor, loss_sum: torch.Tensor) -> None:
        with torch.no_grad():
            self.values["loss_sum"] = self.values["loss_sum"] + loss_sum.detach().double()
            self.values["correct"] = self.values["correct"] + (logits.argmax(-1) == targets.to(logits.device)).sum()
            self.values["trained"] = self.values["trained"] + int(targets.numel())

    def add_real(self, tokens: int) -> None:
        self.values["real"] = self.values["real"] + int(tokens)

    def take(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.values.items()}
        self.values = dict.fromkeys(self.FIELDS, 0)
        return out


def per_token_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch=None, meter: LossMeter | None = None,
                   chunk: int = CHUNK) -> torch.Tensor:
    """Summed next-token cross-entropy over trained tokens / trained tokens of the whole step.

    `outputs.logits` are either (N, V), the trained positions only (under `trained_head`), or
    the model's full (B, L, V). `num_items_in_batch` is the Trainer's count of trained tokens
    across every micro-batch of the optimizer step (and across ranks), so a step's gradient is the
    mean over its trained tokens whatever the split into micro-batches. Without it (evaluation),
    the batch's own count is used.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    keep, targets = next_token_targets(labels)
    if logits.dim() == 3:  # the model was called without `trained_head`
        logits = logits[keep.to(logits.device)]
    total = chunked_ce_sum(logits, targets, chunk)
    if meter is not None:
        meter.add(logits, targets, total)
    if num_items_in_batch is None:
        num_items_in_batch = max(1, targets.numel())
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
