"""Load the base model from a local folder (dtype, attention, bitsandbytes) and apply peft LoRA."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .attention import VARLEN, AttentionPath, register_varlen
from .config import ConfigError, TrainConfig

_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_bf16_native() -> bool | None:
    """Whether this CPU computes bf16 natively (x86 AVX512-BF16 / AMX, ARM BF16); None: unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set(text.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def precision_check(config: TrainConfig, cuda: bool, cuda_bf16: bool, cpu_bf16: bool | None) -> str | None:
    """Whether this machine runs the precision asked (--bf16/--fp16/--dtype): a refusal naming the fix
    that works here (`ConfigError`), a warning saying what will run (returned), or None."""
    t, dtype = config.train, config.model.dtype
    bf16 = bool(t.bf16) or dtype == "bf16"
    asked = " and ".join(f for f, on in (("--bf16", t.bf16), ("--fp16", t.fp16), (f"--dtype {dtype}", dtype != "auto"))
                         if on)
    fp16 = " and ".join(f for f, on in (("--fp16", t.fp16), ("--dtype fp16", dtype == "fp16")) if on)
    if not cuda and fp16:
        alt = " (or --bf16: this CPU computes bf16 natively)" if cpu_bf16 else ""
        raise ConfigError(f"{fp16} needs a CUDA GPU: fp16 on CPU has no loss scaling and slow kernels; on this "
                          f"machine drop {fp16} to train in fp32{alt}")
    if cuda and bf16 and not cuda_bf16:
        raise ConfigError(f"{asked}: this GPU has no bf16 (it needs compute capability 8.0+, e.g. A100); on this "
                          "machine use --fp16 (mixed precision) or fp32 (--no-bf16 --dtype fp32)")
    if not cuda and bf16 and cpu_bf16 is False:
        return (f"Warning: {asked} on a CPU without native bf16 (no AVX512-BF16 / AMX): bf16 runs through "
                "converted kernels, usually slower than fp32 and less precise; --no-bf16 --dtype fp32 trains in fp32")
    return None


def precision_note(config: TrainConfig) -> str | None:
    """`precision_check` on this machine."""
    cuda = cuda_available()
    if cuda:
        import torch

        return precision_check(config, True, bool(torch.cuda.is_bf16_supported()), None)
    return precision_check(config, False, False, cpu_bf16_native())


def bf16_on(config: TrainConfig) -> bool:
    """bf16 mixed precision: --bf16/--no-bf16, else on where a CUDA GPU supports it (and not --fp16)."""
    if config.train.bf16 is not None:
        return config.train.bf16
    if config.train.fp16 or config.model.dtype in ("fp16", "fp32") or not cuda_available():
        return False
    import torch

    return bool(torch.cuda.is_bf16_supported())


def resolve_dtype(config: TrainConfig):
    """The dtype the weights are loaded in: --dtype, else the mixed-precision setting, else fp32."""
    import torch

    name = config.model.dtype
    if name == "auto":
        name = "bf16" if bf16_on(config) else "fp16" if config.train.fp16 else "fp32"
    return getattr(torch, _DTYPE_NAMES[name])


def compute_dtype(config: TrainConfig):
    """dtype of the 4-bit matmuls: --bnb-4bit-compute-dtype, else the training dtype."""
    import torch

    name = config.quant.bnb_4bit_compute_dtype
    if name == "auto":
        return resolve_dtype(config)
    return getattr(torch, _DTYPE_NAMES[name])


def quantization_config(config: TrainConfig):
    """The `BitsAndBytesConfig` for --load-in-4bit/--load-in-8bit, or None."""
    if not config.quantized:
        return None
    from transformers import BitsAndBytesConfig

    if config.quant.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quant.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=config.quant.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(config),
    )


