"""EWC (Kirkpatrick et al., PNAS 2017) on the trainable (LoRA) parameters.

L = L_e + (λ/2) Σ_i F_i (θ_i − θ*_i)², θ* the parameters before the update and F the diagonal
empirical Fisher: the mean over old samples (everything before the new window) of the squared
gradient of each sample's answer NLL, with dropout off. The Fisher is recomputed at every update on
all data before it (not accumulated).

Choices EWC's paper leaves open for this setting, and why:
- `fisher_samples` (default 512): a seeded subsample of the old samples, all of them when fewer. The
  diagonal estimate is a mean of squares, so its relative error shrinks like 1/sqrt(n); 512 keeps it
  well below the spread over λ that the sweep explores.
- the per-sample (empirical) Fisher, not the squared gradient of a batch mean: the latter is
  (Σ g)² / n², which cancels gradients of opposite sign and is not EWC's estimate.
- `fisher_batch_size` samples at a time get their own gradients in one vectorised pass
  (torch.func.vmap of grad over functional_call); `fisher_batch_size: 1` is the plain loop, one
  backward pass per sample. Both give the same F (tests: to 1e-6).
- `fisher_cache` (default off): keep F under `<cache_dir>/fisher/`, keyed by the model state and the
  samples, so the runs of a λ sweep (same stage 0, same old samples) compute it once. Off by default so
  an EWC row's update time always includes its Fisher; the report says when F came from the cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from recsim.methods.base import ContinualMethod, register
from recsim.protocols.base import make_samples


def _fisher_loop(module, samples, params: dict[str, torch.nn.Parameter], fisher: dict[str, torch.Tensor]) -> None:
    for s in samples:
        batch = {k: v.to(module.device) for k, v in module.collate([s]).items()}
        out = module.answer_logits(batch)
        grads = torch.autograd.grad(F.cross_entropy(out["logits"], out["targets"]), list(params.values()))
        for n, g in zip(params, grads):
            fisher[n] += g.detach() ** 2


def _right_padded(module, samples):
    """prompt+answer ids right-padded, labels -100 off the answer: with causal attention a real token never
    sees the padding after it, so no attention mask is needed (a mask's padding check breaks vmap)."""
    rows = [(module.prompt_ids(s.history), module.answer_ids(s.target)) for s in samples]
    width = max(len(p) + len(a) for p, a in rows)
    pad = module.tok.pad_token_id
    ids = torch.tensor([p + a + [pad] * (width - len(p) - len(a)) for p, a in rows], device=module.device)
    labels = torch.tensor([[-100] * len(p) + a + [-100] * (width - len(p) - len(a)) for p, a in rows],
                          device=module.device)
    return ids, labels  # [B, L] each


def _fisher_vmap(module, samples, params, fisher, batch_size: int) -> None:
    from torch.func import grad, vmap

    frozen = {n: p.detach() for n, p in params.items()}

    def nll(p, ids, labels):  # one sample: ids, labels [L]
        def forward(ids, labels):
            positions = torch.arange(ids.shape[0], device=ids.device)[None]
            logits = module.base(input_ids=ids[None], position_ids=positions).logits[0, :-1].float()  # [L-1, V]
            return F.cross_entropy(logits, labels[1:], ignore_index=-100)  # mean over the answer tokens

        return module.with_params(p, forward, ids, labels)

    per_sample = vmap(grad(nll), in_dims=(None, 0, 0))
    for start in range(0, len(samples), batch_size):
        ids, labels = _right_padded(module, samples[start : start + batch_size])
        grads = per_sample(frozen, ids, labels)  # {name: [B, *shape]}
        for n, g in grads.items():
            fisher[n] += (g.detach() ** 2).sum(0)


def diagonal_fisher(module, samples, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """F_i = (1/n) Σ_s (∂ NLL_s / ∂θ_i)² over `samples`, for every trainable parameter of `module` (an LLMRanker).

    `batch_size` samples share one vectorised pass; 1 = one backward pass per sample (the reference)."""
    if batch_size < 1:
        raise ValueError(f"method.fisher_batch_size={batch_size}: expected an integer >= 1 (1 = the plain loop)")
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = module.training
    module.eval()  # dropout off: the Fisher of the model, not of a dropout mask
    try:
        if batch_size == 1:
            _fisher_loop(module, samples, params, fisher)
        else:
            _fisher_vmap(module, samples, params, fisher, batch_size)
    finally:
        module.train(was_training)
    return {f"model.{n}": f / max(1, len(samples)) for n, f in fisher.items()}  # names as in module.named_parameters()


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
        n_max = int(self.cfg.fisher_samples)
        if n_max < 1:
            raise ValueError(f"method.fisher_samples={n_max}: expected an integer >= 1")
        old_targets = {u: [p for p in ps if p < stage.boundary[u]] for u, ps in stage.cumulative_targets.items()}
        old = make_samples(stage.sequences, old_targets, self.protocol.window)
        if len(old) > n_max:
            keep = np.random.default_rng([self.cfg.seed, stage.index]).choice(len(old), n_max, replace=False)
            old = [old[i] for i in sorted(keep)]
        batch_size = int(self.cfg.get("fisher_batch_size", 8))
        cache = _fisher_cache_file(rec, old, batch_size) if self.cfg.get("fisher_cache") else None
        hit = cache is not None and cache.is_file()
        if hit:
            fisher = {k: v.to(rec.module.device) for k, v in load_file(str(cache)).items()}
        else:
            fisher = diagonal_fisher(rec.module, old, batch_size)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(cache.name + ".tmp")
                save_file({k: v.detach().cpu().contiguous() for k, v in fisher.items()}, str(tmp))
                tmp.replace(cache)
        rec.add_loss_term(EWCPenalty(rec.module, fisher, self.cfg.lam))
        self.report.update({"fisher_samples": len(old), "fisher_from_cache": hit,
                            "fisher_mean": float(np.mean([f.mean().item() for f in fisher.values()]))})


def _fisher_cache_file(rec, samples, batch_size: int) -> Path | None:
    """Where the Fisher of exactly this model state and these samples is kept (a λ sweep computes it once).

    The key hashes what F depends on: the base weights' hash, every trainable tensor's bytes, the token ids
    and labels of every sample, and the batch size (vmap and the loop agree to 1e-6, not bit for bit)."""
    root = getattr(rec, "cache_dir", None)
    if root is None:
        return None
    h = hashlib.sha256(f"{getattr(rec, 'base_hash', '')}|{batch_size}".encode())
    for name, p in sorted(rec.module.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().float().numpy().tobytes())
    batch = rec.module.collate(samples)
    for key in ("input_ids", "labels"):
        h.update(batch[key].numpy().tobytes())
    return Path(root) / "fisher" / f"{h.hexdigest()[:20]}.safetensors"
