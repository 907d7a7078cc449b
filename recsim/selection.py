"""Checkpoint selection on the validation split (never on the test targets).

The EvoRec authors' update saves a checkpoint every 10 steps and keeps the one that scores best on
active users' validation data. `trainer.checkpoint_selection.mode=best_val` does the same inside one
fit: every `every_n_steps` optimiser steps (null: at the end of every epoch) the validation split of the
stage is scored *through the method* (so LSAT scores its ensemble), the chosen metric is averaged over
its users, and the trainable parameters of the best evaluation are restored when the fit ends. Ties keep
the earlier checkpoint (fewer steps away from the previous model). `mode=last` (default) keeps the last
step, as the paper's text does not mention a selection.

Checkpoints are held in memory (only the trainable tensors: a LoRA's worth), never written to disk.
"""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch

from recsim.eval.metrics import metric_values

log = logging.getLogger(__name__)
MODES = ("last", "best_val")


def validation_score(method, rec, split, metric: str, batch_size: int) -> tuple[float, int]:
    """Mean `metric` over every validation user of `split` (all groups pooled) and the user count."""
    values = []
    for group, samples in split.samples.items():
        if not samples:
            continue
        values.append(metric_values(method.score_candidates(rec, samples, split.candidates[group], batch_size), metric))
    if not values:
        return float("nan"), 0
    pooled = np.concatenate(values)
    return float(pooled.mean()), len(pooled)


class BestOnValidation(L.Callback):
    """Scores the validation split during a fit and restores the best trainable parameters at its end."""

    def __init__(self, method, rec, split, metric: str = "NDCG@10", every_n_steps: int | None = None,
                 batch_size: int = 8):
        self.method, self.rec, self.split, self.metric = method, rec, split, metric
        self.every_n_steps, self.batch_size = every_n_steps, batch_size
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # (value, step, params)
        self.history: list[dict] = []  # every evaluation: step, value

    def _evaluate(self, trainer, module, log_it: bool = True) -> None:
        step = int(trainer.global_step)
        if self.history and self.history[-1]["step"] == step:
            return  # the epoch ended right on an every_n_steps evaluation
        value, n = validation_score(self.method, self.rec, self.split, self.metric, self.batch_size)
        self.history.append({"step": step, "value": value, "users": n})
        if log_it:  # Lightning refuses self.log() in on_train_end
            module.log(f"val/{self.metric}", value, batch_size=max(n, 1))
        if self.best is None or value > self.best[0]:
            params = {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}
            self.best = (value, step, params)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._evaluate(trainer, module)

    def on_train_epoch_end(self, trainer, module) -> None:
        if not self.every_n_steps:
            self._evaluate(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self._evaluate(trainer, module, log_it=False)  # the last step is always a candidate
        value, step, params = self.best
        named = dict(module.named_parameters())
        with torch.no_grad():
            for k, v in params.items():
                named[k].copy_(v)
        log.info("checkpoint selection: step %d of %d has the best validation %s = %.4f", step,
                 trainer.global_step, self.metric, value)

    def summary(self) -> dict:
        if self.best is None:
            return {}
        return {"selected_step": self.best[1], f"selected_val_{self.metric}": self.best[0],
                "selection_history": self.history}
