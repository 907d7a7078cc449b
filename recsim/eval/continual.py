"""Continual-learning figures from the stage-by-split matrix R.

``R[i, j]`` is one metric (e.g. NDCG@10) of the model *after* stage i's update, evaluated on stage j's
evaluation split; S stages give an [S, S] matrix, NaN where a cell was not computed. The diagonal is
"how good is the model now", below it "does it still serve earlier periods", above it "does it
already serve later periods".

Missing cells are not skipped: a figure whose terms need a NaN cell is NaN. Averaging over whatever
cells happen to exist would silently change what the figure means from run to run.
All figures are in the metric's own units (differences of NDCG, say), not percentages.
"""

from __future__ import annotations


import numpy as np


def _check(R) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"R must be a non-empty square [S, S] matrix, got shape {R.shape}")
    return R


def average_accuracy(R) -> float:
    """ACC = mean_j R[S-1, j]: the final model on every stage's split (Lopez-Paz & Ranzato 2017)."""
    R = _check(R)
    return float(R[-1].mean())


def backward_transfer(R) -> float:
    """BWT = mean_{j < S-1} (R[S-1, j] - R[j, j]) (Lopez-Paz & Ranzato 2017, GEM).

    How the final model does on each earlier split compared with the model just after that split's
    own stage. Negative = later updates hurt earlier periods. For drifting users this is not
    automatically bad: an old split's preferences may be out of date. S = 1 -> NaN.
    """
    R = _check(R)
    S = len(R)
    if S == 1:
        return float("nan")
    j = np.arange(S - 1)
    return float((R[S - 1, j] - R[j, j]).mean())


def forgetting_per_stage(R) -> np.ndarray:
    """f_j = max_{j <= i < S-1} R[i, j] - R[S-1, j] for each split j < S-1 (Chaudhry et al. 2018).

    The drop from the best score split j ever had -- counted only from stage j on, once the model
    has trained on that period -- to the final model's score. Unlike -BWT it is measured from the
    peak, so a split that kept improving after its own stage and then fell back still counts.
    Returns an [S-1] array (empty for S = 1).
    """
    R = _check(R)
    S = len(R)
    out = np.empty(S - 1)
    for j in range(S - 1):
        earlier = R[j : S - 1, j]  # rows j..S-2: models that had seen split j's stage
        out[j] = np.nan if np.isnan(earlier).any() else earlier.max() - R[S - 1, j]
    return out


def forgetting(R) -> float:
    """Mean of :func:`forgetting_per_stage` (Chaudhry et al. 2018); S = 1 -> NaN."""
    per_stage = forgetting_per_stage(R)
    return float(per_stage.mean()) if len(per_stage) else float("nan")


def forward_transfer(R) -> float:
    """FWT = mean_{j > 0} (R[j-1, j] - R[0, j]).

    What the updates made before split j's stage bring to split j (the *future*, as seen from stage
    j-1), compared with the first model, R[0, j]. Lopez-Paz & Ranzato subtract the score of a
    randomly initialised model instead; for a pretrained LLM that baseline does not exist (nobody
    deploys a random LLM, and its score is ~chance), so the first model of the run is the reference.
    The j = 1 term is R[0, 1] - R[0, 1] = 0 by construction (no update precedes split 1 beyond the
    first model); it is kept so the figure averages over every future split, as in the paper.
    S = 1 -> NaN.
    """
    R = _check(R)
    S = len(R)
    if S == 1:
        return float("nan")
    j = np.arange(1, S)
    return float((R[j - 1, j] - R[0, j]).mean())


def continual_summary(R) -> dict[str, float]:
    """All figures of R in one dict: stages, average_accuracy, backward_transfer, forgetting,
    forward_transfer."""
    R = _check(R)
    return {
        "stages": len(R),
        "average_accuracy": average_accuracy(R),
        "backward_transfer": backward_transfer(R),
        "forgetting": forgetting(R),
        "forward_transfer": forward_transfer(R),
    }
