"""PESO's protocol: the first 60% of interactions (by time), then equal later windows.

Window k is cut by timestamp quantiles (shares configurable). Stage t trains on window t and is judged
on window t+1: each user of window t+1 is held out on their last interaction there (one test target
per user, as in leave-one-out; PESO's code also holds out a validation item, which recsim does not
need). Held-out targets are never trained on. Groups in window t+1: U_A = users who were also active
in the training window t, U_I = the others. The last window is only ever a test window.
"""

from __future__ import annotations

import numpy as np

from recsim.protocols.base import EncodedData, EvalSplit, Protocol, Sample, StageData


def window_bounds(data: EncodedData, first_share: float, window_shares: list[float]) -> list[float]:
    stamps = np.concatenate(list(data.timestamps.values()))
    shares = np.cumsum([first_share, *window_shares])
    if shares[-1] > 1 + 1e-9:
        raise ValueError(f"stage.first_share + sum(stage.window_shares) = {shares[-1]:.3f} > 1")
    ends = [float(np.quantile(stamps, s, method="lower")) for s in shares[:-1]] + [np.inf]
    return [-np.inf, *ends]  # window k = (bounds[k], bounds[k+1]]


def build_stages(data: EncodedData, first_share: float, window_shares: list[float], window: int) -> Protocol:
    bounds = window_bounds(data, first_share, list(window_shares))
    n_windows = len(bounds) - 1
    held: dict[int, set[int]] = {u: set() for u in data.sequences}
    positions = {u: np.searchsorted(bounds, ts, side="left") - 1 for u, ts in data.timestamps.items()}  # window of each
    split_samples = [{"U_A": [], "U_I": []} for _ in range(n_windows)]
    for u, win in positions.items():
        seq = data.sequences[u]
        for k in range(1, n_windows):
            inside = np.flatnonzero(win == k)
            if not len(inside) or inside[-1] == 0:
                continue
            p = int(inside[-1])
            held[u].add(p)
            group = "U_A" if np.any(win == k - 1) else "U_I"
            split_samples[k][group].append(Sample(u, tuple(int(i) for i in seq[max(0, p - window) : p]), int(seq[p]), p))

    stages = []
    for t in range(n_windows - 1):
        sequences, new_t, cum_t, boundary, active, inactive = {}, {}, {}, {}, [], []
        for u, win in positions.items():
            n_visible = int(np.sum(win <= t))
            if n_visible == 0:
                continue
            n_old = int(np.sum(win < t))
            sequences[u] = data.sequences[u][:n_visible]
            boundary[u] = n_old
            cum_t[u] = [p for p in range(1, n_visible) if p not in held[u]]
            new_t[u] = [p for p in cum_t[u] if p >= n_old]
            (active if n_visible > n_old else inactive).append(u)
        stages.append(StageData(t, f"stage{t}", sequences, new_t, cum_t, boundary, sorted(active), sorted(inactive),
                                eval_split=f"window{t + 1}"))
    splits = {f"window{k}": EvalSplit(f"window{k}", split_samples[k]) for k in range(1, n_windows)}
    bounds_out = [None if not np.isfinite(b) else int(b) for b in bounds]
    return Protocol(data, stages, splits, window, {"protocol": "stages", "bounds": bounds_out})
