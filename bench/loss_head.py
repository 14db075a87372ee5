#!/usr/bin/env python
"""Benchmark: peak memory of one training step's loss head, sfttrain's vs HF full logits.

A tiny random Llama (hidden 64, 1 layer, fp32, CPU) at each vocabulary, one forward + backward on
a (batch, length) row of random tokens, all positions trained or 25% trained. Each case runs in a
fresh process; the number is its peak RSS above the RSS just before the step (the model and its
inputs already built), so it is the memory the step itself needs, which the logits dominate.

    vocab | trained | HF full logits MiB | sfttrain MiB | ratio | loss difference

    python bench/loss_head.py                               # vocab 32k and 129k, batch 1 x 2048
    python bench/loss_head.py --vocabs 32000 --batch 2 --length 1024

HF full logits: `model(input_ids, labels=labels).loss` (the (B, L, V) logits, upcast to fp32 by
the loss). sfttrain: `loss.trained_head` + `loss.per_token_loss` (logits for one chunk of trained
positions at a time, `loss.chunk_rows` of the vocabulary).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one_case(method: str, vocab: int, batch: int, length: int, trained: float) -> dict[str, float]:
    """In this process: build the model and a row, run one step with `method`, return its peak."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sfttrain.loss import next_token_targets, per_token_loss, trained_head

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length,
                                         tie_word_embeddings=False)).train()
    ids = torch.randint(3, vocab, (batch, length))
    labels = ids.clone()
    labels[torch.rand(batch, length) >= trained] = -100
    before = _rss_mib()
    if method == "hf":
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    else:
        keep, _ = next_token_targets(labels)
        with trained_head(model, keep) as head:
            loss = per_token_loss(model(input_ids=ids, use_cache=False), labels, head=head)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mib": peak - before, "loss": loss.item()}


def run_case(method: str, vocab: int, batch: int, length: int, trained: float) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--one", method, "--vocabs", str(vocab), "--batch", str(batch),
           "--length", str(length), "--trained", str(trained)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocabs", type=int, nargs="+", default=[32_000, 129_280])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--trained", type=float, nargs="+", default=[1.0, 0.25], help="fractions of positions trained")
    p.add_argument("--one", choices=["hf", "sfttrain"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one_case(a.one, a.vocabs[0], a.batch, a.length, a.trained[0])))
        return
    print(f"batch {a.batch} x length {a.length}, hidden 64, fp32, CPU; step peak RSS above the pre-step RSS")
    print("| vocab | trained | HF full logits MiB | sfttrain MiB | ratio | loss difference |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for vocab in a.vocabs:
        for trained in a.trained:
            hf, ours = (run_case(m, vocab, a.batch, a.length, trained) for m in ("hf", "sfttrain"))
            print(f"| {vocab:,} | {trained:.0%} | {hf['peak_mib']:,.0f} | {ours['peak_mib']:,.0f} "
                  f"| {ours['peak_mib'] / hf['peak_mib']:.2f} | {abs(hf['loss'] - ours['loss']):.1e} |", flush=True)


if __name__ == "__main__":
    main()
