"""The recipe's choices, made on per-sample numbers alone (no token is read here):

    key    64-bit hash of a sample's token ids              -> its split, and its order within its source
    exact  64-bit hash of its token ids and labels           -> duplicates (the same ids *and* labels)
    source which recipe source it came from (by sample id)
    length its tokens (for `mix_by: tokens`)

1. dedup: the first copy in input order is kept; the others are dropped as `duplicate`.
2. validation: `fraction: F` holds out each sample whose key falls in the lowest F of the hash range (a sample's
   split depends on nothing but its own tokens); `samples: N`, the N samples of smallest key (among the sources
   it applies to). Identical ids have one key, so a text is never in both splits.
3. weights, per source over its train samples S, visited in the order of their seeded key:
   `repeat: R` -> floor(R) copies of all, plus the first round((R - floor(R)) * |S|); `choose: N` -> N // |S|
   copies of all, plus the first N % |S|; `proportion: P` -> `choose` of P x the build's total (samples, or
   tokens with `mix_by: tokens`), where the total is what the unweighted sources fill (the rest: 1 - sum P), or,
   when every source has a proportion, the largest build that repeats none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..config import MixConfig, Source

EVAL_SALT = 0x5EED_0F_E7A1  # the validation split's hash domain: apart from the seeded order of mixing


def mix64(x: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of `x ^ salt`: a well-spread 64-bit key from a hash and a seed (vectorized)."""
    with np.errstate(over="ignore"):
        z = (np.asarray(x, np.uint64) ^ np.uint64(salt & 0xFFFFFFFFFFFFFFFF)) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclass
class Plan:
    """What a recipe makes of the kept samples (indices into them, input order)."""

    train: np.ndarray | None
    """The train samples, with repeats: all first copies in input order, then the second copies... (None:
    every sample once, in input order: `identity`)"""
    repeat: np.ndarray | None
    """Which copy each train entry is (0: the sample itself)."""
    validation: np.ndarray
    duplicate_of: dict[int, int] = field(default_factory=dict)
    """A dropped duplicate -> the sample kept in its place."""

    @classmethod
    def identity(cls) -> Plan:
        """Every sample once, in order: a build without choices (no array over its samples)."""
        return cls(None, None, np.zeros(0, np.int64))

    def is_identity(self, n: int) -> bool:
        """Every sample once, in order, none held out: the build as it would be without a recipe."""
        return self.train is None or (len(self.validation) == 0 and len(self.train) == n and not self.repeat.any())


def source_index(first_ids: np.ndarray, sample_ids) -> np.ndarray:
    """The recipe source of each sample id: sources hold consecutive ids from their `first_sample_id`
    (`first_ids`, ascending)."""
    return (np.searchsorted(first_ids, sample_ids, side="right") - 1).astype(np.int32)


def plan(sources: list[Source], mix: MixConfig, seed: int, source_of: np.ndarray, key: np.ndarray,
         exact: np.ndarray, lengths: np.ndarray, dedup: bool) -> Plan:
    """The recipe's choices for kept samples numbered 0..n-1 (see the module's docstring); `dedup`: drop
    exact duplicates (`BuildConfig.dedups`)."""
    n = len(key)
    alive = np.ones(n, bool)
    duplicate_of: dict[int, int] = {}
    if dedup and n:
        order = np.lexsort((np.arange(n), exact))  # by hash, then input order: the first copy leads its run
        same = exact[order][1:] == exact[order][:-1]
        first = order.copy()
        for j in np.flatnonzero(same):  # runs of equal hashes: each later one points at the run's first
            first[j + 1] = first[j]
        for j in np.flatnonzero(same):
            duplicate_of[int(order[j + 1])] = int(first[j + 1])
        alive[list(duplicate_of)] = False
    validation = _validation(sources, mix, source_of, key, alive)
    alive[validation] = False
    train, repeat = _weights(sources, mix, seed, source_of, key, lengths, alive)
    return Plan(train, repeat, validation, duplicate_of)


