"""The attacks: each turns per-sample features into a membership score (higher = more likely a member).

    loss_threshold   s = −loss_target                                       no training (Yeom et al.'s attack)
    target_features  LR on [target scalars, reduced target hidden]          the fused features, no reference
    reference        LR on [target scalars, target − reference scalars,     the paper's attack: the reference
                         reference scalars, reduced target hidden]          model calibrates each sample
    shadow           LR trained on a shadow model's features of its own     the classic baseline: the attacker
                         in/out samples, applied to the target's features   never sees a target label

LR = L2-regularised logistic regression (`LogisticRegression`, torch L-BFGS; scikit-learn is not a recsim
dependency): min_w (1/Σc_i) Σ_i c_i · BCE(σ(x_i·w + b), y_i) + (λ/2)‖w‖² with the columns standardised on the
training rows, class weights c balancing members and non-members, the bias not penalised.
Training rows: the attacker's known members and known non-members only; scores are read on the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from recsim.audit.features import HiddenProjection, ModelFeatures


@dataclass
class LogisticRegression:
    l2: float = 1e-2  # λ
    max_iter: int = 200
    mean: np.ndarray = field(default=None, repr=False)
    scale: np.ndarray = field(default=None, repr=False)
    weight: torch.Tensor = field(default=None, repr=False)
    bias: torch.Tensor = field(default=None, repr=False)

    def _standard(self, x) -> torch.Tensor:
        return torch.from_numpy((np.asarray(x, dtype=np.float64) - self.mean) / self.scale)

    def fit(self, x, y) -> "LogisticRegression":
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if len(np.unique(y)) != 2:
            raise ValueError("the attacker needs known members and known non-members to train on")
        self.mean, std = x.mean(0), x.std(0)
        self.scale = np.where(std > 0, std, 1.0)  # a constant column stays 0 after centring
        xs, yt = self._standard(x), torch.from_numpy(y)
        # each class weighs half, whatever its number of rows
        c = torch.where(yt > 0, 0.5 / yt.sum(), 0.5 / (1 - yt).sum())
        self.weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        self.bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([self.weight, self.bias], max_iter=self.max_iter, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-10, tolerance_change=1e-12)

        def closure():
            opt.zero_grad()
            logits = xs @ self.weight + self.bias
            loss = (c * F.binary_cross_entropy_with_logits(logits, yt, reduction="none")).sum()
            loss = loss + 0.5 * self.l2 * (self.weight ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return self

    @torch.no_grad()
    def decision(self, x) -> np.ndarray:
        """The log-odds x·w + b of each row: the attack's score."""
        return (self._standard(x) @ self.weight + self.bias).numpy()


ATTACKS = ("loss_threshold", "target_features", "reference", "shadow")


def design(features: ModelFeatures, projection: HiddenProjection, reference: ModelFeatures | None = None) -> np.ndarray:
    """[n, F] attack inputs: the scalars, with a reference the differences and its own scalars, then the
    projected hidden state of `features`."""
    parts = [features.matrix()]
    if reference is not None:
        names = list(features.scalars)
        parts += [features.matrix(names) - reference.matrix(names), reference.matrix(names)]
    parts.append(projection(features.hidden))
    return np.concatenate(parts, 1)


def feature_names(features: ModelFeatures, hidden_columns: int, reference: bool) -> list[str]:
    names = list(features.scalars)
    out = [f"target.{n}" for n in names]
    if reference:
        out += [f"target-reference.{n}" for n in names] + [f"reference.{n}" for n in names]
    return out + [f"hidden.{i}" for i in range(hidden_columns)]


def logistic_attack(x: np.ndarray, labels: np.ndarray, known: np.ndarray, l2: float, max_iter: int) -> np.ndarray:
    """Scores of every row from an LR trained on the known rows."""
    return LogisticRegression(l2, max_iter).fit(x[known], labels[known]).decision(x)


def loss_threshold(target: ModelFeatures) -> np.ndarray:
    return -target.scalars["loss"]  # a lower loss: more likely trained on
