"""The shadow-model baseline (Shokri et al. 2017): the attacker trains a model of its own like the target, on
samples whose membership it chose, learns the attack from that model's features of its "in" and "out" samples,
and applies it to the target's features.

Construction (small, and only from what the audit's attacker knows):
- shadow users: the known users (known members ∪ known non-members), split at random (seeded, by user) into two
  halves: "in" (the shadow trains on their samples) and "out". Every evaluated user is outside both.
- the shadow: the run's base backbone with a fresh LoRA (recsim.audit.reference.fresh_recommender), trained as
  the target's stage 0 was (`trainer.base`: lr, schedule, epochs, max_steps; the run's batch size) through
  `recsim.runner.train`; `audit.shadow.epochs` / `audit.shadow.max_steps` replace those two when set.
- the attack: an LR on the shadow's features of every shadow sample (label: in), the hidden projection fitted on
  the shadow's states; its scores are read on the target's features of the evaluated samples.
"""

from __future__ import annotations

import numpy as np
from omegaconf import OmegaConf

from recsim.audit.reference import fresh_recommender


def split_shadow_users(users: list[int], seed: int) -> tuple[set[int], set[int]]:
    """(in, out): a seeded half of `users` (rounded up) and the rest; both non-empty for >= 2 users."""
    if len(users) < 2:
        raise ValueError(f"the shadow model needs at least 2 known users to split into in/out, got {len(users)}")
    order = np.random.default_rng(seed).permutation(sorted(users))
    half = (len(order) + 1) // 2
    return set(order[:half].tolist()), set(order[half:].tolist())


def train_shadow(cfg, data, samples, settings, seed: int, out) -> object:
    """The shadow model trained on `samples` (its "in" samples)."""
    import lightning as L

    from recsim.runner import train

    L.seed_everything(seed, workers=True)  # its dropout draws, as the runner seeds a stage
    shadow = fresh_recommender(cfg, data, seed)
    shadow.set_trainable()
    optim = OmegaConf.merge(cfg.trainer.base, {k: settings[k] for k in ("epochs", "max_steps")
                                               if settings[k] is not None})
    train(cfg, shadow, samples, optim, int(cfg.trainer.batch_size), seed, out, "shadow")
    return shadow
