"""Checkpoint selection on validation: the best evaluated step's trainable parameters are restored."""

import lightning as L
import numpy as np
import torch

from recsim.protocols.base import EvalSplit, Sample
from recsim.selection import BestOnValidation, validation_score


class Walker(L.LightningModule):
    """w grows by exactly 1 per optimiser step (SGD, lr 1, loss = -w); `frozen` never trains."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.frozen = torch.nn.Parameter(torch.ones(()), requires_grad=False)

    def training_step(self, batch, batch_idx):
        return -self.w

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=1.0)


class DistanceToTwo:
    """A method whose positive candidate ranks first only while w is within 0.5 of 2 (so step 2 is best)."""

    def __init__(self, module):
        self.module = module

    def score_candidates(self, rec, samples, candidates, batch_size):
        w = float(self.module.w.detach())
        positive = 1.0 if abs(w - 2.0) < 0.5 else -1.0
        scores = np.zeros(candidates.shape)
        scores[:, 0] = positive  # the other candidates score 0: rank 0 if positive > 0, else last
        return scores


def split_with(n_users: int) -> EvalSplit:
    samples = [Sample(u, (1,), 2, 1) for u in range(n_users)]
    return EvalSplit("round1_valid", {"U_A": samples}, {"U_A": np.tile(np.array([2, 3, 4]), (n_users, 1))}, )


def fit(callback, module, steps: int):
    loader = torch.utils.data.DataLoader(list(range(steps)), batch_size=1)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[callback])
    trainer.fit(module, loader)


def test_validation_score_pools_users_and_uses_the_metric():
    module = Walker()
    with torch.no_grad():
        module.w.fill_(2.0)
    value, n = validation_score(DistanceToTwo(module), None, split_with(4), "NDCG@10", 8)
    assert (value, n) == (1.0, 4)
    with torch.no_grad():
        module.w.fill_(5.0)
    # positive ranked last of 3: NDCG@10 = 1 / log2(2 + 2) = 0.5
    assert validation_score(DistanceToTwo(module), None, split_with(4), "NDCG@10", 8) == (0.5, 4)


def test_best_step_is_restored_every_n_steps():
    module = Walker()
    cb = BestOnValidation(DistanceToTwo(module), None, split_with(3), "NDCG@10", every_n_steps=1)
    fit(cb, module, steps=5)
    assert float(module.w) == 2.0  # trained to 5, restored to the step-2 checkpoint
    assert cb.summary()["selected_step"] == 2
    assert [h["step"] for h in cb.history] == [1, 2, 3, 4, 5]
    assert float(module.frozen) == 1.0


class Constant:
    def score_candidates(self, rec, samples, candidates, batch_size):
        return np.zeros(candidates.shape)  # every step ties


def test_ties_keep_the_earlier_checkpoint():
    module = Walker()
    cb = BestOnValidation(Constant(), None, split_with(2), "NDCG@10", every_n_steps=1)
    fit(cb, module, steps=3)
    assert float(module.w) == 1.0 and cb.summary()["selected_step"] == 1


def test_once_per_epoch_the_last_step_is_a_candidate():
    module = Walker()
    # evaluated only at the end (one epoch): the last step is the only candidate, nothing moves back
    cb = BestOnValidation(DistanceToTwo(module), None, split_with(2), "NDCG@10", every_n_steps=None)
    fit(cb, module, steps=4)
    assert float(module.w) == 4.0 and cb.summary()["selected_step"] == 4
