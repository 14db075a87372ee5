"""Expert iteration on a toy task with `sfttrain.IterativeTrainer`: generate -> keep only correct
answers -> step(), round after round, on one live model.

The task: "Is 7 odd or even?" -> " odd". The model starts from random weights, so while sampling
its answers are restricted to the two words and the end token (a multiple-choice decoder); a
sample counts as correct only when it is the right word followed by the end token. Only correct
samples are trained on. Accuracy is measured greedily and *without* the restriction: the model
must write the right word and then stop by itself.

    python examples/iterative_loop.py                  # prints one line per round
    python examples/iterative_loop.py --rounds 20 --out runs/parity

Runs on a CPU in well under a minute (a 2-layer, 64-wide Llama; the Mistral tokenizer in fixtures/).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "fixtures" / "tokenizers" / "mistral"
TINY_LLAMA = ROOT / "fixtures" / "models" / "tiny-llama" / "config.json"
NUMBERS = range(1, 21)
TARGET = 1.0
"""Greedy accuracy the loop stops at (what the test expects within the default rounds)."""


def task() -> list[tuple[str, str]]:
    return [(f"Odd or even: {n}", "odd" if n % 2 else "even") for n in NUMBERS]


def random_model(folder: Path, seed: int = 0) -> Path:
    """A random-init tiny Llama saved with the fixture tokenizer (nothing is downloaded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**json.loads(TINY_LLAMA.read_text()))).save_pretrained(folder)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


class OnlyThese:
    """A logits processor that lets only `allowed` token ids be sampled (multiple choice)."""

    def __init__(self, allowed: list[int]) -> None:
        self.allowed = allowed

    def __call__(self, input_ids, scores):
        import torch

        masked = torch.full_like(scores, float("-inf"))
        masked[:, self.allowed] = scores[:, self.allowed]
        return masked


def accuracy(trainer, pairs) -> tuple[float, list]:
    """Greedy, unrestricted: right word, then the end token."""
    outs = trainer.generate([p for p, _ in pairs], max_new_tokens=4, details=True)
    right = [o.stopped and o.text.strip() == a for o, (_, a) in zip(outs, pairs)]
    return sum(right) / len(pairs), outs


def main(out: str | Path = "runs/iterative-parity", rounds: int = 20, samples: int = 8, seed: int = 0,
         lr: float = 1e-2, verbose: bool = True) -> dict:
    import torch
    from transformers import LogitsProcessorList

    from sfttrain import IterativeTrainer

    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model = random_model(out / "model", seed)
    # the model is random: its output layer must learn the answer words, so it trains in full next to LoRA
    trainer = IterativeTrainer(model, out / "run", max_length=32, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                               modules_to_save="lm_head", learning_rate=lr, seed=seed, logging_steps=1,
                               save_steps=10_000)
    pairs = task()
    tok = trainer.tokenizer
    choices = [tok.convert_tokens_to_ids(w) for w in ("▁odd", "▁even")] + [tok.eos_token_id]
    restrict = LogitsProcessorList([OnlyThese(choices)])
    torch.manual_seed(seed)
    history = []
    acc, _ = accuracy(trainer, pairs)
    for r in range(1, rounds + 1):
        prompts = [p for p, _ in pairs for _ in range(samples)]
        outs = trainer.generate(prompts, max_new_tokens=2, do_sample=True, temperature=1.0, top_k=0,
                                logits_processor=restrict, details=True)
        answer = dict(pairs)
        kept = sorted({(p, o.text.strip()) for p, o in zip(prompts, outs) if o.stopped and o.text.strip() == answer[p]})
        stats = trainer.step(records=[{"prompt": p, "completion": " " + a} for p, a in kept])
        acc, _ = accuracy(trainer, pairs)
        history.append({"round": r, "kept": len(kept), "loss": stats["loss"], "accuracy": acc})
        if verbose:
            loss = f"{stats['loss']:.3f}" if stats["loss"] is not None else "-"
            print(f"round {r:2d}: kept {len(kept):2d} correct samples, loss {loss}, greedy accuracy {acc:.0%}")
        if acc >= TARGET:
            break
    final = trainer.save()
    _, outs = accuracy(trainer, pairs)
    return {"rounds": len(history), "accuracy": acc, "history": history, "final": final,
            "answers": [(p, o.text, o.stopped, o.ids) for (p, _), o in zip(pairs, outs)],
            "eos_id": tok.eos_token_id}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/iterative-parity")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt and round")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    result = main(a.out, a.rounds, a.samples, a.seed)
    print(f"accuracy {result['accuracy']:.0%} after {result['rounds']} rounds; adapter in {result['final']}")
