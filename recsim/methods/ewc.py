"""EWC (Kirkpatrick et al., PNAS 2017) on the trainable (LoRA) parameters.

L = L_e + (λ/2) Σ_i F_i (θ_i − θ*_i)², θ* the parameters before the update and F the diagonal
empirical Fisher: the mean over `fisher_samples` old samples (everything before the new window, a
seeded sample) of the squared gradient of each sample's answer NLL, computed one sample at a time
with dropout off. The Fisher is recomputed at every update on all data before it (not accumulated).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from recsim.methods.base import ContinualMethod, register
from recsim.protocols.base import make_samples


def diagonal_fisher(module, samples) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = module.training
    module.eval()
    for s in samples:
        batch = {k: v.to(module.device) for k, v in module.collate([s]).items()}
        out = module.answer_logits(batch)
        grads = torch.autograd.grad(F.cross_entropy(out["logits"], out["targets"]), list(params.values()))
        for (n, _), g in zip(params.items(), grads):
            fisher[n] += g.detach() ** 2 / len(samples)
    module.train(was_training)
    return fisher


class EWCPenalty:
    def __init__(self, module, fisher: dict[str, torch.Tensor], lam: float):
        named = dict(module.named_parameters())
        self.terms = [(named[n], f, named[n].detach().clone()) for n, f in fisher.items()]  # (θ, F, θ*)
        self.lam = lam

    def __call__(self, module, batch, out) -> dict:
        penalty = sum((f * (p - star) ** 2).sum() for p, f, star in self.terms)
        return {"ewc": 0.5 * self.lam * penalty}


@register
class EWC(ContinualMethod):
    name = "ewc"

    def before_update(self, stage, rec, samples):
        super().before_update(stage, rec, samples)
        if stage.index == 0:
            return
        old_targets = {u: [p for p in ps if p < stage.boundary[u]] for u, ps in stage.cumulative_targets.items()}
        old = make_samples(stage.sequences, old_targets, self.protocol.window)
        if len(old) > self.cfg.fisher_samples:
            keep = np.random.default_rng([self.cfg.seed, stage.index]).choice(len(old), self.cfg.fisher_samples, replace=False)
            old = [old[i] for i in sorted(keep)]
        fisher = diagonal_fisher(rec.module, old)
        rec.add_loss_term(EWCPenalty(rec.module, fisher, self.cfg.lam))
        self.report.update({"fisher_samples": len(old), "fisher_mean": float(np.mean([f.mean().item() for f in fisher.values()]))})
