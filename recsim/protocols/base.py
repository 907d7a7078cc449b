"""What every protocol produces: encoded sequences, stages to train on, and evaluation splits.

Items are integers 1..N (0 is padding), users 0..U-1. A protocol never hands out (history, target)
pairs directly for training; it hands out per-user *sequences* plus the positions that may serve as
training targets. Methods that filter data (EvoRec's Forget) edit sequences, then call
:func:`make_samples`; evaluated positions are never in any stage's target set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from recsim.data.schema import InteractionData


@dataclass(frozen=True)
class Sample:
    user: int
    history: tuple[int, ...]  # item ids, oldest first, at most `window` long
    target: int
    position: int = -1  # index of the target in the user's full sequence (-1: unknown)


@dataclass
class EncodedData:
    """Integer view of an :class:`InteractionData`, shared by every stage."""

    name: str
    sequences: dict[int, np.ndarray]  # user -> item ids, chronological
    timestamps: dict[int, np.ndarray]  # user -> unix seconds, aligned with sequences
    titles: list[str]  # titles[item]; titles[0] is the padding placeholder
    item_ids: list[str]  # original item id of each integer item; item_ids[0] = ""
    user_ids: list[str]

    @property
    def num_items(self) -> int:
        return len(self.titles) - 1

    @classmethod
    def from_data(cls, data: InteractionData) -> "EncodedData":
        items = data.items.drop_duplicates("item_id").set_index("item_id")
        used = pd.unique(data.interactions["item_id"])
        item_ids = [""] + sorted(used.tolist())
        item_index = {iid: i for i, iid in enumerate(item_ids)}
        titles = ["<pad>"] + [str(items.at[iid, "title"]) for iid in item_ids[1:]]
        user_ids = list(pd.unique(data.interactions["user_id"]))
        user_index = {u: i for i, u in enumerate(user_ids)}
        sequences, timestamps = {}, {}
        inter = data.interactions
        codes = inter["item_id"].map(item_index).to_numpy(np.int64)
        users = inter["user_id"].map(user_index).to_numpy(np.int64)
        stamps = inter["timestamp"].to_numpy(np.int64)
        # stable sort keeps the source's order among same-day ties
        order = np.lexsort((np.arange(len(users)), stamps, users))
        users, codes, stamps = users[order], codes[order], stamps[order]
        bounds = np.flatnonzero(np.diff(users)) + 1
        for chunk_u, chunk_i, chunk_t in zip(
            np.split(users, bounds), np.split(codes, bounds), np.split(stamps, bounds)
        ):
            if len(chunk_u):
                sequences[int(chunk_u[0])] = chunk_i
                timestamps[int(chunk_u[0])] = chunk_t
        return cls(data.name, sequences, timestamps, titles, item_ids, user_ids)


@dataclass
class StageData:
    """One stage of a continual protocol.

    ``sequences[u]`` is what user u has done up to the end of this stage's window (evaluated positions
    included: they stay visible as history, never as targets). ``new_targets[u]`` are the positions
    this stage's update may learn from; ``cumulative_targets[u]`` every trainable position up to here
    (what `retrain` uses). ``boundary[u]`` is where the stage's window starts in ``sequences[u]``:
    S^{A-} = sequences[u][:boundary[u]], S^{A+} = the rest.
    """

    index: int
    name: str
    sequences: dict[int, np.ndarray]
    new_targets: dict[int, list[int]]
    cumulative_targets: dict[int, list[int]]
    boundary: dict[int, int]
    active_users: list[int]
    inactive_users: list[int]
    eval_split: str  # name of the split this stage is judged on "now" (the R matrix diagonal)


@dataclass
class EvalSplit:
    """Held-out next-item targets, grouped by user group ("U_A", "U_I"). Candidates are drawn once."""

    name: str
    samples: dict[str, list[Sample]]
    candidates: dict[str, np.ndarray] = field(default_factory=dict)  # group -> [n, 1 + negatives]

    def all_samples(self) -> list[Sample]:
        return [s for group in self.samples.values() for s in group]


@dataclass
class Protocol:
    data: EncodedData
    stages: list[StageData]
    splits: dict[str, EvalSplit]
    window: int
    description: dict = field(default_factory=dict)


def make_samples(
    sequences: dict[int, np.ndarray],
    targets: dict[int, list[int]],
    window: int,
    users=None,
) -> list[Sample]:
    """Sliding-window next-item samples: position p of user u predicts seq[p] from seq[p-window:p]."""
    out = []
    for u in sorted(targets if users is None else users):
        seq = sequences[u]
        for p in targets.get(u, ()):
            if p <= 0:
                continue  # nothing to condition on
            out.append(Sample(u, tuple(int(i) for i in seq[max(0, p - window) : p]), int(seq[p]), p))
    return out
