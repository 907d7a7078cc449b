"""R-matrix figures on a hand-made 3x3 matrix."""

import math

import numpy as np
import pytest

from recsim.eval.continual import (
    average_accuracy,
    backward_transfer,
    continual_summary,
    forgetting,
    forgetting_per_stage,
    forward_transfer,
)

# rows: model after stage i; columns: stage j's split
R = np.array(
    [
        [0.50, 0.20, 0.10],
        [0.55, 0.60, 0.30],
        [0.30, 0.50, 0.70],
    ]
)


def test_figures_by_hand():
    # ACC = (0.30 + 0.50 + 0.70) / 3 = 0.5
    assert average_accuracy(R) == pytest.approx(0.5)
    # BWT = ((R20 - R00) + (R21 - R11)) / 2 = ((0.30 - 0.50) + (0.50 - 0.60)) / 2 = -0.15
    assert backward_transfer(R) == pytest.approx(-0.15)
    # forgetting, j=0: max(R00, R10) - R20 = 0.55 - 0.30 = 0.25   (peak after stage 1, not 0)
    #             j=1: max(R11)      - R21 = 0.60 - 0.50 = 0.10
    # mean = 0.175 (differs from -BWT = 0.15 because split 0 peaked after its own stage)
    np.testing.assert_allclose(forgetting_per_stage(R), [0.25, 0.10])
    assert forgetting(R) == pytest.approx(0.175)
    # FWT, j=1: R01 - R01 = 0; j=2: R12 - R02 = 0.30 - 0.10 = 0.20; mean = 0.10
    assert forward_transfer(R) == pytest.approx(0.10)


def test_summary_and_single_stage():
    summary = continual_summary(R)
    assert summary["stages"] == 3
    assert summary["backward_transfer"] == pytest.approx(-0.15)
    one = continual_summary([[0.4]])
    assert one["average_accuracy"] == pytest.approx(0.4)
    assert all(math.isnan(one[k]) for k in ("backward_transfer", "forgetting", "forward_transfer"))


def test_missing_cells_propagate_nan():
    lower = R.copy()
    lower[np.triu_indices(3, k=1)] = np.nan  # only past and present evaluated
    assert math.isnan(forward_transfer(lower))
    assert backward_transfer(lower) == pytest.approx(-0.15)
    assert forgetting(lower) == pytest.approx(0.175)


def test_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        continual_summary(np.zeros((2, 3)))
