"""Packed rows, trained exactly as their samples would be alone.

A packed row holds several samples (`seq_lens`); a token may attend only to the tokens its own
sample would let it see alone: earlier tokens of the same sample, within the model's sliding
window where it has one, with its soft-capping, GQA and whatever else the model's code does. We
never build a mask of our own (a dense mask overrides the model's: transformers then skips the
sliding window). Two paths keep the promise:

    positions   sdpa or eager (any device): rows padded to the longest in the batch, no
                attention mask, position ids restarting at 0 per sample. transformers detects
                the restarts (`find_packed_sequence_indices`) and builds the packed mask itself,
                with the model's window.
    varlen      CUDA: rows flattened into one padding-free sequence; the kernel gets the sample
                boundaries (`cu_seq_lens_q/k` from `seq_lens`) and never materialises a mask:
                flash-attention when installed, else PyTorch's own
                `torch.nn.attention.varlen.varlen_attn` (window and GQA included), registered with
                transformers' `AttentionInterface` as `sfttrain_varlen`.

        tokens      a a a a b b b p p          (two samples, two pads)
        positions   0 1 2 3 0 1 2 0 1          (padding counts as one more sequence)
        attends     a: a (causally, within the window), b: b, p: p

Chunked attention (Llama-4: a token sees only its own chunk of `attention_chunk_size` tokens)
lives in transformers' mask alone: on the positions path transformers counts the chunks from each
sample's restarting positions; `sfttrain_varlen` cuts each sample into chunks (more `cu_seqlens`)
on the layers that chunk; flash-attention would drop them, so such models never get it. Models
whose transformers class takes no registered attention function (Falcon, Bloom) take the positions
path.

`check_isolation` runs the loaded model on packed probe rows whose second sample is longer than
the model's window and chunk and starts hundreds of tokens into its row, and refuses to train when
its output differs from the same sample run alone: a model whose code ignores the position ids
(Bloom, OPT, some `trust_remote_code` models), a path that drops the window or the chunks, or a
bias that depends on where a sample starts (Falcon's ALiBi, which transformers computes in bf16:
exact only for positions below 256) is caught before a GPU hour is spent.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from sftprep.errors import UserError
from sftprep.tokenize.labels import IGNORE_INDEX  # noqa: F401 (re-exported: the one definition)

from .config import ConfigError
REAL_TOKENS = "num_real_tokens"
"""Batch key: tokens that are not padding (for throughput); the Trainer pops it before the model."""
VARLEN = "sfttrain_varlen"
"""The name `torch.nn.attention.varlen` is registered under in transformers' `AttentionInterface`."""


class IsolationError(UserError, ValueError):
    """The model attends across packed samples with the chosen attention path."""


@dataclass(frozen=True)
class AttentionPath:
    """How packed rows are fed to the model so that samples never see each other."""

    impl: str
    """`attn_implementation` handed to `from_pretrained`: sdpa, eager, flash_attention_2/3, sfttrain_varlen."""
    mode: str
    """positions (padded rows, restarting position ids, no mask) or varlen (flattened rows + cu_seq_lens)."""
    why: str = ""
    """Why this path was chosen (printed at start-up)."""

    @property
    def name(self) -> str:
        if self.mode == "varlen":
            kernel = "torch varlen_attn" if self.impl == VARLEN else self.impl
            return f"{kernel} varlen (rows flattened, cu_seqlens from seq_lens, no padding, no mask)"
        return f"{self.impl} + packed mask built by transformers from restarting position ids (window-aware)"


def flash_available(impl: str = "flash_attention_2") -> bool:
    module = "flash_attn_interface" if impl == "flash_attention_3" else "flash_attn"
    return importlib.util.find_spec(module) is not None


