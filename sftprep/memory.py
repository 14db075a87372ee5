"""An in-memory build: records (or texts, or token ids) -> labelled, packed rows, no folder written.

The same encoder, rules and row format as `sftprep build`: what `IterativeTrainer.step()` trains on is
what a build of the same records would have written (labels, truncation, first token never trained,
packing, `seq_lens`). Every input form ends as samples `(ids, labels)`, then `rows(samples)`:

    records            -> normalize -> render -> tokenize+label -> truncate     (the build's `Encoder`)
    texts [+ responses] -> the tokenizer (TRL's way) -> ids + labels   -+    (responses: the text's end trained)
    ids [+ labels, mask] (a padded 2-D batch: unpadded by the pad id)   -+-> checked, truncated
    samples -> rows (the build's packing mode)                         {"input_ids", "labels", "seq_lens"}

Rejected inputs come back as dicts (index, source, reason, message), as a build lists them in rejects.jsonl.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .config import config_from_dict
from .pack.packing import mode
from .read import Record
from .scale.pipeline import encoder_for
from .tokenize.labels import IGNORE_INDEX, labels_from_spans, mask_sample_starts
from .tokenizer import load_fast, load_tokenizer, stop_strings, tokenizer_identity
from .write.output import build_manifest

Sample = tuple[np.ndarray, np.ndarray]
"""One labelled sample: (token ids, labels), int32."""
Result = tuple[list[Sample], list[dict[str, Any]], int]
"""(samples, rejects, how many samples were truncated)."""


class MemoryBuild:
    """A build's settings and tokenizer, applied to data held in memory.

    Args:
        settings: build settings as `sftprep.config_from_dict` takes them (template, max_length, ...).
        tokenizer: the tokenizer folder.
        allow_code: let a `module:function` template run.
        name: what stands where a build's inputs would (recorded in the config).
    """

    def __init__(self, settings: Mapping[str, Any], tokenizer: str | Path, allow_code: bool = False,
                 name: str = "(records in memory)") -> None:
        # inputs/out are required by BuildConfig but never read by the Encoder: records are given
        config = config_from_dict({**settings, "inputs": [name], "tokenizer": str(tokenizer), "out": name,
                                   "on_error": "skip"}, source=name)
        self.config = dataclasses.replace(config, allow_code=allow_code)
        self.tokenizer_path = tokenizer
        self.fast = load_fast(tokenizer)
        self.encoder = encoder_for(self.config, self.fast)
        self.identity = tokenizer_identity(self.fast, tokenizer)
        self.max_length = self.config.tokenize.max_length
        self.packing = mode(self.config.pack.mode)
        self.truncation = self.encoder.truncation  # None when the packing mode splits samples: rows are cut
        self._hf = None

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest a build of these settings would write, without inputs, shards or totals."""
        return build_manifest(self.config, build_id=None, inputs=[], template=self.encoder.renderer.description,
                              warnings=self.encoder.renderer.warnings, tokenizer=self.identity,
                              max_token_id=self.identity.get("pad_id"), shards=[], totals={})

    # -- inputs -> samples ------------------------------------------------------------------------
    def records(self, records: Sequence[Any], where: str = "records") -> Result:
        """Records as a build reads them (any format the build settings accept)."""
        batch = [(i, Record(dict(r), f"{where}[{i}]") if isinstance(r, Mapping) else
                  Record(None, f"{where}[{i}]", error=f"a record must be a mapping, got {type(r).__name__}"))
                 for i, r in enumerate(records)]
        enc = self.encoder(batch)
        samples = [enc.sample(k) for k in range(len(enc.lengths))]
        rejects = [_reject(r["sample_id"], r["source"], r["reason"], r["message"]) for r in enc.rejects]
        return samples, rejects, int(sum(enc.truncated))

    def texts(self, texts: Sequence[Any], texts_labels: Sequence[Any] | None = None) -> Result:
        """TRL: `tokenizer(text, truncation=True, max_length=...)` (BOS added; the truncation side from
        the truncation mode). `texts_labels[i]` is the response that ends `texts[i]`: its tokens (found
        by the build's label rule on the text's one tokenization) are trained, the prompt before it is
        not. Without `texts_labels` (or with the whole text) every token is trained."""
        if texts_labels is not None and len(texts_labels) != len(texts):
            raise ValueError(f"texts_labels holds {len(texts_labels)} strings for {len(texts)} texts")
        ids, labels, rejects, truncated = [], [], [], 0
        for i, text in enumerate(texts):
            response = texts_labels[i] if texts_labels is not None else text
            bad = next((("wrong_type", f"{name}[{i}] must be a string, got {type(v).__name__}") for name, v in
                        (("texts", text), ("texts_labels", response)) if not isinstance(v, str)), None)
            if not bad and not text.endswith(response):
                bad = ("response_not_found", f"texts_labels[{i}] {_clip(response)} is not the end of texts[{i}] "
                       f"{_clip(text, tail=True)}: texts_labels are the responses that end each text")
            if bad:
                rejects.append(_reject(i, f"texts[{i}]", *bad))
                ids.append(None)
                labels.append(None)
                continue
            tokens, offsets, cut = self._tokenize(text)
            ids.append(tokens)
            labels.append(labels_from_spans(tokens, offsets, text, [(len(text) - len(response), len(text))]))
            truncated += cut
        samples, more, _ = self.ids(ids, labels, None, where="texts")
        return samples, sorted(rejects + more, key=lambda r: r["index"]), truncated

    def ids(self, input_ids: Sequence[Any], labels: Sequence[Any] | None = None,
            attention_mask: Sequence[Any] | None = None, where: str = "input_ids", padded: bool = False) -> Result:
        """Samples from id sequences: labels default to the ids, masked-out positions dropped, the
        first token never trained, truncated by the truncation mode (keep_start / keep_end by plain
        slicing, drop rejects). A sequence given as None (rejected before) is skipped. `padded`
        (a 2-D batch) without `attention_mask`: the pad id's runs at either end of a row are padding."""
        if padded and attention_mask is None and self.identity.get("pad_id") is not None:
            attention_mask = [_unpadded(_int_array(seq, f"{where}[{i}]"), self.identity["pad_id"])
                              for i, seq in enumerate(input_ids)]
        for name, given in (("labels", labels), ("attention_mask", attention_mask)):
            if given is not None and len(given) != len(input_ids):
                raise ValueError(f"{name} holds {len(given)} sequences for {len(input_ids)} input_ids")
        samples, rejects, truncated = [], [], 0
        for i, seq in enumerate(input_ids):
            if seq is None:
                continue
            source = f"{where}[{i}]"
            try:
                ids = _int_array(seq, source)
                lab = ids.copy() if labels is None or labels[i] is None else _int_array(labels[i], f"labels[{i}]")
                mask = None if attention_mask is None else _int_array(attention_mask[i], f"attention_mask[{i}]")
            except ValueError as e:
                rejects.append(_reject(i, source, "wrong_type", str(e)))
                continue
            problem = _check_ids(ids, lab, mask, self.identity["vocab_size"])
            if problem:
                rejects.append(_reject(i, source, *problem))
                continue
            if mask is not None:
                ids, lab = ids[mask != 0], lab[mask != 0]
            n, cut = self.max_length, self.truncation
            if len(ids) > n and cut is not None:
                if cut == "drop":
                    rejects.append(_reject(i, source, "too_long", f"{len(ids)} tokens > max_length {n} (--truncation drop)"))
                    continue
                keep = slice(0, n) if cut == "keep_start" else slice(len(ids) - n, None)
                ids, lab = ids[keep], lab[keep]
                truncated += 1
            lab = mask_sample_starts(lab.copy(), [len(lab)])
            if not (lab != IGNORE_INDEX).any():
                rejects.append(_reject(i, source, "no_trained_tokens", "no token left to train on"))
                continue
            samples.append((ids.astype(np.int32), lab.astype(np.int32)))
        return samples, rejects, truncated

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]], bool]:
        """(ids, character offsets, truncated): the tokenizer's own truncation, as TRL calls it
        (special tokens kept)."""
        if self._hf is None:
            self._hf = load_tokenizer(self.tokenizer_path)
        tok, n = self._hf, self.max_length
        if self.truncation not in ("keep_start", "keep_end"):  # drop (rejected later) or split by packing
            enc = tok(text, return_offsets_mapping=True)
            return enc["input_ids"], enc["offset_mapping"], False
        side = tok.truncation_side
        tok.truncation_side = "left" if self.truncation == "keep_end" else "right"
        try:
            enc = tok(text, truncation=True, max_length=n, return_offsets_mapping=True)
            ids = enc["input_ids"]
            return ids, enc["offset_mapping"], len(ids) == n and len(tok(text)["input_ids"]) > n
        finally:
            tok.truncation_side = side

    # -- samples -> rows ----------------------------------------------------------------------------
    def rows(self, samples: Sequence[Sample]) -> list[dict[str, np.ndarray]]:
        """Rows as a build writes them (without the padding a collator adds): input_ids, labels, seq_lens."""
        lengths = np.asarray([len(ids) for ids, _ in samples], np.int64)  # as a build hands them: an array
        rows = []
        for row in self.packing.rows(lengths, self.max_length, self.config.pack.seed):
            seq_lens = np.array([b - a for _, a, b in row], np.int32)
            labels = np.concatenate([samples[i][1][a:b] for i, a, b in row]).astype(np.int32)
            mask_sample_starts(labels, seq_lens)  # a piece of a split sample starts mid-sample: not trained there
            rows.append({"input_ids": np.concatenate([samples[i][0][a:b] for i, a, b in row]).astype(np.int32),
                         "labels": labels, "seq_lens": seq_lens})
        return rows

    # -- generation -------------------------------------------------------------------------------------
    def prompt_ids(self, record: Mapping[str, Any]) -> list[int]:
        """The token ids a record is rendered with up to where its answer starts (the generation
        prompt): the template, system prompt and BOS rule of the build."""
        rendered = self.encoder.render([(0, Record(dict(record), "prompt"))])
        if rendered.encoded.rejects:
            raise ValueError(f"cannot render the prompt {dict(record)!r}: {rendered.encoded.rejects[0]['message']}")
        text, spans = rendered.texts[0], rendered.spans[0]
        if rendered.convs[0].kind == "text":  # a text to continue: all of it, less the EOS a build appends
            eos = self.fast.eos_token
            cut = len(text) - len(eos) if eos and text.endswith(eos) else len(text)
        else:
            cut = spans[0][0]
        ids = self.fast.backend_tokenizer.encode(text[:cut], add_special_tokens=False).ids
        return ([self.encoder.bos_id] if rendered.heads[0] else []) + list(ids)

    def stop_ids(self) -> list[int]:
        """Ids that end an answer: EOS, generation_config's eos ids, --stop-token (single tokens)."""
        backend = self.fast.backend_tokenizer
        ids = [backend.token_to_id(s) for s in stop_strings(self.fast, self.config.template.stop_tokens)]
        return [i for i in dict.fromkeys(ids) if i is not None]


