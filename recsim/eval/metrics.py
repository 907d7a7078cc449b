"""Ranking metrics for next-item recommendation, from the rank of the held-out target.

Every metric here is a function of one integer per evaluated (user, target) row: the 0-based rank of
the target among the items it competes with. Two ways to get that rank:

* :func:`ranks_from_scores` -- *sampled* ranking: the target against a fixed candidate set (the
  target plus negatives drawn once per seed and stored with the split).
* :func:`ranks_full` -- *full* ranking: the target against the whole catalogue, with the user's
  history masked out.

Sampled and full numbers differ by an order of magnitude on the same model (RecBole #1443), so a
result row must always say which one produced it; nothing here mixes the two.

Tie rule (both functions): a competitor whose score *equals* the target's is counted as ranked
above it. This is the pessimistic choice: a model that gives every item the same score gets the worst
possible rank instead of rank 0, and a model cannot gain from emitting coarse or saturated scores
(e.g. many items at probability 1.0 in fp16). The optimistic rule (strictly greater only) rewards
exactly that failure; a random tie-break makes metrics depend on an extra RNG.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

DEFAULT_KS = (1, 3, 5, 10)

# rows scored at once in ranks_full: bounds the [rows, N] boolean temporary to ~rows * N bytes
_FULL_RANK_CHUNK_ROWS = 1024
# bootstrap resamples are drawn in blocks of at most this many indices (8 bytes each: ~80 MB)
_BOOTSTRAP_BLOCK_INDICES = 10_000_000


def _as_numpy(scores) -> np.ndarray:
    """A numpy view of a numpy array or a torch tensor (torch is not imported here)."""
    if hasattr(scores, "detach"):  # torch.Tensor; bf16 has no numpy dtype, so widen it to fp32
        tensor = scores.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(scores)


def ranks_from_scores(scores, positive_col: int = 0) -> np.ndarray:
    """0-based rank of the positive among its candidates, one per row.

    ``scores``: [n, C] -- row r holds the scores of C candidates, the positive in ``positive_col``
    (candidate sets are drawn once and stored, so every method ranks the same candidates).
    rank = number of *other* candidates whose score is >= the positive's: ties count against the
    positive (see the module docstring), so a constant scorer gets rank C - 1 on every row.
    NaN scores raise ValueError: a NaN compares False with everything and would silently give rank 0.
    """
    scores = _as_numpy(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [n, candidates], got shape {scores.shape}")
    n, width = scores.shape
    if not -width <= positive_col < width:
        raise ValueError(f"positive_col {positive_col} out of range for {width} candidates")
    if np.isnan(scores).any():
        bad = np.flatnonzero(np.isnan(scores).any(axis=1))
        raise ValueError(f"NaN scores in {len(bad)} of {n} rows (first rows: {bad[:5].tolist()})")
    positive = scores[:, positive_col]  # [n]
    others = np.delete(scores, positive_col % width, axis=1)  # [n, C-1]
    return (others >= positive[:, None]).sum(axis=1).astype(np.int64)


def ranks_full(scores, targets, exclude: Sequence[Iterable[int]] | None = None) -> np.ndarray:
    """0-based rank of each target among all items 1..N (full ranking), one per row.

    ``scores``: [n, N+1] numpy array or torch tensor; column 0 is padding and is never ranked.
    ``targets``: [n] item ids in 1..N. ``exclude[r]``: item ids masked out of row r -- the user's
    history, as RecBole's full-ranking mode does: items the user already consumed are not
    recommendations, and leaving them in would punish a model for remembering them. The target itself
    is never masked, even when it appears in ``exclude[r]`` (repeat consumption of the target is what
    is being evaluated); id 0 in ``exclude`` is ignored as padding.
    Same tie rule as :func:`ranks_from_scores` (ties count against the target). NaN scores in items
    1..N raise ValueError.
    """
    scores = _as_numpy(scores)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [n, N+1] with N >= 1, got shape {scores.shape}")
    n, width = scores.shape
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)  # [n]
    if len(targets) != n:
        raise ValueError(f"{len(targets)} targets for {n} score rows")
    if n and (targets.min() < 1 or targets.max() >= width):
        raise ValueError(f"targets must be item ids in 1..{width - 1} (0 is padding)")
    if exclude is not None and len(exclude) != n:
        raise ValueError(f"exclude has {len(exclude)} rows, scores have {n}")

    target_scores = scores[np.arange(n), targets]  # [n]
    ranks = np.empty(n, dtype=np.int64)
    for start in range(0, n, _FULL_RANK_CHUNK_ROWS):
        block = scores[start : start + _FULL_RANK_CHUNK_ROWS, 1:]  # [b, N], padding column dropped
        if np.isnan(block).any():
            bad = start + np.flatnonzero(np.isnan(block).any(axis=1))
            raise ValueError(f"NaN scores in rows {bad[:5].tolist()} (items 1..N must all be scored)")
        at_or_above = block >= target_scores[start : start + len(block), None]  # [b, N]
        ranks[start : start + len(block)] = at_or_above.sum(axis=1) - 1  # the target ties itself

    for row, items in enumerate(exclude or ()):
        masked = _masked_items(items, int(targets[row]), width, row)
        ranks[row] -= int((scores[row, masked] >= target_scores[row]).sum())
    return ranks


def _masked_items(items: Iterable[int], target: int, width: int, row: int) -> np.ndarray:
    """Distinct excluded ids of one row, without padding (0) and without the target."""
    ids = np.unique(np.fromiter((int(i) for i in items), dtype=np.int64))
    ids = ids[(ids != 0) & (ids != target)]
    if len(ids) and (ids.min() < 0 or ids.max() >= width):
        raise ValueError(f"exclude[{row}] holds item ids outside 0..{width - 1}")
    return ids


def ranks_from_lists(lists: Sequence[Sequence[int]], positives: Sequence[int]) -> np.ndarray:
    """0-based position of each row's positive in its generated ranked list, -1 where it is not in it.

    ``lists[r]``: the item ids a model listed for row r, best first (generation mode: the valid titles it
    wrote, mapped to items and deduplicated); ``positives[r]``: row r's target. A repeated item counts at
    its first position. -1 rows score 0 in every metric of :func:`per_user_metrics`: a list that misses the
    positive says nothing about where it would rank, so it gets no partial credit (no rank C, no 1/(C+1)).
    """
    if len(lists) != len(positives):
        raise ValueError(f"{len(lists)} lists for {len(positives)} positives")
    ranks = np.full(len(lists), -1, dtype=np.int64)
    for row, (items, positive) in enumerate(zip(lists, positives)):
        items = [int(i) for i in items]
        if int(positive) in items:
            ranks[row] = items.index(int(positive))
    return ranks


def per_user_metrics(ranks, ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """Per-row metric values from 0-based target ranks.

    With one relevant item per row (next-item prediction):
    * ``HR@K`` = 1 if rank < K else 0.
    * ``NDCG@K`` = 1 / log2(rank + 2) if rank < K else 0 (the ideal DCG is 1: the target at rank 0).
    * ``Recall@K`` = HR@K: with a single target, the share of relevant items retrieved is 0 or 1. It is
      reported under its own name only because papers do; it carries no extra information.
    * ``MRR`` = 1 / (rank + 1), not truncated at any K.
    A rank of -1 means "not retrieved" (a generated list without the target, :func:`ranks_from_lists`):
    every metric of that row is 0, MRR included.
    Returns {name: float64 array [n]} in the order HR@K..., NDCG@K..., Recall@K..., MRR.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 1:
        raise ValueError(f"ranks must be 1-D, got shape {ranks.shape}")
    if len(ranks) and (not np.issubdtype(ranks.dtype, np.integer) or ranks.min() < -1):
        raise ValueError("ranks must be integers >= 0 (0 = ranked first), or -1 for a target that was not retrieved")
    if any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"every K must be a positive integer, got {list(ks)}")
    ranks = ranks.astype(np.int64)
    found = ranks >= 0
    hit = {k: (found & (ranks < k)).astype(np.float64) for k in ks}
    gain = np.where(found, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)  # [n]
    out = {f"HR@{k}": hit[k] for k in ks}
    out.update({f"NDCG@{k}": np.where(hit[k] > 0, gain, 0.0) for k in ks})
    out.update({f"Recall@{k}": hit[k].copy() for k in ks})
    out["MRR"] = np.where(found, 1.0 / (np.maximum(ranks, 0) + 1.0), 0.0)
    return out


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05):
    """(mean, low, high): the mean of ``values`` and its percentile-bootstrap (1 - alpha) interval.

    scipy.stats.bootstrap, percentile method: the interval is the alpha/2 and 1 - alpha/2 quantiles of
    the ``n_boot`` resampled means (no normality assumption, fine for the bounded, skewed per-user values
    of HR/NDCG; BCa, scipy's default, adds a jackknife pass of n leave-one-out means per metric and
    changes the numbers recsim has reported so far). Resampling unit = one row (one evaluated
    user/target), drawn with replacement from ``np.random.default_rng(seed)``. scipy draws the indices
    as ``rng.integers(0, n, (batch, n))``, so the same seed, n and batch give the same resamples: every
    metric of one evaluation is bootstrapped on identical user resamples (paired intervals), and so is a
    per-user difference of two runs (the paired bootstrap of recsim.tables). The batch is fixed by n,
    never by the metric, to keep that so.
    It measures uncertainty over *users* for one trained model; the spread over training seeds is
    :mod:`recsim.tables`' job. n = 0 gives (nan, nan, nan); n = 1 gives (v, v, v). NaN values raise.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)  # [n]
    n = len(values)
    if n == 0:
        return (float("nan"),) * 3
    if np.isnan(values).any():
        raise ValueError("bootstrap_ci got NaN values")
    mean = float(values.mean())
    if n == 1:
        return mean, mean, mean
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}")
    if np.all(values == values[0]):  # every resample has this mean: return it exactly, not up to rounding
        return mean, mean, mean
    from scipy import stats

    result = stats.bootstrap(
        (values,), np.mean, n_resamples=n_boot, batch=max(1, _BOOTSTRAP_BLOCK_INDICES // n), vectorized=True,
        confidence_level=1 - alpha, method="percentile", rng=np.random.default_rng(seed),
    )  # fmt: skip
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high)


def summarise(
    ranks, ks: Sequence[int] = DEFAULT_KS, n_boot: int = 1000, seed: int = 0
) -> list[dict]:
    """One dict per metric: {metric, value, ci_low, ci_high, n_users} with a 95% bootstrap CI.

    Every metric uses the same ``seed`` and hence the same user resamples. ``n_users`` is the number
    of evaluated rows (one target per user in leave-one-out splits).
    """
    ranks = np.asarray(ranks)
    rows = []
    for name, per_row in per_user_metrics(ranks, ks).items():
        value, low, high = bootstrap_ci(per_row, n_boot=n_boot, seed=seed)
        rows.append(
            {"metric": name, "value": value, "ci_low": low, "ci_high": high, "n_users": len(ranks)}
        )
    return rows


def metric_values(scores, metric: str) -> np.ndarray:
    """Per-row `metric` (HR@K, NDCG@K, Recall@K or MRR) of candidate scores [n, C], positive in column 0:
    what validation-based choices (LSAT's weight, checkpoint selection) compare."""
    _, _, k = metric.partition("@")
    values = per_user_metrics(ranks_from_scores(scores), [int(k)] if k.isdigit() else [1])
    if metric not in values:
        raise ValueError(f"metric {metric!r}: expected HR@K, NDCG@K, Recall@K or MRR")
    return values[metric]
