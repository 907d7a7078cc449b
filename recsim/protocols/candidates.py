"""Candidate sets for sampled ranking: the positive plus `negatives` items drawn once per seed.

Negatives are drawn uniformly, without replacement, from the *whole* catalogue (items 1..N of the full
processed dataset) minus every item the user ever touched (their whole sequence, not only the visible
history). Each user's draws come from their own generator, seeded by (seed, split name, the user's
original id string), so a user's candidates are the same whichever other users were sampled, and every
method of a seed sees the very same sets. Column 0 is always the positive. Validation splits get their
own draws (their own split name seeds them).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from recsim.protocols.base import EncodedData, EvalSplit


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def draw_negatives(rng: np.random.Generator, seen: set[int], n_items: int, negatives: int) -> list[int]:
    """`negatives` distinct items of 1..n_items not in `seen`, in draw order (rejection sampling: a
    history is tiny next to the catalogue, so one or two rounds suffice)."""
    picks: dict[int, None] = {}  # insertion-ordered set
    while len(picks) < negatives:
        for c in rng.integers(1, n_items + 1, size=2 * negatives).tolist():
            if c not in seen:
                picks.setdefault(c)
    return list(picks)[:negatives]


def draw_candidates(split: EvalSplit, data: EncodedData, negatives: int, seed: int) -> None:
    """Fill ``split.candidates[group]`` = [n, 1 + negatives] int64, column 0 the positive."""
    n_items = data.num_items
    split_key = _crc(split.name)
    for group, samples in split.samples.items():
        rows = np.zeros((len(samples), negatives + 1), dtype=np.int64)
        for i, s in enumerate(samples):
            seen = set(data.sequences[s.user].tolist())
            if n_items - len(seen) < negatives:
                raise ValueError(f"split {split.name!r}: user {data.user_ids[s.user]!r} has touched {len(seen)} of "
                                 f"{n_items} items, so eval.negatives={negatives} negatives cannot be drawn")
            rng = np.random.default_rng([seed, split_key, _crc(data.user_ids[s.user])])
            rows[i, 0], rows[i, 1:] = s.target, draw_negatives(rng, seen, n_items, negatives)
        split.candidates[group] = rows


def save_candidates(splits: dict[str, EvalSplit], path: Path) -> None:
    arrays = {f"{name}/{g}": c for name, sp in splits.items() for g, c in sp.candidates.items()}
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
