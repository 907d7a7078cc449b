"""The L2D paper's ID classification head: a linear classifier over the items on the same states as L2D's memory
(recsim.decoders.latent), trained with cross-entropy while the LLM stays frozen; a test state's logits rank the
whole catalogue.

    logits(h) = W h + b,   W ∈ R^{N×H}, b ∈ R^N (column i is item i + 1)
    min_{W, b}  (1/n) Σ_j CE(logits(h_j), v_j)      AdamW, minibatches of the memory, seeded

Choices (settings: conf/decoder/id_head.yaml, `train.*`):
- The head sees the memory as L2D does (`memory.samples`, `memory_ratio`), float16 states upcast to float32;
  W and b start from torch's Linear initialisation, drawn with the run's seed, as is the minibatch order.
- Every catalogue item is a class: an item no memory entry targets (cold) still has a logit, pushed down by every
  other sample's gradient, so it is ranked (last, in practice). The cold counts are reported as for L2D.
- The trained head is saved beside the memory (`id_head-<key>.safetensors`: W, b, the fingerprint of the memory
  and the training settings) and reused when they match; its training seconds and final training accuracy are
  reported beside the metrics.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from recsim.decoders.latent import LatentDecoder, compact, fingerprint_key, load_fingerprinted

log = logging.getLogger(__name__)


def train_head(states: torch.Tensor, targets: torch.Tensor, num_items: int, *, epochs: int, lr: float,
               batch_size: int, weight_decay: float, seed: int, device=None) -> torch.nn.Linear:
    """A Linear(H, num_items) trained on (states [n, H], targets [n] in 1..num_items) with cross-entropy."""
    if epochs < 1 or batch_size < 1 or lr <= 0 or weight_decay < 0:
        raise ValueError(f"id_head: epochs={epochs}, batch_size={batch_size} must be >= 1, lr={lr} > 0, "
                         f"weight_decay={weight_decay} >= 0")
    if len(targets) and (int(targets.min()) < 1 or int(targets.max()) > num_items):
        raise ValueError(f"id_head: targets must be items 1..{num_items}")
    device = torch.device(device) if device is not None else states.device
    x, y = states.to(device, torch.float32), (targets - 1).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(x.shape[1], num_items).to(device)
    order = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in torch.randperm(len(y), generator=order).to(device).split(batch_size):
                loss = F.cross_entropy(head(x[batch]), y[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return head.eval().requires_grad_(False)


@torch.no_grad()
def head_accuracy(head: torch.nn.Linear, states: torch.Tensor, targets: torch.Tensor, batch_size: int = 4096) -> float:
    """Share of (state, target) pairs whose top logit is the target."""
    dev = head.weight.device
    hits = sum(int((head(states[r : r + batch_size].to(dev, torch.float32)).argmax(1) + 1 == targets[r : r + batch_size]
                    .to(dev)).sum()) for r in range(0, len(targets), batch_size))
    return hits / max(1, len(targets))


@torch.no_grad()
def top_items(head: torch.nn.Linear, queries: torch.Tensor, k: int) -> torch.Tensor:
    """The k items of highest logit per query [B, k] (items 1..N), best first."""
    logits = head(queries.to(head.weight.device, torch.float32))
    return logits.topk(min(k, logits.shape[1]), dim=1).indices + 1


class IDHead(LatentDecoder):
    """The ID classification head baseline: the catalogue ranked by a linear classifier's logits on the state L2D
    uses (the LLM frozen)."""

    name = "id_head"

    def fit(self, rec, stage_dir):
        t = self.settings.train
        knobs = {"epochs": int(t.epochs), "lr": float(t.lr), "batch_size": int(t.batch_size),
                 "weight_decay": float(t.weight_decay), "seed": int(self.cfg.seed)}
        fingerprint = {"memory": self.memory.key, "num_items": rec.num_items, **knobs}
        path = Path(stage_dir) / f"id_head-{fingerprint_key(fingerprint)}.safetensors" if stage_dir else None
        device = rec.module.device
        loaded = _load(path, fingerprint, device) if path is not None and path.is_file() else None
        if loaded is None:
            start = time.perf_counter()
            self.head = train_head(self.memory.states, self.memory.targets, rec.num_items, device=device, **knobs)
            self.train_seconds = time.perf_counter() - start
            self.train_accuracy = head_accuracy(self.head, self.memory.states, self.memory.targets)
            log.info("ID head: %d epochs on %d entries in %.1f s, training accuracy %.3f", knobs["epochs"],
                     len(self.memory), self.train_seconds, self.train_accuracy)
            if path is not None and self.settings.memory.get("save", True):  # saved where the memory is
                _save(path, self.head, fingerprint, self.train_seconds, self.train_accuracy)
        else:
            self.head, self.train_seconds, self.train_accuracy = loaded

    def lists(self, queries):
        return compact(top_items(self.head, queries, self.top_k()), self.top_k())  # -1 past the catalogue's size

    def count_rows(self, counts):
        rows = super().count_rows(counts)
        if hasattr(self, "train_seconds"):
            rows.update({"id_head_train_seconds": self.train_seconds, "id_head_train_accuracy": self.train_accuracy})
        return rows


def _save(path: Path, head: torch.nn.Linear, fingerprint: dict, seconds: float, accuracy: float) -> None:
    import safetensors.torch

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    meta = {"fingerprint": json.dumps(fingerprint, sort_keys=True), "train_seconds": repr(seconds),
            "train_accuracy": repr(accuracy)}
    safetensors.torch.save_file({"weight": head.weight.detach().cpu().contiguous(),
                                 "bias": head.bias.detach().cpu().contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _load(path: Path, fingerprint: dict, device) -> tuple[torch.nn.Linear, float, float] | None:
    """(head, its training seconds, its training accuracy) from `path` when its fingerprint matches, else None."""
    loaded = load_fingerprinted(path, fingerprint, "ID head")
    if loaded is None:
        return None
    tensors, meta = loaded
    weight = tensors["weight"]
    head = torch.nn.Linear(weight.shape[1], weight.shape[0]).to(device)
    head.load_state_dict({"weight": weight, "bias": tensors["bias"]})
    return head.eval().requires_grad_(False), float(meta["train_seconds"]), float(meta["train_accuracy"])
