"""The loss, computed only where it is trained.

A causal LM head turns every position of a (batch, length) row into vocabulary logits, and the
usual loss then upcasts them all to fp32: (B, L, V) twice over, although on chat data most
positions are prompt (label -100) and train nothing. Here the LM head only sees the hidden
states of the positions whose *next* label is trained:

    labels      -100 -100  x1   x2  -100  y1   -100 (pad)
    kept        pos 1 predicts x1, pos 2 predicts x2, pos 4 predicts y1   -> logits (3, V)

`trained_head(model, keep)` installs a forward pre-hook on the model's output embedding that
keeps those rows' hidden states (N, H) and lets the model's own head see only the first of them.
`per_token_loss` then runs head + cross-entropy over the N rows in chunks, each inside a
checkpoint, so at most one chunk of logits exists at a time, in training and in eval alike:

    chunk rows = LOGITS_BUDGET / (4 bytes x vocabulary)      256 MiB: 2,097 rows at 32k, 519 at 129k

What the model does after its head (Gemma-2's soft-capping, Cohere's logit scale, Granite's
logit scaling) is applied by `logit_transform`, read from the config; every call compares the
model's own logits for its first row with ours, so a family whose head does something else is
refused in one line instead of training on wrong logits. Loss and gradients are those of the
full-logits computation.

A MoE model whose config sets `output_router_logits` adds its routers' load-balancing loss to the
language-model loss, `router_aux_loss_coef x aux`, in its own forward; `RouterLoss` adds the same
term, computed by the model's own `load_balancing_loss_func` over the batch's real tokens:

    one micro-batch    loss = CE summed / trained tokens of the step + coef x aux(real tokens)
                       = the model's forward with labels on the same tokens (pads left out)
    one step           the aux term is the mean over its micro-batches and ranks

so a packed row's aux loss is the model's own over that row (the balance of the row's tokens, not
a sum over its samples), a sample alone in a padded row gets the aux loss of that sample alone,
and the term's weight does not grow with gradient accumulation or processes (transformers' Trainer
with the model's own loss sums it over micro-batches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Any, Callable

import torch

from sftprep.errors import ConfigError
from sftprep.tokenize.labels import IGNORE_INDEX

LOGITS_BUDGET = 256 << 20
"""Bytes of fp32 logits one loss chunk may hold, whatever the vocabulary."""

CHECK_ROWS = 1
"""Rows the model's own head computes on every call, to check `logit_transform` against."""


def chunk_rows(vocab_size: int, budget: int = LOGITS_BUDGET) -> int:
    """Positions per loss chunk such that one chunk of fp32 logits stays within `budget` bytes."""
    return max(1, budget // (4 * max(1, vocab_size)))


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): `keep[b, t]` is True where position t predicts a trained label; `targets`
    are those labels in row-major order (the order of `hidden[keep]`)."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[..., :-1] = labels[..., 1:]
    keep = shifted != IGNORE_INDEX
    return keep, shifted[keep]