def _validation(sources: list[Source], mix: MixConfig, source_of: np.ndarray, key: np.ndarray,
                alive: np.ndarray) -> np.ndarray:
    """Indices held out for validation (ascending)."""
    split_key = mix64(key, EVAL_SALT)
    held = np.zeros(len(key), bool)
    pooled = np.zeros(len(key), bool)  # the sources that take the build's `eval: {samples: N}`
    for k, s in enumerate(sources):
        spec = s.spec
        fraction, samples = ((spec.eval_fraction, spec.eval_samples) if spec is not None and
                             (spec.eval_fraction, spec.eval_samples) != (None, None) else
                             (mix.eval_fraction, mix.eval_samples))
        mine = alive & (source_of == k)
        if fraction is not None:
            held |= mine & (split_key < np.uint64(min(int(fraction * 2.0 ** 64), 2 ** 64 - 1)))
        elif samples is not None and spec is not None and spec.eval_samples is not None:
            held[_smallest(np.flatnonzero(mine), split_key, samples)] = True
        elif samples is not None:
            pooled |= mine
    if pooled.any():
        held[_smallest(np.flatnonzero(pooled), split_key, mix.eval_samples)] = True
    return np.flatnonzero(held)


def _smallest(candidates: np.ndarray, key: np.ndarray, count: int) -> np.ndarray:
    """The `count` candidates of smallest key (ties by index)."""
    order = np.lexsort((candidates, key[candidates]))
    return candidates[order[:count]]


def _weights(sources: list[Source], mix: MixConfig, seed: int, source_of: np.ndarray, key: np.ndarray,
             lengths: np.ndarray, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The train entries (index, copy) of every source, its weight applied."""
    by_tokens = mix.mix_by == "tokens"
    mix_key = mix64(key, seed * 0x9E3779B97F4A7C15 + 1)

    def measure(idx: np.ndarray) -> float:  # what a proportion is a share of
        return float(lengths[idx].sum()) if by_tokens else float(len(idx))

    members, taken = [], {}
    for k, s in enumerate(sources):
        mine = np.flatnonzero(alive & (source_of == k))
        members.append(mine[np.lexsort((mine, mix_key[mine]))])  # the seeded order a subset is taken in
        how = s.spec.mixing if s.spec is not None else None
        if how is None:
            taken[k] = members[k], np.zeros(len(mine), np.int64)
        elif how[0] == "choose":
            taken[k] = _take(members[k], lengths, how[1], samples=True)
        elif how[0] == "repeat":
            taken[k] = _take(members[k], lengths, how[1] * len(mine), samples=True)
    shares = {k: s.spec.proportion for k, s in enumerate(sources) if k not in taken}
    if shares:
        fixed = sum(measure(idx) for idx, _ in taken.values())
        total = fixed / (1 - sum(shares.values())) if taken else min(measure(members[k]) / p for k, p in shares.items())
        for k, p in shares.items():
            taken[k] = _take(members[k], lengths, p * total, samples=not by_tokens)
    idx = np.concatenate([taken[k][0] for k in range(len(sources))] or [np.zeros(0, np.int64)])
    rep = np.concatenate([taken[k][1] for k in range(len(sources))] or [np.zeros(0, np.int64)])
    order = np.lexsort((idx, rep))  # first copies in input order, then second copies...
    return idx[order].astype(np.int64), rep[order].astype(np.int64)


def _take(members: np.ndarray, lengths: np.ndarray, amount: float, samples: bool) -> tuple[np.ndarray, np.ndarray]:
    """Whole copies of `members` (in their seeded order) plus a prefix, `amount` samples (rounded half up) or
    tokens (the prefix whose tokens come nearest) in all; (indices, copy numbers)."""
    n = len(members)
    if not n:
        return members, np.zeros(0, np.int64)
    if samples:
        count = math.floor(amount + 0.5)
        full, rest = divmod(count, n)
    else:
        total = int(lengths[members].sum())
        full, left = divmod(int(round(amount)), total) if total else (0, 0)
        cum = np.cumsum(lengths[members], dtype=np.int64)
        rest = int(np.searchsorted(cum, left, side="right"))  # the longest prefix within what is left
        if rest < n and rest and (cum[rest] - left) < (left - cum[rest - 1]):
            rest += 1  # one more comes nearer
        elif rest < n and not rest and cum[0] - left < left:
            rest = 1
    idx = np.concatenate([np.tile(members, full), members[:rest]])
    rep = np.concatenate([np.repeat(np.arange(full), n), np.full(rest, full)])
    return idx, rep