def _unpadded(ids: np.ndarray, pad_id: int) -> np.ndarray:
    """1 where a token is not padding: not in the run of `pad_id` at the start or the end of the row."""
    real = np.flatnonzero(ids != pad_id)
    mask = np.zeros(len(ids), np.int64)
    if real.size:
        mask[real[0]:real[-1] + 1] = 1
    return mask


def _clip(text: str, tail: bool = False, n: int = 40) -> str:
    """`text` quoted, cut to about n characters (its end when `tail`)."""
    if len(text) <= n:
        return repr(text)
    return repr("..." + text[-n:]) if tail else repr(text[:n] + "...")


def _reject(index: int, source: str, reason: str, message: str) -> dict[str, Any]:
    return {"index": index, "source": source, "reason": reason, "message": message}


def _int_array(value: Any, where: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"{where} must be a 1-D sequence of integers, got shape {arr.shape} of {arr.dtype}")
    return arr.astype(np.int64)


def _check_ids(ids: np.ndarray, labels: np.ndarray, mask: np.ndarray | None, vocab: int) -> tuple[str, str] | None:
    """(reason, message) of what is wrong with one id sequence; None when nothing is."""
    if len(labels) != len(ids):
        return "labels_length_mismatch", f"{len(labels)} labels for {len(ids)} input ids"
    if mask is not None and len(mask) != len(ids):
        return "mask_length_mismatch", f"{len(mask)} attention_mask values for {len(ids)} input ids"
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        return "bad_token_id", f"token id {int(ids.max() if ids.max() >= vocab else ids.min())} is outside the " \
                               f"vocabulary (0..{vocab - 1})"
    bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))]
    if bad.size:
        return "bad_label", f"label {int(bad[0])} is neither -100 nor a token id (0..{vocab - 1})"
    return None


__all__ = ["MemoryBuild", "Result", "Sample"]
