"""A global chronological split of next-item samples, not a per-user one: D3's, which BIGRec and L2D use.

Every position p >= 1 of every user's sequence is one sample: its target is item p, its history the at most
``history_window`` (10) items before it, the oldest dropped. All samples of the whole dataset are ordered by
their target's time, ties by user (the order of users' first interaction in the processed data, i.e. the user
index of :class:`EncodedData`) then by position: the order D3's stable sort leaves them in. With n samples,

    train = order[: floor(n * s_train)],  valid = order[floor(n * s_train) : floor(n * (s_train + s_valid))],
    test  = the rest                       (``stage.shares`` = [s_train, s_valid, s_test] = [0.8, 0.1, 0.1]),

D3's ``int(n * 0.8)`` and ``int(n * 0.9)``. So a test sample's history may hold items whose own samples are in
validation or test (they came earlier), as in D3, and a user may have several validation and test samples.

One stage (index 0, "train", judged on split "test"), one group "all"; the validation split is "test_valid".

Choices:
- The cut is made over the samples of the whole dataset; a user sample (``dataset.sample_users``) keeps each of
  its samples in the part the whole data puts it in, so train / valid / test agree whichever users are sampled.
- Every user of the protocol is in the stage's ``sequences`` (whole sequences: a training target never sees a
  later item, since its history ends before it); users with no training sample are the stage's inactive users.
- Evaluation samples are listed in the split's order (time, user, position), as D3's test file lists them.
- Candidates (1 + ``eval.negatives``) are drawn as for every protocol, per (seed, split, user): a user's several
  samples in one split share their negatives, all from outside everything the user ever touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from recsim.protocols.base import EncodedData, EvalSplit, Protocol, StageData, iso_day, resolve_users, sample_at

PARTS = ("train", "valid", "test")
MASKED = "every validation and test sample's target position (all after the training share by target time)"


def part_ends(n: int, shares: Sequence[float]) -> tuple[int, int]:
    """Where train and valid end in the ordered samples: floor(n * s_train), floor(n * (s_train + s_valid))."""
    if len(shares) != 3 or any(not 0 < s < 1 for s in shares) or not math.isclose(sum(shares), 1.0):
        raise ValueError(f"stage.shares={list(shares)}: expected three numbers in (0, 1) (train, valid, test) summing to 1")
    train, valid = float(shares[0]), round(float(shares[0]) + float(shares[1]), 12)  # 0.8 + 0.1 is 0.9000000000000001
    return int(n * train), int(n * valid)


def split_samples(data: EncodedData, shares: Sequence[float]) -> tuple[dict[str, list[tuple[int, int]]], dict]:
    """The (user, position) of every sample of the whole dataset, per part, each part in order; and a summary."""
    users, positions, stamps = [], [], []
    for u in sorted(data.sequences):
        n = len(data.sequences[u])
        users.append(np.full(n - 1, u, dtype=np.int64))
        positions.append(np.arange(1, n, dtype=np.int64))
        stamps.append(np.asarray(data.timestamps[u][1:], dtype=np.int64))
    users, positions, stamps = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (users, positions, stamps))
    if not len(users):
        raise ValueError(f"stage=global_split: dataset {data.name!r} has no user with two interactions, so no sample")
    order = np.lexsort((positions, users, stamps))  # by target time, then user index, then position
    train_end, valid_end = part_ends(len(order), shares)
    cuts = {"train": order[:train_end], "valid": order[train_end:valid_end], "test": order[valid_end:]}
    parts = {name: list(zip(users[idx].tolist(), positions[idx].tolist())) for name, idx in cuts.items()}
    last = lambda idx: int(stamps[idx[-1]]) if len(idx) else None
    first = lambda idx: int(stamps[idx[0]]) if len(idx) else None
    summary = {"samples": {name: len(idx) for name, idx in cuts.items()},
               "target_times": {name: [first(idx), last(idx)] for name, idx in cuts.items()},
               "target_dates": {name: [iso_day(first(idx)), iso_day(last(idx))] for name, idx in cuts.items()}}
    return parts, summary


def build_global_split(data: EncodedData, shares: Sequence[float], window: int,
                       users: Sequence[int] | None = None) -> Protocol:
    users = resolve_users(data, users)
    chosen = set(users)
    parts, summary = split_samples(data, shares)
    targets = {u: [] for u in users}
    for u, p in parts["train"]:
        if u in chosen:
            targets[u].append(p)
    evaluated = {name: [sample_at(u, data.sequences[u], p, window) for u, p in parts[name] if u in chosen]
                 for name in ("valid", "test")}
    sequences = {u: data.sequences[u] for u in users}
    # one stage: everything is new and cumulative at once (separate lists, so editing one spares the other)
    new_targets = {u: sorted(ps) for u, ps in targets.items()}
    cumulative = {u: sorted(ps) for u, ps in targets.items()}
    active = [u for u in users if targets[u]]
    inactive = [u for u in users if not targets[u]]
    stage = StageData(0, "train", sequences, new_targets, cumulative, {u: 0 for u in users}, active, inactive,
                      eval_split="test")
    splits = {"test": EvalSplit("test", {"all": evaluated["test"]})}
    valid_splits = {"test": EvalSplit("test_valid", {"all": evaluated["valid"]}, role="valid")}
    description = {
        "protocol": "global_split",
        "shares": dict(zip(PARTS, map(float, shares))),
        "order": "all samples of the whole dataset by target time, ties by user (first-interaction order), position",
        "whole_data": summary,  # sizes and target-time ranges of the three parts over every user
        "groups": {"all": "every sample whose target falls in the part (a user may have several)"},
        "validation": "the samples between the train and test shares (by target time)",
        "masked_from_training": MASKED,
    }
    return Protocol(data, [stage], splits, window, description, valid_splits)
