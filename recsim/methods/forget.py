"""EvoRec's Forget step: a light sequential filter drops the K most outdated old items of each active user.

Algorithm (Liu et al., "An Efficient LLM-based Evolutional Recommendation with Locate-Forget-Update
Paradigm", §Forget; docs/papers README §1). For an active user u, S_u^A = S_u^{A-} ⊕ S_u^{A+}, with
S^{A-} = ``stage.sequences[u][:stage.boundary[u]]`` (before T) and S^{A+} the rest.

1. Filter. Build a light sequential recommender f (SASRec by default; GRU4Rec or BPR-MF), train it on
   the pre-T samples for ``epochs`` epochs, then fine-tune the same weights on the recent samples for
   ``finetune_epochs`` epochs (:func:`train_filter`; each phase a fresh seeded Lightning Trainer).
2. Represent. h_u = f.user_repr(S_u^A), where S_u^A is the *update-visible* sequence: every item up
   to and including u's last new target ``max(stage.new_targets[u])``. Evaluated positions after it
   are never fed in (they must not leak into training data). Users with an empty S^{A-} or no new
   target are skipped. With ``max_len`` set, only the newest ``max_len`` items feed h_u (SASRec also
   truncates to its own ``max_len``); by default the whole S^A does.
3. Score. For each candidate position p of S^{A-}: s_p = <h_u, e_{S_u[p]}> (item embedding of f).
   Candidates depend on ``scope``:
   - ``"window"`` (default): the last ``window`` positions of S^{A-}. Update samples have target
     positions >= boundary and histories of at most ``window`` items, so older positions never enter
     any update sample; removing them would change nothing. EvoRec passes the number of history items
     the recommender actually reads (an LLM prompt's ``max_history`` when it is below the protocol's),
     plus K when removals back-fill (``method.forget_backfill``): removing K shown items lets up to K
     older ones into the shown window, and those must have been scored too.
   - ``"all"``: every position of S^{A-}.
4. Remove. The K lowest-scored candidates are removed (paper: K = 2). Choices the paper leaves open:
   - ties (e.g. the same item twice) go to the *earlier* position first: older items are removed first;
   - at least one candidate is always kept: at most ``len(candidates) - 1`` positions are removed, so a
     user with a single old candidate keeps it (the update never loses all of a user's old context);
   - K = 0 removes nothing.
5. Update data. :func:`drop_positions` deletes the removed positions and re-indexes the new targets
   (p -> p - #removed positions before p), so ``make_samples(sequences, targets, window)`` yields the
   same targets with the outdated items gone from their histories: D'_A of the paper.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from recsim.models.sequential import collate_samples
from recsim.models.sequential_module import SequentialRecModule, build_sequential
from recsim.protocols.base import Sample, StageData

# constructor arguments each filter kind takes from its config (the rest drives training)
MODEL_KEYS = {
    "sasrec": ("hidden", "layers", "heads", "dropout", "max_len", "inner_size", "activation", "norm", "layer_norm_eps",
               "emb_scale", "attn_dropout", "inner_dropout", "positions", "init"),
    "gru4rec": ("hidden", "layers", "dropout", "gru_hidden", "gru_bias"),
    "bpr_mf": ("hidden",),
}
SCOPES = ("window", "all")


@dataclass
class FilterResult:
    model: nn.Module  # the trained filter, in eval mode, on the CPU
    pretrain_seconds: float  # wall time of the pre-T training (paper, SASRec: ~2.35 min)
    finetune_seconds: float  # wall time of the fine-tune on recent data (paper: ~0.17 min)


def model_args(kind: str, cfg) -> dict:
    """The constructor kwargs of filter ``kind`` present in ``cfg`` (a dict or DictConfig)."""
    if kind not in MODEL_KEYS:
        raise ValueError(f"unknown filter kind {kind!r}; valid kinds: {sorted(MODEL_KEYS)}")
    return {key: cfg[key] for key in MODEL_KEYS[kind] if key in cfg}


def _fit(module: SequentialRecModule, samples: list[Sample], cfg, epochs: int, seed: int, trainer_cfg=None) -> float:
    """One training phase with a fresh Trainer; returns its wall time in seconds (0 if nothing to do).

    The filter has its own schedule (`cfg`) but runs where the main model runs: accelerator, precision
    and deterministic come from `trainer_cfg` (the run's `cfg.trainer`). None keeps the filter's own
    defaults: a GPU when there is one, 32-bit, deterministic. One device, no clipping, no compile: a
    filter fit takes seconds and its numbers should not depend on the LLM's distribution settings."""
    from recsim.training import build_trainer

    if epochs <= 0 or not samples:
        return 0.0
    torch.manual_seed(seed)  # dropout draws
    max_len = int(cfg["max_len"])
    loader = DataLoader(
        samples,
        batch_size=int(cfg["batch_size"]),
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),  # batch order
        collate_fn=lambda batch: collate_samples(batch, max_len=max_len),
    )
    inherited = {"accelerator": "gpu" if torch.cuda.is_available() else "cpu", "precision": "32-true",
                 "deterministic": True}
    if trainer_cfg is not None:
        inherited = {k: trainer_cfg.get(k, v) for k, v in inherited.items()}
    trainer = build_trainer(inherited, max_epochs=int(epochs), progress_bar=False)
    start = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - start