def check_quantization_backend(config: TrainConfig) -> None:
    """Refuse 4-/8-bit training without bitsandbytes (before any loading). bitsandbytes >= 0.45 runs
    NF4/FP4 and LLM.int8 on CPU as well as on CUDA, so CPU is not refused."""
    if not config.quantized:
        return
    flag = "--load-in-4bit" if config.quant.load_in_4bit else "--load-in-8bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{flag} needs the bitsandbytes package: `pip install bitsandbytes`")


def load_model(config: TrainConfig, attention: AttentionPath):
    """The base model from `config.model.path`, ready for training (no adapter yet).

    Raises:
        ConfigError: the folder cannot be loaded (the message keeps the library's reason).
    """
    from transformers import AutoModelForCausalLM

    if attention.impl == VARLEN:
        register_varlen()
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(config),
        "attn_implementation": attention.impl,
        "trust_remote_code": config.model.trust_remote_code,
        "local_files_only": True,
    }
    quant = quantization_config(config)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0)) if cuda_available() else "cpu"}
    try:
        # a local folder goes in absolute: the adapter records it, and `merge` may run from elsewhere
        path = Path(config.model.path)
        model = AutoModelForCausalLM.from_pretrained(str(path.resolve()) if path.is_dir() else config.model.path,
                                                     **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"cannot load the model in {config.model.path}: {e}") from None
    model.config.use_cache = False
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
"""Names of a MoE model's routers / expert gates (or of the module holding one): never a LoRA target of
`all-linear` (their output picks experts; Llama-4's router returns a tuple, which a LoRA layer breaks)."""


def all_linear_targets(model) -> tuple[list[str], str | None]:
    """What `all-linear` adapts in `model`: the full names of its linear layers but the LM head and
    routers (as peft's own `all-linear` lists them), and, for a MoE model, a note saying what was
    adapted and what was left out (None for a dense model).

    peft's own `all-linear` wraps the routers too, and on transformers 5 the fused expert weights of
    Mixtral / Qwen-MoE (3-D parameters, not linear layers), which peft can only train without dropout:
    the defaults would stop at `lora_dropout != 0`.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    def leaves(names):
        return ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))

    head = model.get_output_embeddings()
    targets, routers = [], []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head:
            router = "Router" in type(module).__name__ or any(part in ROUTER_NAMES for part in name.split("."))
            (routers if router else targets).append(name)
    experts = [n for n, p in model.named_parameters() if p.dim() == 3 and ".experts." in f".{n}"]
    if not (routers or experts):
        return targets, None
    left = [f"routers/gates ({leaves(routers)})"] if routers else []
    if experts:
        left.append(f"fused expert weights (experts: {leaves(experts)}; not linear layers)")
    return targets, f"all-linear on this MoE model: {leaves(targets)}; not adapted: {'; '.join(left)}"


def lora_targets(model, config: TrainConfig) -> tuple[Any, str | None]:
    """peft's `target_modules` for --target-modules, and what to say about it at start-up (or None)."""
    given = config.lora.target_modules
    if tuple(given) == ("all-linear",):
        return all_linear_targets(model)
    return (given[0] if len(given) == 1 else list(given)), None


def apply_lora(model, config: TrainConfig):
    """Wrap `model` in a peft LoRA model (or return it unchanged for full fine-tuning)."""
    if config.lora.method == "full":
        return model
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.train.seed)  # the LoRA init is reproducible
    lc = config.lora
    target, _ = lora_targets(model, config)
    peft_config = LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias=lc.bias, target_modules=target,
        modules_to_save=list(lc.modules_to_save) or None, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, peft_config)
    except ValueError as e:  # e.g. a target module name that matches nothing
        fix = (" (peft wraps this MoE model's fused expert weights for these names, and trains them only without "
               "dropout): pass --lora-dropout 0, or --target-modules all-linear" if "lora_dropout" in str(e) else "")
        raise ConfigError(f"--target-modules {','.join(lc.target_modules)}: {e}{fix}") from None


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters, counting 4-bit packed weights at their real size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
