"""Lightning wrapper that trains any model of :mod:`recsim.models.sequential` on next-item samples.

Each batch is what :func:`recsim.models.sequential.collate_samples` returns; the loss is read at the
last position only, because the protocol already turns every trainable position into its own sample.

Early stopping (RecBole's ``valid_metric`` / ``stopping_step``): given a validation DataLoader, the module
ranks the whole catalogue for every validation row with the user's history masked (exactly as the
runner's test evaluation, :func:`recsim.eval.metrics.ranks_full`) after each epoch and logs
``val/<metric>``; :func:`early_stopping_callbacks` stops after ``patience`` epochs without a strict
improvement and loads the best epoch's weights back when the fit ends.
"""

from __future__ import annotations

import re
from typing import Mapping

import lightning
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn

from recsim.eval.metrics import per_user_metrics, ranks_full
from recsim.models.sequential import BPRMF, GRU4Rec, SASRec

MODELS = {"sasrec": SASRec, "gru4rec": GRU4Rec, "bpr_mf": BPRMF}
LOSSES = ("ce", "bpr")
VALID_METRICS = ("MRR", "NDCG", "HR", "Recall")  # each as NAME@K, e.g. MRR@10 (RecBole's default)
_METRIC = re.compile(r"^(MRR|NDCG|HR|Recall)@([1-9][0-9]*)$")


def parse_valid_metric(metric: str) -> tuple[str, int]:
    """``"MRR@10"`` -> ("MRR", 10); anything else is a ValueError naming what is allowed."""
    match = _METRIC.match(str(metric))
    if not match:
        raise ValueError(f"early_stopping.metric={metric!r}: expected NAME@K with NAME one of {list(VALID_METRICS)}"
                         " and K a positive integer (e.g. MRR@10, NDCG@10)")
    return match.group(1), int(match.group(2))


