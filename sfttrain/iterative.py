"""Iterative training: `step()` on a live trainer, with the same labels as a build.

Loops that act between optimizer steps (generate, filter or score, train on what survived:
rejection sampling, expert iteration, self-training) keep one model loaded and call `step()`:

    t = IterativeTrainer(model="path/to/model", output_dir="runs/it", template="tokenizer", max_length=2048)
    answers = t.generate(prompts, max_new_tokens=32)               # the live model
    stats = t.step(records=[{"prompt": p, "completion": a} for p, a in kept])
    t.save()                                                       # like `sfttrain run`'s OUTPUT_DIR/final

What one `step(records=...)` does is what `sftprep build` + one `sfttrain run` step do:

    records -> normalize -> render -> tokenize+label -> truncate     sftprep's in-memory build
            -> pack (the build's packing mode)                        (`sftprep.api.MemoryBuild`): `seq_lens`
            -> micro-batches of per_device_batch_size rows            `PackedCollator` (positions restart
            -> one optimizer step over all of them                     per sample: isolation as in a run)

The step is `ShardTrainer`'s own (loss at trained positions, normalised by the step's trained
tokens, gradient clipping, scheduler, logging, checkpoints), driven one optimizer step at a time
through the pieces `transformers.Trainer._run_epoch` uses for one step. TRL's forms
(`texts`/`texts_labels`, `input_ids`/`labels`/`attention_mask`) skip the template: they are
tokenized or taken as given, then packed and trained the same way.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .config import ConfigError, TrainConfig, did_you_mean

ITERATIVE_DATA = "(records given to IterativeTrainer.step)"
"""What stands where a build folder would: recorded as the data in `sfttrain.json`."""
PLACEHOLDER = "x"
"""The answer a prompt is rendered with to find where the answer starts (`generate`)."""
HORIZON_FREE = ("constant", "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau")
"""Schedulers that need no planned number of steps."""
_NOT_BUILD = ("inputs", "input", "num_samples", "on_error", "max_reject_ratio", "shard_size", "out", "workers",
              "overwrite", "seed")
"""Build keys that make no sense for records in memory (or that belong to the training config)."""
_NOT_TRAIN = ("shards", "eval", "shuffle", "verify_checksums", "eval_steps", "per_device_eval_batch_size",
              "dataloader_workers")
"""Training keys about a build folder read by a data loader: step() is given its data."""


# -- settings ----------------------------------------------------------------------------------

def split_settings(settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat keyword settings -> (training settings, build settings); `tokenizer` goes to both.

    Raises:
        ConfigError: a key that is neither, or that means nothing for an iterative run.
    """
    from sftprep import config as build_cfg

    from . import config as train_cfg

    train_keys = set(train_cfg.SHORTCUTS) | set(train_cfg.TRAIN_SCHEMA.aliases) | {"data", "model", "quant", "lora", "train"}
    build_keys = (set(build_cfg.SHORTCUTS) | set(build_cfg.BUILD_SCHEMA.aliases) | {"template", "read", "tokenize", "pack"}
                  | set(build_cfg._TOP)) - set(_NOT_BUILD)
    train, build, problems = {}, {}, []
    for key, value in settings.items():
        if key in _NOT_TRAIN or key in ("inputs", "input", "out", "workers", "num_samples", "shard_size"):
            problems.append(f"`{key}` does not apply: an iterative run trains on what step() is given")
        elif key == "on_error":
            problems.append("`on_error` does not apply: step() never raises on a bad record, it returns it in "
                            "stats['rejects']")
        elif key == "tokenizer":
            train[key] = build[key] = value
        elif key in train_keys:
            train[key] = value
        elif key in build_keys:
            build[key] = value
        else:
            problems.append(f"unknown setting `{key}`{did_you_mean(key, sorted(train_keys | build_keys))}")
    if problems:
        raise ConfigError.listing("IterativeTrainer settings", problems)
    return train, build


