"""Held-out users: a seeded share of the protocol's users that no model ever trains on (non-members).

A membership-inference audit (arXiv 2511.14763: 80% members / 20% non-members) needs users whose samples
were never in any training set. ``stage.holdout_users`` = s in [0, 1) holds out floor(s * n) of the n users
the protocol is built for (after ``dataset.sample_users``), drawn uniformly without replacement from their
sorted original ids with ``stage.holdout_seed`` (default ``seed``), so the choice depends only on the set of
users and the seed, as the user sample does.

Where: one step of :func:`recsim.protocols.prepare.prepare_protocol`, after the protocol is built and before
candidates are drawn, the same for every protocol. Every method, filter and pool takes its training data from
a stage (``sequences`` with ``new_targets`` / ``cumulative_targets`` / ``boundary`` / ``active_users`` /
``inactive_users``: finetune and retrain, EvoRec's filter data, inactive-user KL pool and located users, EWC's
Fisher samples, LSAT's long-term data, the cumulative adapters' inputs, L2D's ``seen`` memory), so removing the
held-out users from every stage removes them from all of these at once. Cut times, the catalogue and every
member's samples stay exactly as without the setting.

Choices:
- Their test samples move, in every test split, from their group (U_A, U_I, new or all) into one group
  ``holdout``, scored beside the others and never pooled into the "all" row. protocol.json records, per split,
  which group each came from.
- Their validation samples are dropped: validation picks checkpoints, early stopping and LSAT's fusion weight,
  which would let a non-member shape the model.
- A share that holds out no user (floor(s * n) = 0) is an error: an audit would find no non-member.
- ``stage.holdout_users = 0`` (the default) changes nothing at all, protocol.json and the stage-0 key included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from recsim.protocols.base import EvalSplit, Protocol, StageData

HOLDOUT = "holdout"  # the non-members' group in every test split
SETTINGS = ("holdout_users", "holdout_seed")  # their stage.* keys


def holdout_settings(stage_cfg) -> tuple[float, int | None]:
    """(share, seed) from the stage config; configs written before the setting hold out nothing."""
    share = stage_cfg.get("holdout_users", 0) or 0
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
        raise ValueError(f"stage.holdout_users={share!r}: expected a number in [0, 1) (the share of users held out)")
    seed = stage_cfg.get("holdout_seed")
    return float(share), None if seed is None else int(seed)


def choose_holdout(user_ids: list[str], users: Sequence[int], share: float, seed: int) -> list[int]:
    """The held-out user indices, sorted: floor(share * n) of `users`, drawn by their sorted original ids."""
    count = math.floor(share * len(users))
    if count == 0:
        raise ValueError(f"stage.holdout_users={share} of {len(users)} users holds out none: "
                         f"use at least {1 / len(users):.4g} (or 0 to hold out nobody)")
    by_id = sorted(users, key=lambda u: user_ids[u])
    picked = np.random.default_rng(seed).choice(len(by_id), size=count, replace=False)
    return sorted(by_id[i] for i in picked)


def _without(stage: StageData, held: set[int]) -> StageData:
    """The stage without the held-out users: no sequence, target, boundary or activity of theirs is left."""
    keep = lambda d: {u: v for u, v in d.items() if u not in held}
    return replace(stage, sequences=keep(stage.sequences), new_targets=keep(stage.new_targets),
                   cumulative_targets=keep(stage.cumulative_targets), boundary=keep(stage.boundary),
                   active_users=[u for u in stage.active_users if u not in held],
                   inactive_users=[u for u in stage.inactive_users if u not in held])


def _test_split(split: EvalSplit, held: set[int]) -> tuple[EvalSplit, dict[str, int]]:
    """The split with the held-out users' samples moved into HOLDOUT; and how many came from each group."""
    members = {g: [s for s in v if s.user not in held] for g, v in split.samples.items()}
    moved = {g: [s for s in v if s.user in held] for g, v in split.samples.items()}
    samples = {**members, HOLDOUT: [s for v in moved.values() for s in v]}
    return replace(split, samples=samples, candidates={}), {g: len(v) for g, v in moved.items()}


def apply_holdout(protocol: Protocol, user_ids: list[str], users: Sequence[int], share: float,
                  seed: int) -> Protocol:
    """`protocol` with a `share` of `users` held out (see the module docstring); itself when share is 0.
    Call before candidates are drawn (they are drawn per user, so moving a sample between groups keeps them)."""
    if share == 0:
        return protocol
    held_users = choose_holdout(user_ids, users, share, seed)
    held = set(held_users)
    splits, origins = {}, {}
    for name, split in protocol.splits.items():
        splits[name], origins[name] = _test_split(split, held)
    valid = {name: replace(s, samples={g: [x for x in v if x.user not in held] for g, v in s.samples.items()},
                           candidates={}) for name, s in protocol.valid_splits.items()}
    description = dict(protocol.description)
    description["groups"] = {**description.get("groups", {}),
                             HOLDOUT: "held-out users (non-members, stage.holdout_users): every test target of "
                                      "theirs; never trained on, never pooled into all"}
    description["masked_from_training"] = (f"{description.get('masked_from_training', '')}; every interaction of "
                                           f"the held-out users").lstrip("; ")
    description["holdout"] = {
        "share": share, "seed": seed, "of_users": len(users), "users": len(held_users),
        "user_ids": [user_ids[u] for u in held_users], "user_indices": held_users,
        "from_groups": origins,  # test split -> group the held-out samples came from -> count
        "validation": "the held-out users' validation samples are dropped",
    }
    return replace(protocol, stages=[_without(s, held) for s in protocol.stages], splits=splits,
                   description=description, valid_splits=valid)


def stage_key(stage: dict) -> dict:
    """The stage config as the stage-0 cache key holds it: without the holdout settings when nothing is held out,
    so such a key is exactly the key written before the setting existed."""
    if stage.get("holdout_users", 0) in (0, None):
        return {k: v for k, v in stage.items() if k not in SETTINGS}
    return stage
