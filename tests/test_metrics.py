"""Ranking metrics against hand-computed values (RecBole style: closed forms on a tiny case)."""

import math

import numpy as np
import pytest

from recsim.eval.metrics import (
    bootstrap_ci,
    per_user_metrics,
    ranks_from_scores,
    ranks_full,
    summarise,
)


def test_ranks_from_scores_hand_example():
    # row 0: positive 0.9 beats 0.1, 0.5        -> rank 0
    # row 1: 0.8 and 0.7 above the positive 0.3  -> rank 2
    # row 2: positive in column 2, beaten by 0.9 -> rank 1
    scores = np.array([[0.9, 0.1, 0.5], [0.3, 0.8, 0.7], [0.2, 0.9, 0.4]])
    np.testing.assert_array_equal(ranks_from_scores(scores[:2]), [0, 2])
    np.testing.assert_array_equal(ranks_from_scores(scores[2:], positive_col=2), [1])


def test_ties_count_against_the_positive():
    # a constant scorer gets the worst rank (C - 1), never rank 0
    assert ranks_from_scores(np.ones((4, 101))).tolist() == [100] * 4
    # one tied negative and one strictly lower: rank 1
    assert ranks_from_scores(np.array([[0.5, 0.5, 0.1]])).tolist() == [1]


def test_ranks_from_scores_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        ranks_from_scores(np.array([[0.5, np.nan, 0.1]]))


def test_metrics_hand_computed():
    # ranks [0, 2, 5], K = 3: hits at ranks 0 and 2 -> HR@3 = 2/3
    # NDCG@3 = (1/log2(2) + 1/log2(4) + 0) / 3 = (1 + 0.5 + 0) / 3 = 0.5
    # MRR = (1/1 + 1/3 + 1/6) / 3 = 1.5 / 3 = 0.5
    # HR@1 = 1/3 (only rank 0); NDCG@10 = (1 + 0.5 + 1/log2(7)) / 3
    m = per_user_metrics(np.array([0, 2, 5]), ks=(1, 3, 10))
    assert m["HR@3"].mean() == pytest.approx(2 / 3)
    assert m["NDCG@3"].mean() == pytest.approx(0.5)
    assert m["MRR"].mean() == pytest.approx(0.5)
    assert m["HR@1"].mean() == pytest.approx(1 / 3)
    assert m["NDCG@10"].mean() == pytest.approx((1 + 0.5 + 1 / math.log2(7)) / 3)
    np.testing.assert_array_equal(m["Recall@3"], m["HR@3"])  # single target: Recall@K == HR@K
    assert list(m) == ["HR@1", "HR@3", "HR@10", "NDCG@1", "NDCG@3", "NDCG@10",
                       "Recall@1", "Recall@3", "Recall@10", "MRR"]  # fmt: skip


def test_perfect_and_worst_rankings():
    perfect = per_user_metrics(np.zeros(5, dtype=int))
    assert all(v.mean() == 1.0 for v in perfect.values())
    # 100 candidates, constant scores -> rank 99 for everyone: every @K metric is 0, MRR = 1/100
    worst = per_user_metrics(ranks_from_scores(np.zeros((5, 100))))
    assert all(worst[name].mean() == 0.0 for name in worst if "@" in name)
    assert worst["MRR"].mean() == pytest.approx(0.01)


def test_per_user_metrics_rejects_bad_ranks():
    with pytest.raises(ValueError):
        per_user_metrics(np.array([0, -2]))  # -1 means "not in a generated list"; below it is an error
    with pytest.raises(ValueError):
        per_user_metrics(np.array([0.5]))
    assert per_user_metrics(np.array([], dtype=int))["MRR"].shape == (0,)


def test_ranks_full_masks_history_but_not_target():
    # 5 items (column 0 = padding, scored highest but never ranked)
    #          pad   1    2    3    4    5
    scores = np.array(
        [
            [9.0, 0.9, 0.1, 0.5, 0.7, 0.2],  # target 3 (0.5): items 1, 4 above -> rank 2
            [9.0, 0.9, 0.1, 0.5, 0.7, 0.2],  # same, history {1, 4} masked      -> rank 0
            [9.0, 0.9, 0.1, 0.5, 0.5, 0.2],  # target 3, item 4 ties, 1 masked -> rank 1 (tie counts)
            [9.0, 0.9, 0.1, 0.5, 0.7, 0.2],  # target 1 also in its history     -> rank 0, not masked
        ]
    )
    targets = [3, 3, 3, 1]
    exclude = [[], [1, 4, 4, 0], [1], [1, 2]]
    assert ranks_full(scores, targets, exclude).tolist() == [2, 0, 1, 0]
    assert ranks_full(scores, targets).tolist() == [2, 2, 2, 0]


def test_ranks_full_brute_force_and_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(30, 21)).astype(np.float32)  # many ties on purpose
    targets = rng.integers(1, 21, size=30)
    exclude = [rng.integers(0, 21, size=4).tolist() for _ in range(30)]
    expected = []
    for row, target, hist in zip(scores, targets, exclude):
        competitors = [i for i in range(1, 21) if i != target and i not in hist]
        expected.append(sum(row[i] >= row[target] for i in competitors))
    np.testing.assert_array_equal(ranks_full(scores, targets, exclude), expected)
    tensor = torch.from_numpy(scores).to(torch.bfloat16)  # exact for small integers
    np.testing.assert_array_equal(ranks_full(tensor, torch.from_numpy(targets), exclude), expected)


def test_ranks_full_errors():
    scores = np.zeros((2, 4))
    with pytest.raises(ValueError, match="padding"):
        ranks_full(scores, [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        ranks_full(np.array([[0.0, 1.0, np.nan]]), [1])
    # NaN in the padding column is fine
    assert ranks_full(np.array([[np.nan, 1.0, 0.0]]), [1]).tolist() == [0]


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = np.random.default_rng(1).binomial(1, 0.3, size=200).astype(float)
    mean, low, high = bootstrap_ci(values, n_boot=500, seed=7)
    assert mean == pytest.approx(values.mean())
    assert low < mean < high
    assert bootstrap_ci(values, n_boot=500, seed=7) == (mean, low, high)
    assert bootstrap_ci(values, n_boot=500, seed=8) != (mean, low, high)


def test_bootstrap_ci_narrows_with_more_users():
    rng = np.random.default_rng(2)
    widths = []
    for n in (50, 5000):
        _, low, high = bootstrap_ci(rng.binomial(1, 0.3, size=n).astype(float), n_boot=300)
        widths.append(high - low)
    # the width scales like 1/sqrt(n): 100x the users -> about 10x narrower
    assert widths[1] < widths[0] / 5


def test_bootstrap_ci_edge_cases():
    assert all(math.isnan(x) for x in bootstrap_ci(np.array([])))
    assert bootstrap_ci(np.array([0.25])) == (0.25, 0.25, 0.25)
    assert bootstrap_ci(np.full(10, 0.5)) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci(np.array([0.1, np.nan]))


def test_summarise_rows():
    rows = summarise(np.array([0, 2, 5]), ks=(3,), n_boot=200, seed=0)
    by_metric = {r["metric"]: r for r in rows}
    assert set(by_metric) == {"HR@3", "NDCG@3", "Recall@3", "MRR"}
    assert by_metric["NDCG@3"]["value"] == pytest.approx(0.5)
    assert all(r["n_users"] == 3 and r["ci_low"] <= r["value"] <= r["ci_high"] for r in rows)
