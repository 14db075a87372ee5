"""Sample-isolated attention for packed rows: pick the path, build its inputs, prove it isolates.

A packed row holds several samples (`seq_lens`); a token may attend only to earlier tokens of its
own sample. Two paths keep that promise:

    varlen      flash-attention (CUDA, flash_attn installed, bf16/fp16): the rows of a batch are
                flattened into one padding-free sequence and the kernel gets the sample boundaries
                (`cu_seq_lens_q/k`, `max_length_q/k`, and position ids restarting at 0).
    block mask  sdpa or eager (any device): a 4-D block-diagonal causal mask, built from the
                segment ids of the row; padding is its own segment, so it never touches a sample
                (and never leaves a query row with nothing to attend to, which would give NaNs).

        tokens      a a a a b b b p p          (two samples, two pads)
        positions   0 1 2 3 0 1 2 0 1
        mask        a attends a (causally), b attends b, p attends p

`check_isolation` runs the loaded model on a packed probe row and refuses to train when the
output for the second sample depends on the first: a model whose own code ignores the mask (some
`trust_remote_code` models do) is caught before a GPU hour is spent, never silently.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np

from .config import ConfigError

IGNORE_INDEX = -100


class IsolationError(ValueError):
    """The model attends across packed samples with the chosen attention path."""


@dataclass(frozen=True)
class AttentionPath:
    """How packed rows are fed to the model so that samples never see each other."""

    impl: str
    """`attn_implementation` handed to `from_pretrained`: sdpa, eager, flash_attention_2/3."""
    mode: str
    """varlen (flattened rows + cu_seq_lens) or block_mask (4-D block-diagonal mask)."""
    mask_kind: str = "bool"
    """block_mask only: bool (True = attend; sdpa) or additive (0 / -inf floats; eager)."""

    @property
    def name(self) -> str:
        if self.mode == "varlen":
            return f"{self.impl} varlen (rows flattened, cu_seqlens from seq_lens, no padding)"
        return f"{self.impl} + block-diagonal causal mask from seq_lens ({self.mask_kind})"


def flash_available(impl: str = "flash_attention_2") -> bool:
    module = "flash_attn_interface" if impl == "flash_attention_3" else "flash_attn"
    return importlib.util.find_spec(module) is not None


def choose_attention(requested: str, *, cuda: bool, half: bool) -> AttentionPath:
    """The sample-isolated path for `requested` (a `--attn-implementation` value).

    Args:
        requested: auto, sdpa, eager, flash_attention_2 or flash_attention_3.
        cuda: a CUDA device will run the model.
        half: the model computes in bf16/fp16 (flash-attention needs it).

    Raises:
        ConfigError: flash-attention was asked for but cannot run here.
    """
    if requested == "auto":
        if cuda and half and flash_available("flash_attention_2"):
            return AttentionPath("flash_attention_2", "varlen")
        return AttentionPath("sdpa", "block_mask", "bool")
    if requested in ("flash_attention_2", "flash_attention_3"):
        why = []
        if not flash_available(requested):
            why.append("the flash-attn package is not installed" if requested == "flash_attention_2"
                       else "flash-attention 3 (flash_attn_interface) is not installed")
        if not cuda:
            why.append("no CUDA GPU is visible")
        if not half:
            why.append("it needs bf16 or fp16 (add --bf16)")
        if why:
            raise ConfigError(f"--attn-implementation {requested} cannot run here: {'; '.join(why)}. "
                              "Use --attn-implementation auto (sdpa with a block-diagonal mask)")
        return AttentionPath(requested, "varlen")
    if requested == "eager":
        return AttentionPath("eager", "block_mask", "additive")
    return AttentionPath("sdpa", "block_mask", "bool")


# -- pure helpers: seq_lens -> positions / segments / masks ----------------------------------------

def positions_and_segments(seq_lens: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Position ids (restarting at 0 per sample) and segment ids (sample index, -1 for padding)
    of one row of `length` tokens whose samples have lengths `seq_lens`."""
    used = int(np.sum(seq_lens))
    if used > length:
        raise ValueError(f"seq_lens sum to {used} tokens but the row holds {length}")
    positions = np.empty(length, dtype=np.int64)
    segments = np.full(length, -1, dtype=np.int64)
    start = 0
    for k, n in enumerate(np.asarray(seq_lens, dtype=np.int64)):
        positions[start:start + n] = np.arange(n)
        segments[start:start + n] = k
        start += n
    positions[start:] = np.arange(length - start)  # padding counts as one more sequence
    return positions, segments


def block_diagonal_mask(segments, kind: str = "bool", dtype=None):
    """A `(batch, 1, L, L)` causal mask confined to equal segment ids.

    Args:
        segments: `(batch, L)` integer tensor of segment ids.
        kind: bool (True where attention is allowed) or additive (0 allowed, dtype-min elsewhere).
        dtype: float dtype of an additive mask.
    """
    import torch

    length = segments.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    allowed = allowed[:, None]
    if kind == "bool":
        return allowed
    dtype = dtype or torch.float32
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


# -- the proof ---------------------------------------------------------------------------------

def check_isolation(model, collator, vocab_size: int, tolerance: float | None = None) -> float:
    """Refuse a model/path pair that lets one packed sample see another.

    Runs the model on three probe rows, [A B], [A' B] and [B] (A' = A with other tokens), and
    compares the logits on B. With isolation they agree to float noise; with cross-sample
    attention (or positions that do not restart) they do not.

    Returns:
        The larger mean absolute change of B's logits, relative to their mean magnitude.

    Raises:
        IsolationError: the difference exceeds `tolerance`.
    """
    import torch

    gen = np.random.default_rng(0)
    high = max(4, min(vocab_size, 1000))
    a, a2, b = (gen.integers(3, high, size=n).astype(np.int32) for n in (7, 7, 5))

    def row(*parts):
        ids = np.concatenate(parts)
        lab = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
        return {"input_ids": ids, "labels": lab, "seq_lens": np.array([len(p) for p in parts], np.int32)}

    device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logits = []
        with torch.no_grad():
            for r, offset in ((row(a, b), len(a)), (row(a2, b), len(a2)), (row(b), 0)):
                batch = collator([r])
                batch.pop("labels")
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                out = model(**batch, use_cache=False)
                logits.append(out.logits[0, offset:offset + len(b)].float())
    finally:
        model.train(was_training)
    # Mean absolute change relative to the mean logit: float noise of a 16-bit or quantized model stays
    # around 1e-3..1e-2 while attending across samples moves the logits by their own size.
    scale = logits[2].abs().mean().clamp_min(1e-6)
    diff = max(float((logits[0] - logits[2]).abs().mean() / scale),
               float((logits[1] - logits[2]).abs().mean() / scale))
    if tolerance is None:
        tolerance = 1e-4 if _param_dtype(model) == torch.float32 else 5e-2
    if not diff <= tolerance:
        raise IsolationError(
            f"packed samples are not isolated with attention path `{collator.attention.name}`: the logits of "
            f"a sample change by {diff:.3g} (relative; tolerance {tolerance:g}) when the sample packed before "
            "it changes: this model's code ignores the attention mask or the position ids (some trust_remote_code "
            "models do). Try another --attn-implementation, or rebuild the shards with `--packing none`")
    return diff


def _param_dtype(model):
    return next(p for p in model.parameters() if p.is_floating_point()).dtype