def logit_transform(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the model's forward does to its head's output before returning the logits (elementwise):
    scaling (Cohere `logit_scale`, Granite `logits_scaling`, `output_multiplier`) then tanh soft-capping."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None) if getattr(text, "model_type", "").startswith("cohere") else None
    scale = scale or getattr(text, "output_multiplier", None)
    divide = getattr(text, "logits_scaling", None)
    cap = getattr(text, "final_logit_softcapping", None) or getattr(text, "logits_soft_cap", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
    return transform


@dataclasses.dataclass
class TrainedHead:
    """The hidden states of the trained positions (N, H), caught at the model's output embedding,
    and how to turn a chunk of them into the model's logits."""

    head: Any
    transform: Callable[[torch.Tensor], torch.Tensor]
    model_type: str = "?"
    hidden: torch.Tensor | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform(self.head(hidden))

    def check(self, model_logits: torch.Tensor) -> None:
        """The model's own logits for the first rows equal ours, or a clear refusal."""
        if self.hidden is None or not len(model_logits):
            return
        with torch.no_grad():
            ours = self.logits(self.hidden[:len(model_logits)]).float()
            theirs = model_logits.float()
            if not torch.isfinite(theirs).all():
                return  # diverged weights: the step's non-finite loss is reported (trainer.check_step)
            if not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * (1 + float(theirs.abs().max()))):
                raise ConfigError(
                    f"the logits of this {self.model_type} model are not its LM head's output (max difference "
                    f"{float((ours - theirs).abs().max()):.3g}): the model transforms them in a way sfttrain's "
                    "memory-bounded loss does not know (training on would use wrong logits); please report the model type")


@contextlib.contextmanager
def trained_head(model, keep: torch.Tensor):
    """While active, the output embedding of `model` catches the hidden states at `keep` positions
    (its input (B, L, H) becomes (N, H), kept in the yielded `TrainedHead`) and computes logits for
    the first `CHECK_ROWS` of them only: the model returns (<= CHECK_ROWS, V) logits."""
    head = model.get_output_embeddings()
    if head is None:
        yield None
        return
    caught = TrainedHead(head, logit_transform(model.config), getattr(model.config, "model_type", "?"))

    def select(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("input")
        if hidden is None or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(keep.shape):
            return None  # not the (B, L, H) call we expect: leave it alone
        caught.hidden = hidden[keep.to(hidden.device)]
        picked = caught.hidden[:CHECK_ROWS]
        return ((picked,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "input": picked})

    handle = head.register_forward_pre_hook(select, with_kwargs=True)
    try:
        yield caught
    finally:
        handle.remove()


def _ce_chunk(logits_of: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor,
              targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed fp32 cross-entropy, correct top-1 predictions) of one chunk of rows."""
    logits = logits_of(rows)
    ce = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce, (logits.detach().argmax(-1) == targets).sum()


def chunked_ce_sum(rows: torch.Tensor, targets: torch.Tensor, chunk: int,
                   logits_of: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, correct predictions) over N `rows`: hidden states turned into logits by
    `logits_of`, or logits already. One chunk of logits at a time, recomputed in backward."""
    from torch.utils.checkpoint import checkpoint

    total = rows.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=rows.device)
    for i in range(0, max(1, rows.shape[0]), chunk):
        part, tgt = rows[i:i + chunk], targets[i:i + chunk].to(rows.device)
        if torch.is_grad_enabled():
            ce, right = checkpoint(_ce_chunk, logits_of, part, tgt, use_reentrant=False)
        else:
            ce, right = _ce_chunk(logits_of, part, tgt)
        total, correct = total + ce, correct + right
    return total, correct


@dataclasses.dataclass(frozen=True)
class RouterLoss:
    """The router load-balancing loss a MoE model's forward adds to its loss (see the module docstring)."""

    coef: float
    balance: Callable[..., torch.Tensor]
    """The model's own `load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)`."""
    num_experts: int
    top_k: int

    def __call__(self, outputs: Any, real: torch.Tensor | None = None) -> torch.Tensor | None:
        """The aux loss of `outputs.router_logits` over the tokens where `real` (batch, length) is True."""
        logits = outputs.get("router_logits") if isinstance(outputs, dict) else None  # a ModelOutput is a dict
        if not logits:
            return None
        aux = self.balance(tuple(logits), self.num_experts, self.top_k, real)
        return aux if torch.is_tensor(aux) else None


def router_loss(model) -> RouterLoss | None:
    """`RouterLoss` of `model` (peft-wrapped or not) when its forward adds a router aux loss, else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if not getattr(config, "output_router_logits", False):
        return None
    balance = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
    coef = getattr(base, "router_aux_loss_coef", getattr(config, "router_aux_loss_coef", None))
    experts = getattr(base, "num_experts", None)
    top_k = getattr(base, "num_experts_per_tok", None)
    if balance is None or None in (coef, experts, top_k):
        return None
    return RouterLoss(float(coef), balance, int(experts), int(top_k))


class LossMeter:
    """Summed loss, trained tokens, correct top-1 predictions, real (non-pad) tokens and router aux
    losses (summed, and the micro-batches that had one) since the meter was last taken: per-token
    eval loss, mean token accuracy, throughput and mean aux loss. Counts stay on the device until
    taken (no host sync per micro-batch)."""

    FIELDS = ("loss_sum", "correct", "trained", "real", "aux_sum", "aux_batches")

    def __init__(self) -> None:
        self.values: dict[str, Any] = dict.fromkeys(self.FIELDS, 0)

    def add(self, correct: torch.Tensor, targets: torch.Tensor, loss_sum: torch.Tensor) -> None:
        with torch.no_grad():
            self.values["loss_sum"] = self.values["loss_sum"] + loss_sum.detach().double()
            self.values["correct"] = self.values["correct"] + correct
            self.values["trained"] = self.values["trained"] + int(targets.numel())

    def add_aux(self, aux: torch.Tensor) -> None:
        self.values["aux_sum"] = self.values["aux_sum"] + aux.detach().double()
        self.values["aux_batches"] = self.values["aux_batches"] + 1

    def add_real(self, tokens: int) -> None:
        self.values["real"] = self.values["real"] + int(tokens)

    def take(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.values.items()}
        self.values = dict.fromkeys(self.FIELDS, 0)
        return out


def per_token_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch=None, meter: LossMeter | None = None,
                   head: TrainedHead | None = None, chunk: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy over trained tokens / trained tokens of the whole step.

    With `head` (from `trained_head`), the logits are computed here from its hidden states, one
    chunk at a time; otherwise `outputs.logits` are the model's full (B, L, V) (or (N, V)).
    `chunk` (positions) defaults to `chunk_rows` of the vocabulary. `num_items_in_batch` is the
    Trainer's count of trained tokens across every micro-batch of the optimizer step (and across
    ranks), so a step's gradient is the mean over its trained tokens whatever the split into
    micro-batches. Without it (evaluation), the batch's own count is used.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    keep, targets = next_token_targets(labels)
    chunk = chunk or chunk_rows(logits.shape[-1])
    if head is not None and head.hidden is not None:
        head.check(logits)
        total, correct = chunked_ce_sum(head.hidden, targets, chunk, head.logits)
    else:
        if logits.dim() == 3:  # the model was called without `trained_head`
            logits = logits[keep.to(logits.device)]
        total, correct = chunked_ce_sum(logits, targets, chunk)
    if meter is not None:
        meter.add(correct, targets, total)
    if num_items_in_batch is None:
        num_items_in_batch = max(1, targets.numel())
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
