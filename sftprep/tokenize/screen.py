"""Decontamination of tokenized samples: a sample whose text shares a word n-gram with a benchmark item
(`read.contamination.Benchmark`) is dropped as `contaminated`.

    Encoded batch --decode (Rust, one call a batch, special tokens left out)--> each sample's text
                  --Benchmark.find_batch--> contaminated samples --> rejects; the rest go on

It runs on samples, not records, so it is the same for samples tokenized now and samples read back from the
sample cache (whose entries therefore do not depend on the benchmark), and it runs as batches arrive, beside
the tokenizer. The text matched is the whole sample's, template included (a benchmark n-gram never holds the
template's markers, so only the records' own words can match).
"""

from __future__ import annotations

import numpy as np

from ..read.contamination import Benchmark
from .encode import Encoded


class Screen:
    """Drops contaminated samples from encoded batches (`__call__`)."""

    def __init__(self, benchmark: Benchmark, backend) -> None:
        self.benchmark, self.backend = benchmark, backend

    def __call__(self, enc: Encoded) -> Encoded:
        if not len(enc.lengths):
            return enc
        ends = np.cumsum(enc.lengths)
        ids = enc.ids.tolist()
        texts = self.backend.decode_batch([ids[a:b] for a, b in zip((ends - enc.lengths).tolist(), ends.tolist())],
                                          skip_special_tokens=True)
        hits = self.benchmark.find_batch(texts)
        if not hits:
            return enc
        keep = np.ones(len(enc.lengths), bool)
        keep[list(hits)] = False
        tokens = np.repeat(keep, enc.lengths)
        rejects = enc.rejects + [{"sample_id": enc.sample_ids[k], "source": enc.sources[k], "reason": "contaminated",
                                  "message": hits[k]} for k in sorted(hits)]
        rejects.sort(key=lambda r: r["sample_id"])
        return Encoded(enc.ids[tokens], enc.labels[tokens], enc.lengths[keep], enc.num_trained[keep],
                       [s for s, k in zip(enc.sample_ids, keep) if k], [s for s, k in zip(enc.sources, keep) if k],
                       [t for t, k in zip(enc.truncated, keep) if k], rejects)