def train_filter(
    kind: str, num_items: int, old_samples: list[Sample], new_samples: list[Sample], cfg, seed: int = 0,
    trainer_cfg=None,
) -> FilterResult:
    """Pre-train filter ``kind`` on ``old_samples`` (pre-T) for ``cfg.epochs``, then fine-tune it on
    ``new_samples`` for ``cfg.finetune_epochs``. The same seed gives the same filter.

    ``cfg`` carries the keys of ``conf/method/filter/*.yaml``: model arguments (:data:`MODEL_KEYS`),
    ``lr``, ``loss``, ``epochs``, ``finetune_epochs``, ``batch_size``, ``max_len``. Each phase has its
    own optimiser (a fresh Trainer), as a fine-tune started from a saved checkpoint would.
    ``trainer_cfg`` (the run's ``cfg.trainer``) gives both Trainers their accelerator, precision and
    determinism; None keeps the filter's own defaults.
    """
    torch.manual_seed(seed)  # initial weights
    model = build_sequential(kind, num_items, **model_args(kind, cfg))
    module = SequentialRecModule(model, loss=cfg["loss"], lr=float(cfg["lr"]), seed=seed)
    pretrain = _fit(module, old_samples, cfg, cfg["epochs"], seed, trainer_cfg)
    finetune = _fit(module, new_samples, cfg, cfg["finetune_epochs"], seed + 1, trainer_cfg)
    model = module.model.cpu().eval()
    return FilterResult(model, pretrain, finetune)


def _candidates(stage: StageData, u: int, window: int, scope: str) -> range:
    b = int(stage.boundary[u])
    return range(max(0, b - window), b) if scope == "window" else range(b)


@torch.no_grad()
def outdated_positions(
    model: nn.Module,
    stage: StageData,
    users,
    k: int,
    window: int,
    scope: str = "window",
    *,
    max_len: int | None = None,
    batch_size: int = 256,
) -> dict[int, list[int]]:
    """Positions of S^{A-} to remove, per user: the K lowest-scored candidates (see the module doc).

    ``users``: whom to filter (None: ``stage.active_users``); ``window``: the protocol's history window;
    ``max_len``: newest S^A items fed to the user representation (None: all). Returns only users with at
    least one removed position, each with its positions in ascending order.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid scopes: {list(SCOPES)}")
    if k <= 0:
        return {}
    users = stage.active_users if users is None else users
    jobs = []  # (user, visible S^A, candidate positions)
    for u in users:
        targets = stage.new_targets.get(u, [])
        if stage.boundary.get(u, 0) <= 0 or not targets:
            continue
        cands = _candidates(stage, u, window, scope)
        if len(cands) - 1 <= 0:
            continue  # a single candidate is always kept
        visible = stage.sequences[u][: max(targets) + 1]
        if max_len:
            visible = visible[-max_len:]
        jobs.append((u, visible, cands))

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    removed = {}
    try:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            L = max(len(v) for _, v, _ in chunk)
            C = max(len(c) for _, _, c in chunk)
            history = torch.zeros(len(chunk), L, dtype=torch.long)  # [B, L], left-padded
            items = torch.zeros(len(chunk), C, dtype=torch.long)  # [B, C], right-padded
            for row, (u, visible, cands) in enumerate(chunk):
                history[row, L - len(visible) :] = torch.as_tensor(visible, dtype=torch.long)
                items[row, : len(cands)] = torch.as_tensor(stage.sequences[u][cands.start : cands.stop])
            user = model.user_repr(history.to(device))  # [B, D]
            # elementwise product then sum: identical items get bit-identical scores (exact ties)
            scores = (model.item_emb(items.to(device)) * user[:, None, :]).sum(-1).float().cpu().numpy()  # [B, C]
            for row, (u, _, cands) in enumerate(chunk):
                n = len(cands)
                order = np.lexsort((np.arange(n), scores[row, :n]))  # by score, then earlier position
                drop = order[: min(k, n - 1)]
                removed[u] = sorted(cands.start + int(i) for i in drop)
    finally:
        model.train(was_training)
    return removed


def drop_positions(
    stage: StageData, removed: dict[int, list[int]]
) -> tuple[dict[int, np.ndarray], dict[int, list[int]]]:
    """Sequences with the ``removed`` positions deleted, and ``stage.new_targets`` re-indexed to them.

    A new target p becomes p - #{removed positions < p}; it still points at the same item. Only
    positions of S^{A-} (< boundary) may be removed. The StageData is not mutated; users without
    removals share their (unmodified) arrays with it.
    """
    sequences = dict(stage.sequences)
    targets = {u: list(ps) for u, ps in stage.new_targets.items()}
    for u, positions in removed.items():
        drop = np.unique(np.asarray(positions, dtype=np.int64))
        if not len(drop):
            continue
        if drop[0] < 0 or drop[-1] >= stage.boundary[u]:
            raise ValueError(f"user {u}: removed positions {drop.tolist()} are outside S^A- [0, {stage.boundary[u]})")
        sequences[u] = np.delete(stage.sequences[u], drop)
        if u in targets:
            targets[u] = [int(p - np.searchsorted(drop, p)) for p in targets[u]]
    return sequences, targets