def valid_score(ranks: np.ndarray, metric: str) -> float:
    """Mean of ``metric`` over rows of 0-based full-ranking ranks.

    MRR@K is truncated as RecBole's is: 1 / (rank + 1) if rank < K else 0 (recsim's test table reports the
    untruncated MRR; early stopping follows the reference).
    """
    name, k = parse_valid_metric(metric)
    if name == "MRR":
        return float(np.where(ranks < k, 1.0 / (ranks + 1.0), 0.0).mean())
    return float(per_user_metrics(ranks, [k])[f"{name}@{k}"].mean())


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

    Gradient clipping is the module's own (``grad_clip``, None = none, as RecBole's ``clip_grad_norm: ~``):
    the Trainer's ``gradient_clip_val`` belongs to the LLM schedule and is ignored here.
    Validation (see the module docstring) needs ``seen_sequences``: user -> full item sequence, so that a
    row's mask is ``seen_sequences[user][:position]``; without it (or for position -1) the batch's
    window is masked.
    """

    def __init__(
        self, model: nn.Module, loss: str = "ce", lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
        valid_metric: str = "MRR@10", grad_clip: float | None = None,
        seen_sequences: Mapping[int, np.ndarray] | None = None, length_buckets: bool = True,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid losses: {list(LOSSES)}")
        parse_valid_metric(valid_metric)
        self.save_hyperparameters(ignore=["model", "seen_sequences"])
        self.model = model
        self.loss_name, self.lr, self.weight_decay = loss, lr, weight_decay
        self.valid_metric, self.grad_clip = valid_metric, grad_clip
        self.seen_sequences = seen_sequences
        self.length_buckets = length_buckets  # see by_length: same loss, less work on padding
        self.generator = torch.Generator().manual_seed(seed)
        self._val_ranks: list[np.ndarray] = []

    def sample_negatives(self, target: torch.Tensor) -> torch.Tensor:
        """One negative per target, uniform over the items 1..N other than the target."""
        n = self.model.num_items
        draw = torch.randint(1, n, target.shape, generator=self.generator).to(target.device)  # 1..N-1
        return draw + (draw >= target).long()  # skip the target: uniform over 1..N \ {target}

    def by_length(self, fn, history: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        """``fn(history, *rest)`` computed on length buckets, rows back in the batch's order.

        Histories are left-padded to ``max_len`` (50) while most Beauty histories hold < 8 items, so a batch
        spends most of its attention and feed-forward work on padding. Rows are grouped by real length into
        buckets of width 1, 2, 4, ... and each bucket keeps only its last (longest real length) columns.
        Padding never changes a real row's output (keys are masked and position ids count real items), so
        the result equals one pass over the whole batch, and the optimiser step still averages over the
        same batch: only the cost changes. Dropout draws differ in shape, not in distribution.
        """
        if not self.length_buckets:
            return fn(history, *rest)
        lengths = (history != 0).sum(1)  # [B]
        outs, rows_all, low = [], [], -1
        width = history.shape[1]
        edge = 1
        while low < width:
            high = min(edge, width)
            rows = torch.nonzero((lengths > low) & (lengths <= high)).squeeze(1)
            if len(rows):
                outs.append(fn(history[rows][:, width - high :], *(r[rows] for r in rest)))
                rows_all.append(rows)
            low, edge = high, edge * 2
        order = torch.cat(rows_all)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return torch.cat(outs)[inverse]

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        history, target = batch["history"], batch["target"]  # [B, L], [B]
        if self.loss_name == "ce":
            return F.cross_entropy(self.by_length(self.model.score_all, history), target)  # column 0 is -inf
        items = torch.stack([target, self.sample_negatives(target)], dim=1)  # [B, 2]
        scores = self.by_length(self.model.score, history, items)  # [B, 2]
        return -F.logsigmoid(scores[:, 0] - scores[:, 1]).mean()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(batch["target"]))
        return loss

    def configure_optimizers(self):
        # AdamW with weight_decay 0 is Adam exactly (RecBole: learner adam, weight_decay 0.0)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=float(self.grad_clip), gradient_clip_algorithm="norm")

    def _masks(self, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        """Items masked in each validation row: all the user did before the target (else the window)."""
        out = []
        for row, (user, position) in enumerate(zip(batch["user"].tolist(), batch["position"].tolist())):
            if self.seen_sequences is not None and position >= 0:
                out.append(np.asarray(self.seen_sequences[user][:position]))
            else:
                out.append(batch["history"][row].cpu().numpy())
        return out

    def on_validation_epoch_start(self) -> None:
        self._val_ranks = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        scores = self.model.score_all(batch["history"])  # [B, N + 1], column 0 -inf
        self._val_ranks.append(ranks_full(scores, batch["target"].cpu().numpy(), self._masks(batch)))

    def on_validation_epoch_end(self) -> None:
        if not self._val_ranks:
            return
        ranks = np.concatenate(self._val_ranks)
        self.log(f"val/{self.valid_metric}", valid_score(ranks, self.valid_metric), batch_size=len(ranks))

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


class RestoreBest(lightning.Callback):
    """Keeps a copy of the weights at the best ``monitor`` value (strictly greater counts, as in
    EarlyStopping and RecBole) and loads it back when the fit ends, so the model is the best epoch's.

    Raises at the end of the first epoch when no validation ran: early stopping without validation
    samples would otherwise train silently for ``max_epochs``.
    """

    def __init__(self, monitor: str):
        self.monitor = monitor
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if self.best is None or value > self.best:
            self.best, self.best_epoch = value, trainer.current_epoch
            self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_train_epoch_end(self, trainer, module) -> None:
        if self.best is None:
            raise RuntimeError(
                f"early stopping on {self.monitor} is configured but epoch {trainer.current_epoch} ran no "
                "validation: pass validation samples (a protocol with validation splits, e.g. "
                "stage=leave_one_out) or set backbone.early_stopping=null"
            )

    def on_fit_end(self, trainer, module) -> None:
        if self.state is not None:
            module.load_state_dict(self.state)


def early_stopping_callbacks(metric: str, patience: int) -> list[lightning.Callback]:
    """Stop after ``patience`` validation epochs without a strict improvement of ``val/<metric>``, then
    restore the best epoch. RecBole's ``stopping_step: s`` stops when the count of non-improving epochs
    exceeds s, i.e. it equals ``patience = s + 1``."""
    parse_valid_metric(metric)
    if int(patience) < 1:
        raise ValueError(f"early_stopping.patience={patience!r}: must be a positive integer")
    monitor = f"val/{metric}"
    return [EarlyStopping(monitor=monitor, mode="max", patience=int(patience), check_finite=True),
            RestoreBest(monitor)]
