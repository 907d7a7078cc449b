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

# scores ranked at once in ranks_full: bounds its [rows, N+1] boolean temporaries to ~64 MB each
_FULL_RANK_BLOCK_ELEMENTS = 1 << 26
# bootstrap resamples are drawn in blocks of at most this many indices (8 bytes each: ~80 MB)
_BOOTSTRAP_BLOCK_INDICES = 10_000_000


def _as_numpy(scores) -> np.ndarray:
    """A numpy view of a numpy array or a torch tensor (torch is not imported at module level)."""
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


def ranks_full(scores, targets, exclude: Sequence[Iterable[int]] | None = None, *,
               backend: str | None = None) -> np.ndarray:
    """0-based rank of each target among all items 1..N (full ranking), one per row.

    ``scores``: [n, N+1] numpy array or torch tensor; column 0 is padding and is never ranked.
    ``targets``: [n] item ids in 1..N. ``exclude[r]``: item ids masked out of row r -- the user's
    history, as RecBole's full-ranking mode does: items the user already consumed are not
    recommendations, and leaving them in would punish a model for remembering them. The target itself
    is never masked, even when it appears in ``exclude[r]`` (repeat consumption of the target is what
    is being evaluated); id 0 in ``exclude`` is ignored as padding, so ``exclude`` may also be one
    0-padded [n, L] array or tensor.
    Same tie rule as :func:`ranks_from_scores` (ties count against the target). NaN scores in items
    1..N raise ValueError.

    Vectorised, one block of rows at a time: rank = number of items j in 1..N, j != target, j not
    masked, with score_j >= score_target. Masking is a boolean mask, not -inf scores: under the ">=" tie
    rule an item set to -inf would still count against a target scored -inf. ``backend`` None: a tensor
    on a GPU is ranked there, in torch (no copy of the [n, N+1] scores to the host), host data (numpy,
    CPU tensors) in numpy, whose comparisons, NaN checks and boolean row sums measured 2-20x faster than
    torch's CPU kernels on this project's 2-core machine; "torch" or "numpy" forces one (the same ranks).
    """
    if backend not in (None, "torch", "numpy"):
        raise ValueError(f"backend={backend!r}: expected None, 'torch' or 'numpy'")
    is_tensor = hasattr(scores, "detach")
    use_torch = backend == "torch" or (backend is None and is_tensor and scores.device.type != "cpu")
    if use_torch:
        import torch  # here, not at the top: recsim.tables imports this module and needs no torch

        array = scores.detach() if is_tensor else torch.as_tensor(np.ascontiguousarray(scores))
    else:
        array = _as_numpy(scores)
    if array.ndim != 2 or array.shape[1] < 2:
        raise ValueError(f"scores must be [n, N+1] with N >= 1, got shape {tuple(array.shape)}")
    n, width = array.shape
    targets = _as_numpy(targets).astype(np.int64).reshape(-1)  # [n]
    if len(targets) != n:
        raise ValueError(f"{len(targets)} targets for {n} score rows")
    if n and (targets.min() < 1 or targets.max() >= width):
        raise ValueError(f"targets must be item ids in 1..{width - 1} (0 is padding)")
    if exclude is not None and len(exclude) != n:
        raise ValueError(f"exclude has {len(exclude)} rows, scores have {n}")
    mask_rows, mask_cols = _mask_entries(exclude, n, width)  # [E], [E]: (row, item) pairs, rows ascending
    if use_torch:
        isnan, to_backend = torch.isnan, lambda a: torch.as_tensor(a, device=array.device)
    else:
        isnan, to_backend = np.isnan, _as_numpy

    ranks = np.empty(n, dtype=np.int64)
    step = max(1, _FULL_RANK_BLOCK_ELEMENTS // width)
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = array[start:stop]  # [b, N+1]
        nan_rows = _as_numpy(isnan(block[:, 1:]).any(1))  # [b]
        if nan_rows.any():
            bad = start + np.flatnonzero(nan_rows)
            raise ValueError(f"NaN scores in rows {bad[:5].tolist()} (items 1..N must all be scored)")
        rows = to_backend(np.arange(stop - start))
        target = to_backend(targets[start:stop])  # [b]
        counted = block >= block[rows, target][:, None]  # [b, N+1]: at or above the target (ties count)
        lo, hi = np.searchsorted(mask_rows, [start, stop])
        if hi > lo:
            counted[to_backend(mask_rows[lo:hi] - start), to_backend(mask_cols[lo:hi])] = False  # history
        counted[:, 0] = False  # padding is never ranked
        counted[rows, target] = False  # the target does not compete with itself (and is never masked)
        ranks[start:stop] = _as_numpy(counted.sum(1))
    return ranks


def _mask_entries(exclude, n: int, width: int) -> tuple[np.ndarray, object]:
    """Every (row, item id) pair of ``exclude``: rows as an int64 numpy array (ascending), ids as an int64
    numpy array or, for a 2-D tensor, a tensor left on its device. Ids are checked to lie in 0..width-1
    (0, padding, is harmless: column 0 is never ranked).

    ``exclude`` is one iterable of ids per row (what the runner passes: each user's prior items), or a
    0-padded [n, L] array or tensor, read without a Python loop over rows."""
    if exclude is None or len(exclude) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if getattr(exclude, "ndim", None) == 2:
        cols = exclude.reshape(-1).long() if hasattr(exclude, "detach") else np.asarray(exclude, np.int64).reshape(-1)
        rows = np.repeat(np.arange(n, dtype=np.int64), exclude.shape[1])
    else:
        ids = [_ids(items) for items in exclude]
        rows = np.repeat(np.arange(n, dtype=np.int64), np.fromiter(map(len, ids), dtype=np.int64, count=n))
        cols = np.concatenate(ids)
    outside = (cols < 0) | (cols >= width)
    if bool(outside.any()):
        first = int(outside.nonzero()[0][0])  # numpy and torch both: the first offending entry
        raise ValueError(f"exclude[{int(rows[first])}] holds item ids outside 0..{width - 1}")
    return rows, cols


def _ids(items: Iterable[int]) -> np.ndarray:
    """One row of ``exclude`` as int64 ids: arrays, tensors and lists at once, any other iterable item by item."""
    if isinstance(items, (np.ndarray, list, tuple)) or hasattr(items, "detach"):
        return _as_numpy(items).astype(np.int64).reshape(-1)
    return np.fromiter((int(i) for i in items), dtype=np.int64)


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
