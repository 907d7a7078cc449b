"""EvoRec's protocol: train on interactions up to T, then update on what active users did after T.

Rounds: cut times T_1 < ... < T_R, quantiles of *all* timestamps of the whole dataset (never of a user
sample, so a sample sees the same T as the full data). Stage 0 trains on everything <= T_1; stage r
updates with the window (T_r, T_{r+1}] (T_{R+1} = +inf) and is judged on round r's split; stage 0 on
round 1's (the "no update" row). In round r a user is
  U_A (active):   history <= T_r and interactions in the window; target = their last one in the window;
  U_I (inactive): history <= T_r and nothing in the window; target = their last interaction <= T_r;
  new:            first interaction inside the window (no history <= T_r); target = their last one in the
                  window, which needs >= 1 earlier in-window item as history.
`new` is its own group: the paper's U_A and U_I both have a pre-T history, and a user without one is
neither. It is reported on its own (and in "all"), never mixed into U_A or U_I.

Validation: for a user with test position p the validation target is p-1 when it is in the same period
(inside the window for U_A and new, <= T_r for U_I, which always holds), p-1 >= 1, and p-1 is not a test
target of another round (a U_I user's p-1 can be an earlier round's in-window test target); else the
user has no validation sample in that round.

Masking: every test and validation target of every round is removed from the training targets of every
stage, so no evaluated interaction is ever trained on, also not by a later update round; it stays
visible as history (as in leave-one-out).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsim.protocols.base import (EncodedData, EvalSplit, Protocol, StageData, all_timestamps, iso_day,
                                   resolve_users, sample_at, train_positions)

GROUPS = ("U_A", "U_I", "new")
MASKED = "every test and validation target of every round, at every stage"


def cut_times(data: EncodedData, quantiles: list[float]) -> list[int]:
    stamps = all_timestamps(data)
    cuts = [int(np.quantile(stamps, q, method="lower")) for q in quantiles]
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"stage.t_quantiles={quantiles} give non-increasing cut times {cuts}")
    return cuts


def build_two_period(data: EncodedData, t_quantiles: list[float], window: int,
                     users: Sequence[int] | None = None) -> Protocol:
    cuts = cut_times(data, list(t_quantiles))
    bounds = cuts + [np.iinfo(np.int64).max]
    rounds = len(cuts)
    users = resolve_users(data, users)
    held: dict[int, set[int]] = {u: set() for u in users}
    tests = [{g: [] for g in GROUPS} for _ in range(rounds)]
    valids = [{g: [] for g in GROUPS} for _ in range(rounds)]
    for u in users:
        ts, seq = data.timestamps[u], data.sequences[u]
        n_at = np.searchsorted(ts, bounds, side="right")  # n_at[r] = #interactions <= bounds[r] (ts sorted)
        evaluated = []  # (round, group, test position, first position of the test's period)
        for r in range(rounds):
            n_before, n_end = int(n_at[r]), int(n_at[r + 1])
            if n_before and n_end > n_before:
                evaluated.append((r, "U_A", n_end - 1, n_before))
            elif n_before:
                evaluated.append((r, "U_I", n_before - 1, 0))
            elif n_end:
                evaluated.append((r, "new", n_end - 1, 0))
            # else: the user has not arrived yet
        # a first-ever interaction (p = 0) has no history to predict it from
        test_positions = {p for _, _, p, _ in evaluated if p >= 1}
        for r, group, p, period_start in evaluated:
            if p < 1:
                continue
            held[u].add(p)
            tests[r][group].append(sample_at(u, seq, p, window))
            # a U_I user's p-1 may be an earlier round's test target: then it cannot validate
            if p - 1 >= max(1, period_start) and p - 1 not in test_positions:
                held[u].add(p - 1)
                valids[r][group].append(sample_at(u, seq, p - 1, window))

    stages = []
    for r in range(rounds + 1):
        start = None if r == 0 else bounds[r - 1]  # new data of stage r: (start, end]
        end = bounds[0] if r == 0 else bounds[r]
        sequences, new_t, cum_t, boundary, active, inactive = {}, {}, {}, {}, [], []
        for u in users:
            ts = data.timestamps[u]
            n_visible = int(np.searchsorted(ts, end, side="right"))
            if n_visible == 0:
                continue
            n_old = int(np.searchsorted(ts, start, side="right")) if r else 0
            sequences[u] = data.sequences[u][:n_visible]
            boundary[u] = n_old
            cum_t[u] = train_positions(n_visible, held[u])
            new_t[u] = [p for p in cum_t[u] if p >= n_old]
            (active if n_visible > n_old else inactive).append(u)
        stages.append(StageData(r, "base" if r == 0 else f"update{r}", sequences, new_t, cum_t, boundary,
                                active, inactive, eval_split=f"round{max(r, 1)}"))
    names = [f"round{r + 1}" for r in range(rounds)]
    splits = {n: EvalSplit(n, tests[r]) for r, n in enumerate(names)}
    valid_splits = {n: EvalSplit(f"{n}_valid", valids[r], role="valid") for r, n in enumerate(names)}
    description = {
        "protocol": "two_period", "cut_times": cuts, "cut_dates": [iso_day(c) for c in cuts],
        "groups": {"U_A": "history <= T_r and interactions in (T_r, T_r+1]; target: last in the window",
                   "U_I": "history <= T_r, nothing in (T_r, T_r+1]; target: last <= T_r",
                   "new": "first interaction in (T_r, T_r+1]; target: last in the window (>= 1 earlier there)"},
        "validation": "test position p -> p-1 if in the same period (window for U_A/new, <= T_r for U_I), "
                      "p-1 >= 1 and p-1 is no round's test target",
        "masked_from_training": MASKED,
    }
    return Protocol(data, stages, splits, window, description, valid_splits)
