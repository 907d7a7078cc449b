"""What every protocol produces: encoded sequences, stages to train on, and evaluation splits.

Items are integers 1..N (0 is padding) over the whole processed catalogue, users 0..U-1 over all users.
A protocol may be built for a subset of the users (``dataset.sample_users``): cut times, the catalogue
and the negatives still come from the whole data, only stages and splits are restricted to the subset.
A protocol never hands out (history, target) pairs directly for training; it hands out per-user
*sequences* plus the positions that may serve as training targets. Methods that filter data (EvoRec's
Forget) edit sequences, then call :func:`make_samples`; evaluated positions (test *and* validation
targets) are never in any stage's target set.

Every test split has a validation split (``Protocol.valid_splits[name]``, named ``f"{name}_valid"``,
same groups). Its target for a user with test position p is p-1 when p-1 lies in the same period as p
and has history (p-1 >= 1), otherwise that user has no validation sample: one held-out step before the
test step, so that choosing checkpoints or hyperparameters never looks at a test target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

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
    """Held-out next-item targets, grouped by user group ("U_A", "U_I", "new", or "all"). Candidates are
    drawn once. ``role`` is "test" or "valid" (a validation split never holds a test target)."""

    name: str
    samples: dict[str, list[Sample]]
    candidates: dict[str, np.ndarray] = field(default_factory=dict)  # group -> [n, 1 + negatives]
    role: str = "test"

    def __post_init__(self):
        if self.role not in ("test", "valid"):
            raise ValueError(f"EvalSplit {self.name!r}: role={self.role!r} is not one of: test, valid")

    def all_samples(self) -> list[Sample]:
        return [s for group in self.samples.values() for s in group]


@dataclass
class Protocol:
    data: EncodedData  # always the whole dataset, whichever users the stages and splits cover
    stages: list[StageData]
    splits: dict[str, EvalSplit]  # test splits by name
    window: int
    description: dict = field(default_factory=dict)
    valid_splits: dict[str, EvalSplit] = field(default_factory=dict)  # test split name -> its validation split

    def all_splits(self) -> list[EvalSplit]:
        """Test splits, then validation splits (what candidates are drawn and saved for)."""
        return [*self.splits.values(), *self.valid_splits.values()]


def resolve_users(data: EncodedData, users: Sequence[int] | None) -> list[int]:
    """The users a protocol is built for, sorted (None: every user of `data`)."""
    if users is None:
        return sorted(data.sequences)
    chosen = sorted({int(u) for u in users})
    unknown = [u for u in chosen if u not in data.sequences]
    if unknown:
        raise ValueError(f"users {unknown[:5]} are not user indices of dataset {data.name!r} "
                         f"(0..{len(data.user_ids) - 1})")
    return chosen


def all_timestamps(data: EncodedData) -> np.ndarray:
    """Every interaction time of the whole dataset: cut times never depend on a user sample."""
    return np.concatenate(list(data.timestamps.values()))


def iso_day(ts: float | None) -> str | None:
    if ts is None or not np.isfinite(ts):
        return None
    return datetime.fromtimestamp(int(ts), tz=timezone.utc).strftime("%Y-%m-%d")


def sample_at(user: int, seq: np.ndarray, p: int, window: int) -> Sample:
    """Predict seq[p] from the (at most `window`) items before it."""
    return Sample(user, tuple(int(i) for i in seq[max(0, p - window) : p]), int(seq[p]), p)


def train_positions(n_visible: int, held: set[int]) -> list[int]:
    """Trainable target positions of a visible prefix: all but position 0 (no history) and held-out ones."""
    return [p for p in range(1, n_visible) if p not in held]


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
            out.append(sample_at(u, seq, p, window))
    return out
