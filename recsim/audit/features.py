"""Per-sample features of one model (the target, its reference or a shadow) for membership inference.

A sample (history, target item v) is run teacher-forced, prompt + the answer text of v, as the model trained on
it (`rec.collate`), dropout off, no grad. At the M answer positions (the states that predict v's tokens):

    loss              −(1/M) Σ_t log p(a_t | prompt, a_<t)         the hard-label loss the model was trained on
    token_confidence  (1/M) Σ_t p(a_t | …)                         the paper's confidence, per answer token
    token_entropy     (1/M) Σ_t H(p(· | prompt, a_<t))             entropy of the next-token distribution (whole
                                                                    vocabulary)
    cand_confidence   softmax_c(s_c)[v], s = the method's scores of the 1 + `negatives` candidates, v first
    cand_entropy      −Σ_c softmax(s)_c log softmax(s)_c            (over the same candidates)
    hidden            (1/M) Σ_t h_t, the last layer's states (final norm applied) at the answer positions: the
                      paper's "penultimate" vector, the input of the LM head; reduced later (`HiddenProjection`)

Choices:
- The states and scores come through the method's inference hooks (`method.decode_hidden`,
  `method.score_candidates`): the model as the method infers (LSAT's ensemble, SumLoRA's stack).
- The candidate features need candidates for training samples, which no split has: 1 + `negatives` items
  per sample, the target first, negatives drawn as recsim.protocols.candidates draws a split's (uniform over the
  catalogue minus everything the user ever touched), seeded by (audit seed, user id, target position).
  `audit.candidates=false` leaves them out (scoring 30 candidates costs ~30 token passes).
- Hidden reduction (`audit.hidden_reduce`): `pca` (default) fits on the attacker's training rows only (the
  rows it may know), projecting every row onto the top min(hidden_dim, rows − 1, H) components; `random` is a
  seeded Gaussian projection (H → hidden_dim, scaled 1/√hidden_dim), centred on the same rows.
  `audit.hidden_dim=0` leaves the hidden state out.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from recsim.models.llm_ranker import fp32_logits
from recsim.protocols.base import Sample
from recsim.protocols.candidates import draw_negatives

TOKEN_FEATURES = ("loss", "token_confidence", "token_entropy")
CANDIDATE_FEATURES = ("cand_confidence", "cand_entropy")
HIDDEN_REDUCTIONS = ("pca", "random")


@dataclass
class ModelFeatures:
    scalars: dict[str, np.ndarray]  # name -> [n] float64, in TOKEN_FEATURES (+ CANDIDATE_FEATURES) order
    hidden: np.ndarray  # [n, H] float32

    def matrix(self, names=None) -> np.ndarray:
        return np.stack([self.scalars[k] for k in (names or self.scalars)], 1)  # [n, F]


@contextlib.contextmanager
def evaluating(module):
    """Dropout off for the passes, the module's mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def head_logits(rec, states: torch.Tensor) -> torch.Tensor:
    """fp32 next-token logits [M, V] of final states [M, H] (one fp32-output GEMM for a bf16 head on CUDA)."""
    head = rec.module.base.get_output_embeddings()
    return fp32_logits(head, states) if type(head) is torch.nn.Linear else head(states).float()


