"""How well an attack's scores tell members (label 1) from non-members (label 0): ROC AUC and TPR at a low FPR,
each with a seeded bootstrap interval over users.

- AUC: rank-based (Mann–Whitney), ties averaged: AUC = (R_1 − n_1(n_1 + 1)/2) / (n_1 n_0), R_1 the sum of the
  members' ranks among all scores = P(member's score > non-member's) + ½ P(equal).
- TPR at 1% FPR (the paper's operating point; `tpr_at_fpr` takes any α): the largest TPR of a threshold whose FPR is <= α, predicting "member" for
  score >= threshold; no interpolation between ROC points. With fewer than 1/α non-members only a threshold
  above every non-member qualifies (FPR 0), which is what such a sample can show.
- Intervals: percentile bootstrap with users as the resampling unit, within each class (members and non-members
  are drawn separately, each as many users as it has): a user's samples share a history and move together, so
  resampling single samples would make the interval too narrow. Every statistic of one attack is computed on
  the same resamples (`np.random.default_rng(seed)`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats


def roc_auc(scores, labels) -> float:
    """P(score of a member > score of a non-member), ties counting ½; NaN without both classes."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n1, n0 = int(labels.sum()), int((~labels).sum())
    if not n1 or not n0:
        return float("nan")
    ranks = stats.rankdata(scores)  # 1-based, ties get their average rank
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at_fpr(scores, labels, fpr: float = 0.01) -> float:
    """The largest TPR over thresholds t (member iff score >= t) with FPR(t) <= `fpr`; NaN without both classes."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    if not len(pos) or not len(neg):
        return float("nan")
    thresholds = np.unique(scores)
    tp = len(pos) - np.searchsorted(pos, thresholds, side="left")  # members with score >= t
    fp = len(neg) - np.searchsorted(neg, thresholds, side="left")
    allowed = fp <= fpr * len(neg) + 1e-9  # the threshold above every score (TPR 0, FPR 0) is always allowed
    return float(max(tp[allowed].max(initial=0) / len(pos), 0.0))


def user_bootstrap(statistics: dict[str, Callable], scores, labels, users, n_boot: int, seed: int,
                   alpha: float = 0.05) -> dict[str, tuple[float, float]]:
    """{name: (low, high)}: the (1 − alpha) percentile interval of each statistic(scores, labels) over `n_boot`
    resamples of users with replacement, within each class (see the module doc)."""
    scores, labels, users = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool), np.asarray(users)
    if n_boot < 1:
        raise ValueError(f"audit.n_boot={n_boot}: expected an integer >= 1")
    rng = np.random.default_rng(seed)
    classes = []  # per class: the sample indices of each of its users
    for cls in (True, False):
        rows = np.flatnonzero(labels == cls)
        order = rows[np.argsort(users[rows], kind="stable")]
        _, starts = np.unique(users[order], return_index=True)
        classes.append(np.split(order, starts[1:]))
    values = {name: np.empty(n_boot) for name in statistics}
    for b in range(n_boot):
        picked = np.concatenate([groups[i] for groups in classes if groups
                                 for i in rng.integers(0, len(groups), len(groups))])
        for name, statistic in statistics.items():
            values[name][b] = statistic(scores[picked], labels[picked])
    return {name: tuple(float(q) for q in np.nanquantile(v, [alpha / 2, 1 - alpha / 2])) for name, v in values.items()}


LOW_FPR = 0.01  # the operating point of tpr_at_1fpr


def attack_metrics(scores, labels, users, n_boot: int, seed: int) -> dict:
    """auc, auc_lo, auc_hi, tpr_at_1fpr, tpr_lo, tpr_hi of one attack's scores (95% intervals)."""
    statistics = {"auc": roc_auc, "tpr": lambda s, y: tpr_at_fpr(s, y, LOW_FPR)}
    ci = user_bootstrap(statistics, scores, labels, users, n_boot, seed)
    return {"auc": roc_auc(scores, labels), "auc_lo": ci["auc"][0], "auc_hi": ci["auc"][1],
            "tpr_at_1fpr": tpr_at_fpr(scores, labels, LOW_FPR), "tpr_lo": ci["tpr"][0], "tpr_hi": ci["tpr"][1]}
