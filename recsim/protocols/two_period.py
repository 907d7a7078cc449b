"""EvoRec's protocol: train on interactions up to T, then update on what active users did after T.

Rounds: cut times T_1 < ... < T_R (quantiles of all timestamps). Stage 0 trains on everything <= T_1;
stage r updates with the window (T_r, T_{r+1}] (T_{R+1} = +inf). In round r a user is
  U_A (active) if they interacted inside the window: target = their last interaction in the window;
  U_I (inactive) otherwise: target = their last interaction <= T_r.
Every such target, of every round, is removed from the training targets of every stage, so no
evaluated interaction is ever trained on; it stays visible as history (as in leave-one-out).
Stage 0 is judged on round 1's split (the "no update" row); stage r on round r's.
"""

from __future__ import annotations

import numpy as np

from recsim.protocols.base import EncodedData, EvalSplit, Protocol, Sample, StageData


def cut_times(data: EncodedData, quantiles: list[float]) -> list[int]:
    stamps = np.concatenate(list(data.timestamps.values()))
    cuts = [int(np.quantile(stamps, q, method="lower")) for q in quantiles]
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"stage.t_quantiles={quantiles} give non-increasing cut times {cuts}")
    return cuts


def build_two_period(data: EncodedData, t_quantiles: list[float], window: int) -> Protocol:
    cuts = cut_times(data, list(t_quantiles))
    bounds = cuts + [np.iinfo(np.int64).max]
    rounds = len(cuts)
    held: dict[int, set[int]] = {u: set() for u in data.sequences}
    split_samples = [{"U_A": [], "U_I": []} for _ in range(rounds)]
    for u, ts in data.timestamps.items():
        seq = data.sequences[u]
        for r in range(rounds):
            inside = np.flatnonzero((ts > bounds[r]) & (ts <= bounds[r + 1]))
            before = np.flatnonzero(ts <= bounds[r])
            if len(inside):
                group, p = "U_A", int(inside[-1])
            elif len(before):
                group, p = "U_I", int(before[-1])
            else:
                continue  # the user has not arrived yet
            held[u].add(p)
            if p > 0:  # a first-ever interaction has no history to predict it from
                split_samples[r][group].append(Sample(u, tuple(int(i) for i in seq[max(0, p - window) : p]), int(seq[p]), p))

    stages = []
    for r in range(rounds + 1):
        start = -np.inf if r == 0 else bounds[r - 1]  # new data of stage r: (start, end]
        end = bounds[0] if r == 0 else bounds[r]
        sequences, new_t, cum_t, boundary, active, inactive = {}, {}, {}, {}, [], []
        for u, ts in data.timestamps.items():
            n_visible = int(np.searchsorted(ts, end, side="right"))
            if n_visible == 0:
                continue
            n_old = int(np.searchsorted(ts, start, side="right")) if r else 0
            sequences[u] = data.sequences[u][:n_visible]
            boundary[u] = n_old
            cum_t[u] = [p for p in range(1, n_visible) if p not in held[u]]
            new_t[u] = [p for p in cum_t[u] if p >= n_old]
            (active if n_visible > n_old else inactive).append(u)
        stages.append(
            StageData(r, "base" if r == 0 else f"update{r}", sequences, new_t, cum_t, boundary,
                      sorted(active), sorted(inactive), eval_split=f"round{max(r, 1)}")
        )
    splits = {f"round{r + 1}": EvalSplit(f"round{r + 1}", split_samples[r]) for r in range(rounds)}
    return Protocol(data, stages, splits, window, {"protocol": "two_period", "cut_times": cuts})