def answer_states(rec, method, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(states [M, H] at the answer positions, the tokens they predict [M], their row in the batch [M]) of a
    collated batch, through the method's hidden-state hook."""
    hidden = method.decode_hidden(rec)(batch["input_ids"], batch["attention_mask"])  # [B, L, H]
    rows, cols = batch["answer_row"], batch["answer_col"]
    return hidden[rows, cols], batch["labels"][rows, cols + 1], rows


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def token_features(rec, method, samples: list[Sample], batch_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """TOKEN_FEATURES per sample and the mean answer-position state [n, H]."""
    out = {k: [] for k in TOKEN_FEATURES}
    hidden = []
    with evaluating(rec.module):
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            batch = to_device(rec.collate(chunk), rec.module.device)
            states, targets, rows = answer_states(rec, method, batch)
            logp = F.log_softmax(head_logits(rec, states), -1)  # [M, V]
            token_lp = logp.gather(-1, targets[:, None])[:, 0]  # [M]
            entropy = -(logp.exp() * logp).sum(-1)  # [M]
            count = torch.bincount(rows, minlength=len(chunk)).double()  # answer tokens per sample
            per_sample = lambda x: torch.zeros(len(chunk), dtype=torch.float64, device=x.device).index_add_(
                0, rows, x.double()) / count
            out["loss"].append(-per_sample(token_lp))
            out["token_confidence"].append(per_sample(token_lp.exp()))
            out["token_entropy"].append(per_sample(entropy))
            mean_state = torch.zeros(len(chunk), states.shape[1], dtype=torch.float32, device=states.device)
            hidden.append((mean_state.index_add_(0, rows, states.float()) / count[:, None].float()).cpu())
    return {k: torch.cat(v).cpu().numpy() for k, v in out.items()}, torch.cat(hidden).numpy()


def draw_audit_candidates(data, samples: list[Sample], negatives: int, seed: int) -> np.ndarray:
    """[n, 1 + negatives] int64: each sample's target, then negatives it never touched (see the module doc)."""
    rows = np.zeros((len(samples), negatives + 1), dtype=np.int64)
    for i, s in enumerate(samples):
        seen = set(data.sequences[s.user].tolist())
        if data.num_items - len(seen) < negatives:
            raise ValueError(f"audit.negatives={negatives}: user {data.user_ids[s.user]!r} has touched {len(seen)} of "
                             f"{data.num_items} items, so that many negatives cannot be drawn")
        rng = np.random.default_rng([seed, zlib.crc32(data.user_ids[s.user].encode()), max(s.position, 0)])
        rows[i, 0], rows[i, 1:] = s.target, draw_negatives(rng, seen, data.num_items, negatives)
    return rows


def candidate_features(rec, method, samples: list[Sample], candidates: np.ndarray,
                       batch_size: int) -> dict[str, np.ndarray]:
    """CANDIDATE_FEATURES from the method's scores of each sample's candidates (column 0 the target)."""
    with evaluating(rec.module):
        scores = torch.from_numpy(method.score_candidates(rec, samples, candidates, batch_size))  # [n, C] float64
    logp = torch.log_softmax(scores, -1)
    return {"cand_confidence": logp[:, 0].exp().numpy(), "cand_entropy": (-(logp.exp() * logp).sum(-1)).numpy()}


def model_features(rec, method, samples: list[Sample], candidates: np.ndarray | None,
                   batch_size: int) -> ModelFeatures:
    """Every feature of `samples` under one model (candidate features only when `candidates` is given)."""
    scalars, hidden = token_features(rec, method, samples, batch_size)
    if candidates is not None:
        scalars.update(candidate_features(rec, method, samples, candidates, batch_size))
    return ModelFeatures(scalars, hidden)


@dataclass
class HiddenProjection:
    """States [n, H] -> [n, k]: centred on the rows it was fitted on, then projected (see the module doc)."""

    mean: torch.Tensor  # [H]
    matrix: torch.Tensor  # [H, k]

    @classmethod
    def fit(cls, states: np.ndarray, dim: int, how: str, seed: int) -> "HiddenProjection":
        if how not in HIDDEN_REDUCTIONS:
            raise ValueError(f"audit.hidden_reduce={how!r}: expected one of {', '.join(HIDDEN_REDUCTIONS)}")
        fit = torch.from_numpy(np.asarray(states, dtype=np.float64))  # [n, H]
        mean = fit.mean(0)
        if dim == 0:
            return cls(mean, torch.zeros(fit.shape[1], 0, dtype=torch.float64))
        if how == "random":
            gen = torch.Generator().manual_seed(seed)
            return cls(mean, torch.randn(fit.shape[1], dim, generator=gen, dtype=torch.float64) / dim ** 0.5)
        k = min(dim, max(len(fit) - 1, 1), fit.shape[1])
        _, _, vh = torch.linalg.svd(fit - mean, full_matrices=False)  # rows of vh: the principal directions
        return cls(mean, vh[:k].T)

    def __call__(self, states: np.ndarray) -> np.ndarray:
        return ((torch.from_numpy(np.asarray(states, dtype=np.float64)) - self.mean) @ self.matrix).numpy()
