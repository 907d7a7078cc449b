"""Lightning wrapper that trains any model of :mod:`recsim.models.sequential` on next-item samples.

Each batch is what :func:`recsim.models.sequential.collate_samples` returns; the loss is read at the
last position only, because the protocol already turns every trainable position into its own sample.
"""

from __future__ import annotations

import lightning
import torch
import torch.nn.functional as F
from torch import nn

from recsim.models.sequential import BPRMF, GRU4Rec, SASRec

MODELS = {"sasrec": SASRec, "gru4rec": GRU4Rec, "bpr_mf": BPRMF}
LOSSES = ("ce", "bpr")


def build_sequential(kind: str, num_items: int, **kwargs) -> nn.Module:
    """The model for ``kind`` (a config's ``model:`` key); kwargs go to its constructor."""
    if kind not in MODELS:
        raise ValueError(f"unknown sequential model {kind!r}; valid kinds: {sorted(MODELS)}")
    return MODELS[kind](num_items, **kwargs)


class SequentialRecModule(lightning.LightningModule):
    """Trains ``model`` with one of two losses.

    - ``ce``: softmax cross-entropy over the whole catalogue. With at most a few tens of thousands of
      items this is affordable, and it trains SASRec/GRU4Rec better than sampled losses
      (Klenitskiy & Vasilev, RecSys 2023).
    - ``bpr``: Bayesian personalised ranking (Rendle et al. 2009), one uniformly drawn negative per
      positive, never the positive itself; drawn from a generator seeded with ``seed`` so a run can
      be repeated exactly.
    """

    def __init__(
        self, model: nn.Module, loss: str = "ce", lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid losses: {list(LOSSES)}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.loss_name, self.lr, self.weight_decay = loss, lr, weight_decay
        self.generator = torch.Generator().manual_seed(seed)

    def sample_negatives(self, target: torch.Tensor) -> torch.Tensor:
        """One negative per target, uniform over the items 1..N other than the target."""
        n = self.model.num_items
        draw = torch.randint(1, n, target.shape, generator=self.generator).to(target.device)  # 1..N-1
        return draw + (draw >= target).long()  # skip the target: uniform over 1..N \ {target}

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        history, target = batch["history"], batch["target"]  # [B, L], [B]
        if self.loss_name == "ce":
            return F.cross_entropy(self.model.score_all(history), target)  # column 0 is -inf
        items = torch.stack([target, self.sample_negatives(target)], dim=1)  # [B, 2]
        scores = self.model.score(history, items)  # [B, 2]
        return -F.logsigmoid(scores[:, 0] - scores[:, 1]).mean()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(batch["target"]))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def _eval_call(self, fn, *tensors: torch.Tensor) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return fn(*(t.to(self.device) for t in tensors))
        finally:
            self.train(was_training)

    def score_candidates(self, histories: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, C]`` of ``candidates [B, C]`` given left-padded ``histories [B, L]``."""
        return self._eval_call(self.model.score, histories, candidates)

    def score_all(self, histories: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, N + 1]`` of every item (column 0, padding, is -inf)."""
        return self._eval_call(self.model.score_all, histories)