def torch_varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def model_traits(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """What of a model's config.json decides the attention path: sliding windows, attention chunks,
    soft-capping, ALiBi, and whether its transformers class has an sdpa implementation, takes a
    registered attention function (`attention_backend`) and position ids at all (`position_ids`)."""
    cfgs = [model_cfg, model_cfg.get("text_config") or {}]
    windows = [c["sliding_window"] for c in cfgs if _window_used(c)]
    chunks = [c["attention_chunk_size"] for c in cfgs if _chunk_used(c)]
    softcap = any(c.get("attn_logit_softcapping") for c in cfgs)
    alibi = any(c.get("alibi") is True for c in cfgs)  # Falcon's flag
    cls = _causal_lm_class(model_cfg)
    return {"model_type": model_cfg.get("model_type"), "window": min(windows) if windows else None,
            "chunk": min(chunks) if chunks else None, "softcap": bool(softcap), "alibi": alibi,
            "sdpa": bool(getattr(cls, "_supports_sdpa", True)),
            "attention_backend": _takes_attention_functions(cls),
            "position_ids": cls is None or "position_ids" in inspect.signature(cls.forward).parameters}


def _window_used(c: dict[str, Any]) -> bool:
    """A sliding window some layer applies (Qwen2 configs carry one with `use_sliding_window: false`)."""
    window = c.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0 or c.get("use_sliding_window") is False:
        return False
    layer_types = c.get("layer_types")
    return not layer_types or "sliding_attention" in layer_types


def _chunk_used(c: dict[str, Any]) -> bool:
    """Chunked attention some layer applies (Llama-4: `attention_chunk_size` on its "chunked_attention" layers)."""
    chunk = c.get("attention_chunk_size")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0:
        return False
    layer_types = c.get("layer_types")
    return not layer_types or "chunked_attention" in layer_types


def _causal_lm_class(model_cfg: dict[str, Any]):
    """transformers' causal-LM class for the config's model type (None: unknown, e.g. remote code)."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_cfg.get("model_type"))
        return getattr(transformers, name) if isinstance(name, str) else None
    except (ImportError, AttributeError):
        return None


def _takes_attention_functions(cls) -> bool:
    """Whether transformers' class runs the attention function registered under its `attn_implementation`
    (Falcon and Bloom have their own classes: Falcon fails on an unknown name, Bloom ignores it). The flag
    `_supports_attention_backend` is not set on every class that does (StableLM), so its code is read too."""
    if cls is None or getattr(cls, "_supports_attention_backend", False):
        return True
    try:
        source = inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        return True
    return "ALL_ATTENTION_FUNCTIONS" in source


def _varlen_obstacles(t: dict[str, Any], kernel: str) -> list[str]:
    """Why the varlen `kernel` (sfttrain_varlen, or a flash-attention one) cannot run a model of traits `t` exactly."""
    why = []
    if kernel != VARLEN and t.get("chunk"):
        why.append(f"the model uses chunked attention (attention_chunk_size {t['chunk']}), which lives in "
                   "transformers' mask and flash-attention never applies (sfttrain's varlen path does)")
    if kernel == VARLEN and t.get("softcap"):
        why.append("the model soft-caps attention logits, which torch varlen_attn cannot")
    if kernel == VARLEN and t.get("attention_backend") is False:
        why.append(f"transformers' {t.get('model_type')} class takes no registered attention function")
    return why


ALIBI_EXACT = 256
"""Row positions below which the ALiBi bias transformers computes in bf16 for Falcon is exact."""


def check_packed_rows(traits: dict[str, Any], shared: bool, max_length: int | None) -> None:
    """Refuse packed rows that no attention path trains exactly for this model, before it loads: a model
    whose forward takes no position ids (Bloom, MPT, state-space models) cannot be told where a sample
    starts; Falcon with ALiBi computes its bias in bf16 from the position in the row, so that past position
    256 a packed sample's bias differs from its bias alone (in a bf16 run the probe's tolerance hides both).

    Raises:
        ConfigError: with the fix (one sample per row, or rows that end before the bias goes inexact).
    """
    if shared and traits.get("position_ids") is False:
        raise ConfigError(
            f"{traits.get('model_type')} models take no position ids, so nothing tells them where a packed sample "
            "starts: its tokens would attend to the samples before it. Rebuild the shards one sample per row: "
            "`sftprep build ... --packing none --overwrite`")
    if traits.get("alibi") and shared and (max_length is None or max_length > ALIBI_EXACT):
        raise ConfigError(
            f"{traits.get('model_type')} with ALiBi (alibi: true) cannot train packed rows of {max_length} tokens "
            f"exactly: transformers computes its position bias in bf16 from where a token sits in the row, exact for "
            f"the first {ALIBI_EXACT} positions only, so a sample packed after them would train differently from "
            "alone. Rebuild the shards one sample per row: `sftprep build ... --packing none --overwrite` (or "
            f"--max-length {ALIBI_EXACT})")


def choose_attention(requested: str, *, cuda: bool, half: bool, traits: dict[str, Any] | None = None) -> AttentionPath:
    """The sample-isolated path for `requested` (a `--attn-implementation` value).

    Args:
        requested: auto, sdpa, eager, varlen, flash_attention_2 or flash_attention_3.
        cuda: a CUDA device will run the model.
        half: the model computes in bf16/fp16 (the varlen kernels need it).
        traits: `model_traits` of the model's config (window, soft-capping, sdpa support).

    Raises:
        ConfigError: a path was asked for that cannot run here or cannot run this model exactly.
    """
    t = traits or {}
    dense = "eager" if t.get("sdpa") is False else "sdpa"
    dense_why = ("the model's transformers class has no sdpa path" if dense == "eager" else "")
    if requested == "auto":
        if not cuda:
            return AttentionPath(dense, "positions", dense_why or "no CUDA GPU: the varlen kernels are CUDA-only")
        if not half:
            return AttentionPath(dense, "positions", dense_why or "fp32 weights: the varlen kernels need bf16/fp16")
        flash = flash_available("flash_attention_2")
        not_flash = _varlen_obstacles(t, "flash_attention_2")
        if flash and not not_flash:
            return AttentionPath("flash_attention_2", "varlen", "CUDA + half precision + flash-attn installed")
        if torch_varlen_available() and not _varlen_obstacles(t, VARLEN):
            return AttentionPath(VARLEN, "varlen", "CUDA + half precision; " + (
                f"torch.nn.attention.varlen, not flash-attn: {'; '.join(not_flash)}" if flash
                else "flash-attn not installed, torch.nn.attention.varlen is"))
        why = "; ".join(_varlen_obstacles(t, VARLEN)) or "neither flash-attn nor torch.nn.attention.varlen is available"
        return AttentionPath(dense, "positions", dense_why or why)
    if requested in ("flash_attention_2", "flash_attention_3", "varlen"):
        return _explicit_varlen(requested, cuda, half, t)
    if requested == "sdpa" and t.get("sdpa") is False:
        raise ConfigError(f"--attn-implementation sdpa: transformers has no sdpa path for {t.get('model_type')} "
                          "models; use --attn-implementation eager (or auto, which picks it)")
    return AttentionPath(requested, "positions", "asked for with --attn-implementation")


def _explicit_varlen(requested: str, cuda: bool, half: bool, t: dict[str, Any]) -> AttentionPath:
    why = []
    if requested == "varlen":
        if not torch_varlen_available():
            why.append("this torch has no torch.nn.attention.varlen (PyTorch >= 2.10 needed)")
        why.extend(_varlen_obstacles(t, VARLEN))
        if cuda and not half:
            why.append("it needs bf16 or fp16 on a GPU (add --bf16)")
        if why:
            raise ConfigError(f"--attn-implementation varlen cannot run here: {'; '.join(why)}. "
                              "Use --attn-implementation auto")
        return AttentionPath(VARLEN, "varlen", "asked for with --attn-implementation" +
                             ("" if cuda else " (no CUDA GPU: a slow per-sample reference kernel runs instead)"))
    why.extend(_varlen_obstacles(t, requested))
    if not flash_available(requested):
        why.append("the flash-attn package is not installed" if requested == "flash_attention_2"
                   else "flash-attention 3 (flash_attn_interface) is not installed")
    if not cuda:
        why.append("no CUDA GPU is visible")
    if not half:
        why.append("it needs bf16 or fp16 (add --bf16)")
    if why:
        raise ConfigError(f"--attn-implementation {requested} cannot run here: {'; '.join(why)}. "
                          "Use --attn-implementation auto (sdpa with a packed mask from position ids)")
    return AttentionPath(requested, "varlen", "asked for with --attn-implementation")


# -- the varlen attention function ---------------------------------------------------------------

def register_varlen() -> None:
    """Make `attn_implementation="sfttrain_varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)


def varlen_attention_forward(module, query, key, value, attention_mask=None, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, **kwargs):
    """transformers attention function over flattened rows: `query` (1, Hq, T, D), samples delimited
    by `cu_seq_lens_q` (or, without them, by the restarts of `position_ids`).

    Returns:
        (output of shape (1, T, Hq, D), None), as transformers' attention functions do.
    """
    import torch

    if softcap is not None:
        raise ConfigError("sfttrain_varlen cannot soft-cap attention logits; use --attn-implementation eager")
    if kwargs.get("s_aux") is not None:
        raise ConfigError("sfttrain_varlen cannot apply this model's attention sinks; use --attn-implementation auto "
                          "or eager")
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError("sfttrain_varlen takes flattened rows without padding, not a padding mask")
    batch = query.shape[0]
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        cu, max_len = _cu_from_positions(kwargs.get("position_ids"), batch, query.shape[2], query.device)
    else:
        max_len = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
    chunk = layer_chunk(module)
    if chunk:
        cu, max_len = split_into_chunks(cu, chunk), min(max_len, chunk)
    q, k, v = (x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3]) for x in (query, key, value))
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    gqa = q.shape[1] != k.shape[1]
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        dtype = q.dtype
        if dtype == torch.float32:  # the kernel runs in half precision only
            q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
        out = varlen_attn(q, k, v, cu.to(torch.int32), cu.to(torch.int32), max_len, max_len, scale=scaling,
                          window_size=window, enable_gqa=gqa).to(dtype)
    else:
        out = reference_varlen(q, k, v, cu, scale=scaling, window=window[0])
    return out.reshape(batch, -1, out.shape[1], out.shape[2]), None


def layer_chunk(module) -> int | None:
    """The attention chunk of this layer (Llama-4's "chunked_attention" layers), else None."""
    config, index = getattr(module, "config", None), getattr(module, "layer_idx", None)
    types = getattr(config, "layer_types", None)
    if index is None or not types or index >= len(types) or types[index] != "chunked_attention":
        return None
    return getattr(config, "attention_chunk_size", None)


def split_into_chunks(cu, chunk: int):
    """Sample boundaries `cu` with every sample cut into chunks of `chunk` tokens from its own start: a
    token of a chunked layer attends within its chunk only, which the varlen kernel gets as sequences."""
    import torch

    ends = cu.tolist()
    bounds = [start for a, b in zip(ends[:-1], ends[1:]) for start in range(a, b, chunk)] + [ends[-1]]
    return torch.tensor(bounds, dtype=cu.dtype, device=cu.device)


def _cu_from_positions(position_ids, batch: int, length: int, device):
    import torch

    if position_ids is None or batch > 1:  # each row one sequence
        cu = torch.arange(0, (batch + 1) * length, length, device=device, dtype=torch.int32)
        return cu, length
    starts = torch.nonzero(position_ids.reshape(-1)[1:] - position_ids.reshape(-1)[:-1] != 1).reshape(-1) + 1
    bounds = torch.cat([starts.new_zeros(1), starts, starts.new_tensor([length])]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def reference_varlen(q, k, v, cu, scale: float | None = None, window: int = -1):
    """What `varlen_attn` computes, one sample at a time with SDPA (CPU; for tests and CPU runs).

    Args:
        q, k, v: (T, H, D) flattened tokens; k/v may have fewer heads (GQA).
        cu: cumulative sample lengths, (N + 1,).
        window: tokens to the left a query may see besides itself; -1 for all.
    """
    import torch
    import torch.nn.functional as F

    outs = []
    groups = q.shape[1] // k.shape[1]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))  # (H, n, D)
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        n = b - a
        i = torch.arange(n, device=q.device)
        allowed = i[None, :] <= i[:, None]
        if window >= 0:
            allowed &= i[None, :] >= i[:, None] - window
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale).transpose(0, 1))
    return torch.cat(outs, 0)


# -- the proof ---------------------------------------------------------------------------------

PROBE_OFFSET = 509
"""Where the probe's second sample starts in its row (when the build's rows are that long): past 256,
where bf16 stops holding every integer position (an ALiBi bias computed in bf16 then depends on the
offset), and odd, so no multiple of a window or chunk."""


def probe_lengths(window: int | None, max_length: int | None, chunk: int | None = None) -> tuple[int, int]:
    """Lengths of the probe's two samples: the second longer than the model's window and chunk wherever
    a row of the build can be (a path that drops either is caught), starting as far into the row as the
    build's rows reach, up to `PROBE_OFFSET` (a bias that depends on the offset is caught)."""
    span = max(window or 0, chunk or 0)
    second = span + 4 if span and (max_length is None or span < max_length) else 5
    room = PROBE_OFFSET if max_length is None else max_length - second
    return max(7, min(PROBE_OFFSET, room)), second


def check_isolation(model, collator, vocab_size: int, tolerance: float | None = None,
                    window: int | None = None, max_length: int | None = None, chunk: int | None = None) -> float:
    """Refuse a model/path pair that lets one packed sample see another, drops its window or chunks,
    or biases a sample by where it starts in the row.

    Runs the model on three probe rows, [A B], [A' B] (A' = A with other tokens) and [B] alone (a
    plain forward pass, the model's own masking), and compares the logits on B (`probe_lengths`: B
    is longer than the model's window and chunk, A as long as the build's rows allow, up to
    `PROBE_OFFSET`). With isolation they agree to float noise; with cross-sample attention,
    positions that do not restart, a lost window or chunk, or an offset-dependent bias, they do not.

    Returns:
        The larger mean absolute change of B's logits, relative to their mean magnitude.

    Raises:
        IsolationError: the difference exceeds `tolerance`.
    """
    import torch

    gen = np.random.default_rng(0)
    high = max(4, min(vocab_size, 1000))
    n_a, n_b = probe_lengths(window, max_length, chunk)
    a, a2, b = (gen.integers(3, high, size=n).astype(np.int32) for n in (n_a, n_a, n_b))

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
            for r in (row(a, b), row(a2, b)):
                batch = collator([r])
                batch.pop("labels")
                batch.pop(REAL_TOKENS, None)
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                logits.append(model(**batch, use_cache=False).logits[0, n_a:n_a + n_b].float())
            alone = torch.from_numpy(b.astype(np.int64))[None].to(device)
            logits.append(model(input_ids=alone, use_cache=False).logits[0].float())
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
        other = (" (or --attn-implementation sdpa / eager: transformers' packed mask)"
                 if collator.attention.mode == "varlen" else "")
        raise IsolationError(
            f"packed samples are not isolated with attention path `{collator.attention.name}`: the logits of "
            f"a sample of {n_b} tokens change by {diff:.3g} (relative; tolerance {tolerance:g}) between running it "
            f"packed {n_a} tokens into a row and running it alone: this model's code ignores the position ids, its "
            "sliding window or chunks, or biases attention by where a sample starts in the row (Bloom, OPT, "
            "Falcon's ALiBi, some trust_remote_code models). Rebuild the shards one sample per row: `sftprep build "
            f"... --packing none --overwrite`{other}")
    return diff


def _param_dtype(model):
    return next(p for p in model.parameters() if p.is_floating_point()).dtype