def iterative_config(model: str | Path | None, output_dir: str | Path | None,
                     settings: Mapping[str, Any]) -> TrainConfig:
    """The `TrainConfig` of an iterative run. Without `max_steps` the run has no planned length, so
    the learning rate is constant unless a scheduler that needs none is named."""
    from .config import config_from_dict

    flat = dict(settings)
    named = flat.get("lr_scheduler", flat.get("lr_scheduler_type"))
    planned = flat.get("max_steps", -1) not in (-1, None)
    if named is None and not planned:
        flat["lr_scheduler"] = "constant"
    config = config_from_dict({**flat, "shards": ITERATIVE_DATA,
                               "model": str(model) if model is not None else None,
                               "output_dir": str(output_dir) if output_dir is not None else None})
    t = config.train
    if t.max_steps == -1 and t.lr_scheduler not in HORIZON_FREE:
        raise ConfigError(f"lr_scheduler {t.lr_scheduler!r} decays over a planned number of steps: give max_steps "
                          f"(the number of step() calls planned), or use one of {', '.join(HORIZON_FREE)}")
    if t.gradient_accumulation_steps != 1:
        raise ConfigError("gradient_accumulation_steps does not apply: each step() is one optimizer step over "
                          "everything it is given, in micro-batches of per_device_batch_size rows")
    return config


# -- the trainer ---------------------------------------------------------------------------------

@dataclass
class Generation:
    """One generated answer: its text (special tokens removed), its token ids (up to and with the
    stop token) and whether it ended with a stop token (rather than at max_new_tokens)."""

    text: str
    ids: list[int]
    stopped: bool


