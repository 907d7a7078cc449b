"""KL to a frozen copy of the model, the consistency term of EvoRec (L_c) and of FT-KL.

Which distribution: the next-token distributions over the whole vocabulary at every answer-token
position of a teacher-forced sample (the title the sample's target would be written as), i.e. the
model's predictive distribution for the item text. L_c = mean over those positions of
KL(p_frozen ‖ p_current). The frozen copy is the LoRA state right before the update, run through
`LLMRanker.with_params`, so no second model is held in memory. Both passes run with dropout off, so
L_c is exactly 0 until the first optimiser step changes the weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from recsim.protocols.base import Sample


def kl_to_anchor(module, batch: dict, anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    was_training = module.training
    module.eval()  # dropout off: the term compares the two models, not two dropout masks
    try:
        current = module.answer_logits(batch)["logits"]  # [M, V], with grad
        with torch.no_grad():
            frozen = module.with_params(anchor, module.answer_logits, batch)["logits"]
    finally:
        module.train(was_training)
    # KL(p_frozen || p_current), averaged over answer tokens
    return F.kl_div(F.log_softmax(current, -1), F.log_softmax(frozen, -1), log_target=True, reduction="batchmean")


class AnchorKL:
    """Loss term λ·KL(p_frozen ‖ p_current) on its own sample stream (EvoRec: inactive users) or on the
    training batch itself (FT-KL: `samples=None`)."""

    def __init__(self, anchor: dict[str, torch.Tensor], lam: float, samples: list[Sample] | None = None,
                 batch_size: int = 8, seed: int = 0, name: str = "kl"):
        self.anchor, self.lam, self.samples, self.batch_size, self.name = anchor, lam, samples, batch_size, name
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []

    def _next_samples(self) -> list[Sample]:
        if len(self.order) < self.batch_size:  # cycle through the stream in seeded shuffled passes
            self.order += self.rng.permutation(len(self.samples)).tolist()
        take, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return [self.samples[i] for i in take]

    def __call__(self, module, batch: dict, out: dict) -> dict:
        if self.lam == 0:
            return {}
        if self.samples is not None:
            batch = {k: v.to(module.device) for k, v in module.collate(self._next_samples()).items()}
        return {self.name: self.lam * kl_to_anchor(module, batch, self.anchor)}
