"""From a run config to a ready protocol: whole dataset, user sample, stages, splits, candidates.

Order matters, and is the point of this module: the dataset is loaded and encoded *whole* (items 1..N
over the full catalogue), cut times come from all of its timestamps, and only then is the protocol
restricted to the sampled users (``dataset.sample_users``, seeded by ``dataset.sample_seed``, uniform
without replacement over all users of the processed data; :func:`recsim.data.preprocess.sample_user_ids`).
So a sample sees the same T and draws its negatives from the same ~12k Beauty items as the full run, and a
user's candidates do not depend on who else was sampled. Then ``stage.holdout_users`` takes a seeded share of
those users out of every stage (non-members, :mod:`recsim.protocols.holdout`), before candidates are drawn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsim.data.load import load_dataset
from recsim.data.preprocess import sample_user_ids
from recsim.protocols import build_protocol
from recsim.protocols.base import EncodedData, Protocol, resolve_users
from recsim.protocols.candidates import draw_candidates, save_candidates
from recsim.protocols.holdout import apply_holdout, holdout_settings
from recsim.schema import validate_against_data
from recsim.utils.io import write_json

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    data: EncodedData  # the whole processed dataset
    protocol: Protocol  # stages and splits for the sampled users, candidates drawn
    stats: dict  # {"full": stats of the processed data, "sample": stats of the sampled users or None}
    description: dict  # what protocol.json holds


def encoded_stats(data: EncodedData, users: list[int]) -> dict:
    """The keys of :meth:`InteractionData.stats` for a subset of the users of `data`."""
    seqs = [data.sequences[u] for u in users]
    stamps = [data.timestamps[u] for u in users]
    n = int(sum(map(len, seqs)))
    return {"dataset": data.name, "users": len(users), "items": int(len(np.unique(np.concatenate(seqs)))) if n else 0,
            "interactions": n, "timestamp_min": int(min(t.min() for t in stamps)) if n else None,
            "timestamp_max": int(max(t.max() for t in stamps)) if n else None}


def sampled_users(data: EncodedData, n: int | None, seed: int) -> list[int] | None:
    """User indices of the seeded sample (None: every user)."""
    chosen = sample_user_ids(data.user_ids, n, seed)
    if chosen is None:
        return None
    return [i for i, uid in enumerate(data.user_ids) if uid in chosen]


def describe(protocol: Protocol, sample: dict) -> dict:
    groups = lambda splits: {n: {g: len(v) for g, v in sp.samples.items()} for n, sp in splits.items()}
    return {**protocol.description, "window": protocol.window, "sample": sample, "stages": [
        {"index": s.index, "name": s.name, "active_users": len(s.active_users), "inactive_users": len(s.inactive_users),
         "new_targets": sum(map(len, s.new_targets.values())), "eval_split": s.eval_split} for s in protocol.stages],
        "splits": groups(protocol.splits),
        "valid_splits": groups({sp.name: sp for sp in protocol.valid_splits.values()})}


def prepare_protocol(cfg) -> Prepared:
    """Load the whole dataset, sample users, build the protocol, hold out non-members and draw test and
    validation candidates."""
    share, holdout_seed = holdout_settings(cfg.stage)  # a bad share errors before the data is read
    raw = load_dataset(cfg.dataset, cache_dir=cfg.paths.cache_dir)
    full_stats = raw.stats()
    data = EncodedData.from_data(raw)
    validate_against_data(cfg, data.num_items)  # e.g. eval.negatives against the catalogue, before any work
    n = cfg.dataset.get("sample_users")
    seed = cfg.dataset.get("sample_seed")
    seed = 0 if seed is None else int(seed)
    users = sampled_users(data, None if n is None else int(n), seed)
    protocol = build_protocol(cfg.stage, data, users)
    protocol = apply_holdout(protocol, data.user_ids, resolve_users(data, users), share,
                             int(cfg.seed) if holdout_seed is None else holdout_seed)
    for split in protocol.all_splits():
        draw_candidates(split, data, cfg.eval.negatives, cfg.seed)
    sample_stats = None if users is None else encoded_stats(data, users)
    log.info("dataset %s: %s users of %s (sample_users=%s, sample_seed=%s)", data.name,
             full_stats["users"] if users is None else len(users), full_stats["users"], n, seed)
    sample = {"requested": n, "seed": seed, "users": full_stats["users"] if users is None else len(users)}
    return Prepared(data, protocol, {"full": full_stats, "sample": sample_stats}, describe(protocol, sample))


def save_prepared(prepared: Prepared, out: Path) -> None:
    """dataset_stats.json, candidates.npz (test and validation splits) and protocol.json of a run."""
    write_json(out / "dataset_stats.json", prepared.stats)
    save_candidates({s.name: s for s in prepared.protocol.all_splits()}, out / "candidates.npz")
    write_json(out / "protocol.json", prepared.description)
