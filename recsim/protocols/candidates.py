"""Candidate sets for sampled ranking: the positive plus `negatives` items drawn once per seed.

Negatives are drawn uniformly from all items the user never interacted with (their whole sequence,
not only the visible history), without replacement, from a generator seeded by (seed, split name), so
every method of a seed sees the very same sets. Column 0 is always the positive.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from recsim.protocols.base import EncodedData, EvalSplit


def draw_candidates(split: EvalSplit, data: EncodedData, negatives: int, seed: int) -> None:
    rng = np.random.default_rng([seed, zlib.crc32(split.name.encode())])
    n_items = data.num_items
    for group, samples in split.samples.items():
        rows = np.zeros((len(samples), negatives + 1), dtype=np.int64)
        for i, s in enumerate(samples):
            seen = set(data.sequences[s.user].tolist())
            if n_items - len(seen) < negatives:
                raise ValueError(f"user {s.user} has seen {len(seen)} of {n_items} items: cannot draw {negatives} negatives")
            picks: list[int] = []
            while len(picks) < negatives:  # rejection sampling: histories are tiny next to the catalogue
                for c in rng.integers(1, n_items + 1, size=2 * negatives):
                    if int(c) not in seen and int(c) not in picks:
                        picks.append(int(c))
                        if len(picks) == negatives:
                            break
            rows[i, 0], rows[i, 1:] = s.target, picks
        split.candidates[group] = rows


def save_candidates(splits: dict[str, EvalSplit], path: Path) -> None:
    arrays = {f"{name}/{g}": c for name, sp in splits.items() for g, c in sp.candidates.items()}
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