class IterativeTrainer:
    """A LoRA / QLoRA (or full) trainer kept live between optimizer steps.

    Args:
        model: local model folder (as `sfttrain run --model`).
        output_dir: checkpoints and OUTPUT_DIR/final go here.
        callbacks: extra `transformers.TrainerCallback`s.
        disable_tqdm: no progress bar and no printed log lines (logs still reach `report_to` and
            `trainer.state.log_history`).
        allow_code: let a `module:function` template run.
        **settings: flat keys of `sfttrain run` (lora_r, learning_rate, load_in_4bit,
            gradient_checkpointing, max_steps, save_steps, logging_steps, report_to, resume, ...)
            and of `sftprep build` (template, max_length, train_on, truncation, truncation_unit,
            packing, system, stop_tokens, ...), TRL's names included (max_seq_length,
            truncation_mode, per_device_train_batch_size, ...). `tokenizer` is both the model's
            tokenizer (when its folder has none) and the build's.

    Raises:
        ConfigError / FileNotFoundError: a setting is wrong (before the model is loaded).
    """

    def __init__(self, model: str | Path | None = None, output_dir: str | Path | None = None, *,
                 callbacks: Iterable[Any] = (), disable_tqdm: bool = True, allow_code: bool = False,
                 **settings: Any) -> None:
        train, build = split_settings(settings)
        self.config = iterative_config(model, output_dir, train)
        self._setup(build, allow_code)
        self._build_trainer(list(callbacks), disable_tqdm)
        self._start()

    # -- set-up ----------------------------------------------------------------------------
    def _setup(self, build: dict[str, Any], allow_code: bool) -> None:
        """The checks of `sfttrain run` that need no model, with the build settings in place of a build."""
        from sftprep.api import MemoryBuild
        from sftprep.tokenizer import load_tokenizer

        from .api import _resume_point, check_runtime
        from .attention import check_packed_rows, model_traits
        from .checks import check_tokenizer, has_tokenizer, model_config

        c = self.config
        self.traits = model_traits(model_config(c.model.path))
        tok_path = Path(c.model.tokenizer) if c.model.tokenizer else Path(c.model.path)
        if not has_tokenizer(tok_path):
            raise ConfigError(f"--model {c.model.path} has no tokenizer: give tokenizer=FOLDER (the tokenizer the "
                              "records are tokenized with and the model was trained with)")
        self.build = MemoryBuild(build, tok_path, allow_code, name=ITERATIVE_DATA)
        self.tokenizer = check_tokenizer({"tokenizer": self.build.identity}, tok_path, c.model.path) \
            or load_tokenizer(tok_path)
        self.attention = check_runtime(c, self.traits)
        check_packed_rows(self.traits, self.build.packing.shared, self.build.max_length)
        self.resume_from, _ = _resume_point(c, {})
        self.tokenizer_path = tok_path

    def _run_info(self) -> dict[str, Any]:
        m = self.build.manifest
        return {"config": self.config.to_dict(),
                "data": {"shards": None, "iterative": True, "build_id": None, "tokenizer": m["tokenizer"],
                         "template": m["template"], "template_config": m["config"]["template"],
                         "build_config": {k: m["config"][k] for k in ("read", "template", "tokenize", "pack")}},
                "attention": self.attention.name}

    def _build_trainer(self, callbacks: list, disable_tqdm: bool) -> None:
        """Model, adapter, isolation proof and the `ShardTrainer`, as `sfttrain run` makes them."""
        from transformers import PrinterCallback

        from .attention import check_isolation
        from .chat_template import attach_build_template
        from .data import PackedCollator
        from .model import apply_lora, load_model
        from .trainer import ShardTrainer, training_arguments

        c = self.config
        attach_build_template(self.tokenizer, self.build.manifest, self.tokenizer_path)
        args = training_arguments(c, has_eval=False, disable_tqdm=disable_tqdm, planned_steps=self._planned())
        model = apply_lora(load_model(c, self.attention), c)
        if not c.quantized:
            model = model.to(args.device)
        self.collator = PackedCollator(self.attention, self.build.identity["pad_id"])
        self.isolation = (check_isolation(model, self.collator, self.build.identity["vocab_size"],
                                          window=self.traits.get("window"), max_length=self.build.max_length,
                                          chunk=self.traits.get("chunk"))
                          if self.build.packing.shared else None)
        self.trainer = ShardTrainer(model=model, args=args, data_collator=self.collator,
                                    processing_class=self.tokenizer,
                                    callbacks=callbacks, run_info=self._run_info())
        if disable_tqdm:
            self.trainer.remove_callback(PrinterCallback)

    def _planned(self) -> int:
        return self.config.train.max_steps if self.config.train.max_steps > 0 else 1

    def _start(self) -> None:
        """What `Trainer.train` does before its first step (checkpointing, NEFTune, state, optimizer,
        scheduler, resume), once: the optimizer and scheduler then live across step() calls."""
        import torch
        from transformers.integrations.neftune import activate_neftune
        from transformers.trainer_utils import align_special_tokens

        tr, args = self.trainer, self.trainer.args
        tr.is_in_train = True
        if getattr(args, "activation_checkpointing", getattr(args, "gradient_checkpointing", False)):
            kwargs = dict(getattr(args, "activation_checkpointing_kwargs", None)
                          or getattr(args, "gradient_checkpointing_kwargs", None) or {})
            enable = getattr(tr.model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs=kwargs or None)
            else:
                tr.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
        align_special_tokens(tr.model, tr.processing_class)
        if tr.neftune_noise_alpha is not None:
            tr.neftune_hook_handle = activate_neftune(tr.model, tr.neftune_noise_alpha, tr.accelerator)
        if self.resume_from is not None:
            tr._load_from_checkpoint(self.resume_from)
        horizon = self.config.train.max_steps if self.config.train.max_steps > 0 else 1 << 62
        tr._init_training_state(horizon, 1, 1, self.resume_from, None)
        self._model, _ = tr._prepare_for_training(self._planned(), None, self.resume_from)
        if self.resume_from is not None:
            tr._load_rng_state(self.resume_from)
        tr._tr_loss = torch.tensor(0.0, device=args.device)
        tr._total_loss_scalar = 0.0
        tr._globalstep_last_logged = tr.state.global_step
        tr._initial_num_input_tokens_seen = tr.state.num_input_tokens_seen
        tr._initial_global_step = tr.state.global_step
        self._start_time = time.time()
        self._model.zero_grad()
        tr.control = tr.callback_handler.on_train_begin(args, tr.state, tr.control)

    # -- public surface --------------------------------------------------------------------------
    @property
    def model(self):
        """The live model (a peft model with LoRA)."""
        return self.trainer.model

    @property
    def global_step(self) -> int:
        return self.trainer.state.global_step

    def prepare(self, records: Sequence[Any] | None = None, *, texts: Sequence[str] | None = None,
                texts_labels: Sequence[str] | None = None, input_ids: Sequence[Any] | None = None,
                labels: Sequence[Any] | None = None, attention_mask: Sequence[Any] | None = None) -> dict[str, Any]:
        """What `step()` would train on, without training: {"samples": [(ids, labels)], "rows": packed
        rows, "rejects": [...], "truncated": n}. Arguments as `step()`."""
        given = [name for name, v in (("records", records), ("texts", texts), ("input_ids", input_ids))
                 if v is not None]
        if len(given) != 1:
            raise ValueError("step() takes one of records=, texts= (with texts_labels=) or input_ids= (with labels=, "
                             f"attention_mask=); got {', '.join(given) or 'none'}")
        if records is not None:
            samples, rejects, truncated = self.build.records(_as_list(records, "records"))
        elif texts is not None:
            samples, rejects, truncated = self.build.texts(_as_list(texts, "texts"), _as_list(texts_labels, "texts_labels"))
        else:
            samples, rejects, truncated = self.build.ids(_as_list(input_ids, "input_ids"), _as_list(labels, "labels"),
                                                         _as_list(attention_mask, "attention_mask"),
                                                         padded=getattr(input_ids, "ndim", 1) == 2)
        return {"samples": samples, "rows": self.build.rows(samples) if samples else [], "rejects": rejects,
                "truncated": truncated}

    def step(self, records: Sequence[Any] | None = None, *, texts: Sequence[str] | None = None,
             texts_labels: Sequence[str] | None = None, input_ids: Sequence[Any] | None = None,
             labels: Sequence[Any] | None = None, attention_mask: Sequence[Any] | None = None) -> dict[str, Any]:
        """One optimizer step on what is given (micro-batches of per_device_batch_size packed rows,
        the loss normalised by the step's trained tokens).

        Args:
            records: dicts in any format a build reads (prompt/completion, messages, text, ...): rendered,
                labelled and truncated exactly as `sftprep build` with this trainer's build settings.
            texts, texts_labels: TRL's form: each text tokenized as the tokenizer does (BOS added,
                truncated to max_length on the side of `truncation`); `texts_labels[i]` is the response
                that ends `texts[i]`: its tokens are trained, the prompt before it is not (a response
                that does not end its text is a reject, `response_not_found`). Without texts_labels
                every token is trained.
            input_ids, labels, attention_mask: TRL's form: token id sequences (a list, or a padded 2-D
                tensor); labels default to the ids; positions where attention_mask is 0 are left out
                (not attended, not trained). A 2-D tensor without attention_mask: the pad id's runs at
                either end of each row are padding (when pad is EOS, give the mask to keep a final EOS).

        Returns:
            Stats: step, loss (per trained token), mean_token_accuracy, learning_rate, grad_norm, samples,
            rows, micro_batches, tokens, trained_tokens, tokens_per_s, truncated, rejected and rejects
            (index, source, reason, message). With nothing left to train no step is taken: loss is None.
        """
        t0 = time.perf_counter()
        self._check_horizon()
        prepared = self.prepare(records, texts=texts, texts_labels=texts_labels, input_ids=input_ids,
                                labels=labels, attention_mask=attention_mask)
        rows = prepared["rows"]
        stats: dict[str, Any] = {
            "step": self.global_step, "loss": None, "mean_token_accuracy": None, "learning_rate": None,
            "grad_norm": None, "samples": len(prepared["samples"]), "rows": len(rows), "micro_batches": 0,
            "tokens": int(sum(int(r["seq_lens"].sum()) for r in rows)), "trained_tokens": 0, "tokens_per_s": None,
            "truncated": prepared["truncated"], "rejected": len(prepared["rejects"]), "rejects": prepared["rejects"]}
        if not rows:
            return stats
        size = self.config.train.per_device_batch_size
        batches = [self.collator(rows[i:i + size]) for i in range(0, len(rows), size)]
        stats.update(self._optimizer_step(batches))
        stats["step"] = self.global_step
        stats["tokens_per_s"] = stats["tokens"] / max(time.perf_counter() - t0, 1e-9)
        return stats

    def generate(self, prompts: Sequence[Any], *, details: bool = False, **kwargs: Any) -> list:
        """Answers of the live model (eval mode, no dropout, no NEFTune noise), greedy unless told.

        Args:
            prompts: each a string (the prompt of a prompt/completion record; the text of a `text`
                build), a list of chat messages (ending with a user turn), or a record without its
                answer. It is rendered as the build renders it, up to where the answer starts.
            details: return `Generation`s (text, ids, stopped) instead of strings.
            **kwargs: passed to `model.generate` (max_new_tokens, do_sample, temperature, top_p,
                logits_processor, ...); max_new_tokens defaults to 128.
        """
        import torch

        prompt_ids = [self.build.prompt_ids(self._prompt_record(p)) for p in _as_list(prompts, "prompts")]
        if not prompt_ids:
            return []
        stop = self.build.stop_ids()
        pad = self.build.identity["pad_id"]
        width = max(len(p) for p in prompt_ids)
        device = next(p for p in self.model.parameters()).device
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
        kwargs.setdefault("max_new_tokens", 128)
        kwargs.setdefault("eos_token_id", stop)
        kwargs.setdefault("pad_token_id", pad)
        kwargs.setdefault("do_sample", False)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
        finally:
            model.train(was_training)
        results = []
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in stop), None)
            new = row if end is None else row[:end + 1]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            results.append(Generation(text, new, end is not None) if details else text)
        return results

    def save(self) -> str:
        """A checkpoint OUTPUT_DIR/checkpoint-N (adapter, tokenizer, optimizer, scheduler, RNG, state:
        `resume=True` continues from it) and OUTPUT_DIR/final (adapter + tokenizer with the build's chat
        template + sfttrain.json), as `sfttrain run` leaves them. Returns the final folder."""
        from .api import FINAL

        tr, out = self.trainer, Path(self.config.train.output_dir)
        if not (out / f"checkpoint-{self.global_step}" / "trainer_state.json").is_file():
            tr._save_checkpoint(self._model, None)
            tr.control = tr.callback_handler.on_save(tr.args, tr.state, tr.control)
        final = out / FINAL
        tr.save_model(str(final))  # with sfttrain.json
        return str(final)

    def close(self) -> None:
        """End the run for the callbacks (report_to backends flush and close); the model stays usable."""
        from transformers.integrations.neftune import deactivate_neftune

        tr = self.trainer
        tr.control = tr.callback_handler.on_train_end(tr.args, tr.state, tr.control)
        if tr.neftune_noise_alpha is not None and getattr(tr, "neftune_hook_handle", None) is not None:
            deactivate_neftune(tr.model, tr.neftune_hook_handle, tr.accelerator)
            tr.neftune_hook_handle = None
        tr.is_in_train = False

    # -- the step ----------------------------------------------------------------------------------
    def _check_horizon(self) -> None:
        planned = self.config.train.max_steps
        if planned > 0 and self.global_step >= planned:
            raise ValueError(f"step(): this run planned max_steps={planned} steps and has taken them (the learning "
                             "rate schedule ends there); save() it, and start a run with a larger max_steps "
                             "(resume=True continues from the last checkpoint)")

    def _optimizer_step(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step over `batches`, as `Trainer._run_epoch` runs one with len(batches)
        micro-batches: loss normalised by the step's trained tokens, clipping, scheduler, callbacks,
        logging and checkpoints."""
        tr, args, model = self.trainer, self.trainer.args, self._model
        meter = tr.meter.values
        before = (float(meter["correct"]), float(meter["trained"]))
        num_items = tr._get_num_items_in_batch(batches, args.device)
        tr.current_gradient_accumulation_steps = len(batches)
        tr.control = tr.callback_handler.on_step_begin(args, tr.state, tr.control)
        loss = 0.0
        for i, inputs in enumerate(batches):
            last = i == len(batches) - 1
            tr.accelerator.gradient_state._set_sync_gradients(last)
            sync = contextlib.nullcontext if last else functools.partial(tr.accelerator.no_sync, model=model)
            tr.current_flos += float(tr.floating_point_ops(inputs))
            tr._track_num_input_tokens(inputs)
            with sync():
                part = tr.training_step(model, inputs, num_items)
            tr._tr_loss += part
            loss += float(part)
        grad_norm = tr._clip_grad_norm(model) if args.max_grad_norm > 0 else None
        grad_norm = tr._get_grad_norm(model, grad_norm=grad_norm)
        tr.control = tr.callback_handler.on_pre_optimizer_step(args, tr.state, tr.control)
        tr.optimizer.step()
        tr.control = tr.callback_handler.on_optimizer_step(args, tr.state, tr.control)
        learning_rate = tr._get_learning_rate()
        if not tr.accelerator.optimizer_step_was_skipped and not _plateau(tr.lr_scheduler):
            tr.lr_scheduler.step()
        model.zero_grad()
        tr.state.global_step += 1
        meter = tr.meter.values  # before a log takes the meter
        correct, trained = float(meter["correct"]) - before[0], float(meter["trained"]) - before[1]
        tr.control = tr.callback_handler.on_step_end(args, tr.state, tr.control)
        tr._maybe_log_save_evaluate(tr._tr_loss, grad_norm, model, None, 0, None, self._start_time,
                                    learning_rate=learning_rate)
        trained_tokens = int(num_items) if num_items is not None else int(trained)
        return {"loss": loss, "learning_rate": learning_rate, "micro_batches": len(batches),
                "grad_norm": float(grad_norm) if grad_norm is not None else None, "trained_tokens": trained_tokens,
                "mean_token_accuracy": correct / trained if trained > 0 else None}

    # -- TRL's forms -----------------------------------------------------------------------------------
    def _prompt_record(self, prompt: Any) -> dict[str, Any]:
        """A prompt as a record with a placeholder answer (where the answer starts is then known)."""
        if isinstance(prompt, str):
            if self.build.config.read.format == "text":
                return {"text": prompt}
            return {"prompt": prompt, "completion": PLACEHOLDER}
        if isinstance(prompt, (list, tuple)):
            return {"messages": [*prompt, {"role": "assistant", "content": PLACEHOLDER}]}
        if isinstance(prompt, Mapping):
            rec = dict(prompt)
            if isinstance(rec.get("messages"), list) and (not rec["messages"] or
                                                          rec["messages"][-1].get("role") != "assistant"):
                rec["messages"] = [*rec["messages"], {"role": "assistant", "content": PLACEHOLDER}]
            elif "prompt" in rec and not rec.get("completion"):
                rec["completion"] = PLACEHOLDER
            return rec
        raise TypeError(f"a prompt must be a string, a list of chat messages or a record, got {type(prompt).__name__}")


# -- helpers -------------------------------------------------------------------------------------

def _as_list(value: Any, name: str) -> list | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a list with one entry per sample, got a single {type(value).__name__}: "
                        f"pass {name}=[...]")
    if isinstance(value, Mapping) or not hasattr(value, "__len__"):
        raise TypeError(f"{name} must be a list, got {type(value).__name__}")
    return list(value)


def _plateau(scheduler) -> bool:
    import torch

    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


__all__ = ["Generation", "IterativeTrainer", "ITERATIVE_DATA", "iterative_config", "split_settings"]
