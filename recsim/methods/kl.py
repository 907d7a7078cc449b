"""KL to a frozen copy of the model, the consistency term of EvoRec (L_c) and of FT-KL.

Which distribution: the next-token distributions over the whole vocabulary at the chosen positions
of a teacher-forced sample (prompt + the title its target would be written as). The frozen copy is
the LoRA state right before the update, run through `LLMRanker.with_params`, so no second model is
held in memory. Both passes run with dropout off, so the term is exactly 0 until the first optimiser
step changes the weights.

Two choices the paper leaves open ("L_c = KL between the updated and the original model's outputs on
inactive-user data"), both in config (EvoRec: `method.kl.*`):
- `positions`: `answer` (default): the positions that predict the answer tokens of each sample, the
  model's distribution for the item text; `all`: every position that predicts a token of prompt +
  answer, as in the authors' released code, whose (disabled) term averages over all positions.
- `reduction`: `token_mean` (default): the mean over those positions of the batch; `sum`: summed over
  the positions and the samples of the KL batch, so the term scales with the tokens it constrains,
  as L_e's gradient does with the number of samples it fits.
FT-KL uses the defaults (answer, token_mean), unchanged since the term was introduced.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from recsim.protocols.base import Sample

POSITIONS = ("answer", "all")
REDUCTIONS = ("token_mean", "sum")


def _position_logits(module, batch: dict, positions: str) -> torch.Tensor:
    """Next-token logits [M, V] at the chosen positions of a collated batch."""
    if positions == "answer":
        return module.answer_logits(batch)["logits"]
    hidden = module._decode(batch["input_ids"], batch["attention_mask"]).last_hidden_state  # [B, L, H]
    mask = batch["attention_mask"].bool()
    where = mask[:, :-1] & mask[:, 1:]  # t real and predicting a real token t+1: not a left pad, not the last
    return module.base.get_output_embeddings()(hidden[:, :-1][where]).float()


def kl_rows(module, batch: dict, anchor: dict[str, torch.Tensor], positions: str = "answer") -> torch.Tensor:
    """KL(p_anchor ‖ p_current) at each chosen position [M], with grad through the current model."""
    if positions not in POSITIONS:
        raise ValueError(f"method.kl.positions={positions!r}: expected one of {list(POSITIONS)}")
    was_training = module.training
    module.eval()  # dropout off: the term compares the two models, not two dropout masks
    try:
        current = _position_logits(module, batch, positions)
        with torch.no_grad():
            frozen = module.with_params(anchor, _position_logits, module, batch, positions)
    finally:
        module.train(was_training)
    # KL(p ‖ q) = Σ_v p_v (log p_v − log q_v), p = frozen, q = current
    return F.kl_div(F.log_softmax(current, -1), F.log_softmax(frozen, -1), log_target=True, reduction="none").sum(-1)


def kl_to_anchor(module, batch: dict, anchor: dict[str, torch.Tensor], positions: str = "answer",
                 reduction: str = "token_mean") -> torch.Tensor:
    """The raw L_c of one batch (see the module doc for `positions` and `reduction`)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"method.kl.reduction={reduction!r}: expected one of {list(REDUCTIONS)}")
    rows = kl_rows(module, batch, anchor, positions)
    return rows.mean() if reduction == "token_mean" else rows.sum()


@torch.no_grad()
def kl_after_update(module, anchor: dict[str, torch.Tensor], samples: list[Sample], batch_size: int) -> float:
    """Mean over all answer tokens of `samples` of KL(p_anchor ‖ p_current), dropout off, no grad.

    Every answer token weighs the same (Σ KL / #tokens over all samples, not a mean of batch means),
    so the figure does not depend on `batch_size`. 0.0 for no samples.
    """
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        batch = {k: v.to(module.device) for k, v in module.collate(samples[start : start + batch_size]).items()}
        rows = kl_rows(module, batch, anchor, "answer")
        total, count = total + float(rows.double().sum()), count + rows.numel()
    return total / count if count else 0.0


class AnchorKL:
    """Loss term λ·KL(p_frozen ‖ p_current) on its own sample stream (EvoRec: inactive users) or on the
    training batch itself (FT-KL: `samples=None`).

    Logged per step: `train/<name>` = λ·L_c (the term added to the loss, by the ranker's training_step)
    and `train/<name>_raw` = L_c.
    """

    def __init__(self, anchor: dict[str, torch.Tensor], lam: float, samples: list[Sample] | None = None,
                 batch_size: int = 8, seed: int = 0, name: str = "kl", positions: str = "answer",
                 reduction: str = "token_mean"):
        if positions not in POSITIONS:
            raise ValueError(f"method.kl.positions={positions!r}: expected one of {list(POSITIONS)}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"method.kl.reduction={reduction!r}: expected one of {list(REDUCTIONS)}")
        self.anchor, self.lam, self.samples, self.batch_size, self.name = anchor, lam, samples, batch_size, name
        self.positions, self.reduction = positions, reduction
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
        raw = kl_to_anchor(module, batch, self.anchor, self.positions, self.reduction)
        if getattr(module, "_current_fx_name", None) == "training_step":  # a direct call has nowhere to log
            module.log(f"train/{self.name}_raw", raw.detach(), batch_size=batch["input_ids"].shape[0])
        return {self.name: self.lam * raw}
