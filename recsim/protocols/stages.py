"""PESO's protocol: the first 60% of interactions (by time), then equal later windows.

Window k is cut by quantiles of *all* timestamps of the whole dataset (shares configurable; a user
sample sees the same bounds). Stage t trains on window t and is judged on window t+1: each user with
interactions in window t+1 is held out on their last interaction there (one test target per user, as
in leave-one-out). Groups in window k (the evaluated one):
  U_A = users also active in the training window k-1;
  U_I = users with history before window k but none in window k-1;
  new = users with no interaction before window k (their target needs >= 1 earlier item in window k).
Validation: the current window's second-to-last interaction (as PESO's code does: train on
current[:-2], validate on current[-2], test on current[-1]): test position p -> p-1 when p-1 is in
window k and p-1 >= 1; else the user has no validation sample.
Every test and validation target of every window is removed from every stage's training targets. The
last window is only ever a test window.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsim.protocols.base import (EncodedData, EvalSplit, Protocol, StageData, all_timestamps, iso_day,
                                   resolve_users, sample_at, train_positions)

GROUPS = ("U_A", "U_I", "new")
MASKED = "every test and validation target of every window, at every stage"


def window_bounds(data: EncodedData, first_share: float, window_shares: list[float]) -> list[float]:
    stamps = all_timestamps(data)
    shares = np.cumsum([first_share, *window_shares])
    if shares[-1] > 1 + 1e-9:
        raise ValueError(f"stage.first_share + sum(stage.window_shares) = {shares[-1]:.3f} > 1")
    ends = [float(np.quantile(stamps, s, method="lower")) for s in shares[:-1]] + [np.inf]
    return [-np.inf, *ends]  # window k = (bounds[k], bounds[k+1]]


def build_stages(data: EncodedData, first_share: float, window_shares: list[float], window: int,
                 users: Sequence[int] | None = None) -> Protocol:
    bounds = window_bounds(data, first_share, list(window_shares))
    n_windows = len(bounds) - 1
    users = resolve_users(data, users)
    held: dict[int, set[int]] = {u: set() for u in users}
    counts = {u: np.searchsorted(data.timestamps[u], bounds, side="right") for u in users}  # #interactions <= bound
    tests = [{g: [] for g in GROUPS} for _ in range(n_windows)]
    valids = [{g: [] for g in GROUPS} for _ in range(n_windows)]
    for u in users:
        seq, n_at = data.sequences[u], counts[u]
        for k in range(1, n_windows):
            lo, hi = int(n_at[k]), int(n_at[k + 1])  # window k = positions lo..hi-1
            p = hi - 1
            if hi == lo or p < 1:
                continue  # not in this window, or a first-ever interaction with no history
            group = "new" if lo == 0 else "U_A" if n_at[k - 1] < lo else "U_I"
            held[u].add(p)
            tests[k][group].append(sample_at(u, seq, p, window))
            if p - 1 >= max(1, lo):
                held[u].add(p - 1)
                valids[k][group].append(sample_at(u, seq, p - 1, window))

    stages = []
    for t in range(n_windows - 1):
        sequences, new_t, cum_t, boundary, active, inactive = {}, {}, {}, {}, [], []
        for u in users:
            n_visible, n_old = int(counts[u][t + 1]), int(counts[u][t])
            if n_visible == 0:
                continue
            sequences[u] = data.sequences[u][:n_visible]
            boundary[u] = n_old
            cum_t[u] = train_positions(n_visible, held[u])
            new_t[u] = [p for p in cum_t[u] if p >= n_old]
            (active if n_visible > n_old else inactive).append(u)
        stages.append(StageData(t, f"stage{t}", sequences, new_t, cum_t, boundary, active, inactive,
                                eval_split=f"window{t + 1}"))
    names = {k: f"window{k}" for k in range(1, n_windows)}
    splits = {n: EvalSplit(n, tests[k]) for k, n in names.items()}
    valid_splits = {n: EvalSplit(f"{n}_valid", valids[k], role="valid") for k, n in names.items()}
    bounds_out = [None if not np.isfinite(b) else int(b) for b in bounds]
    description = {
        "protocol": "stages", "bounds": bounds_out, "bound_dates": [iso_day(b) for b in bounds_out],
        "groups": {"U_A": "active in the training window k-1; target: last in window k",
                   "U_I": "history before window k, none in window k-1; target: last in window k",
                   "new": "no interaction before window k; target: last in window k (>= 1 earlier there)"},
        "validation": "second-to-last interaction of window k (p-1 in window k, p-1 >= 1)",
        "masked_from_training": MASKED,
    }
    return Protocol(data, stages, splits, window, description, valid_splits)
