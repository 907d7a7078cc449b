"""EvoRec: Locate – Forget – Update (Liu et al., "An Efficient LLM-based Evolutional Recommendation
with Locate-Forget-Update Paradigm").

At each update (stage r >= 1), with U_A the users active in the new window:
  1. Locate: for u in U_A feed S_u^{<=T} and S_u^A through the current model; per layer l
         s_l = mean_u cos(H_l^A(u), H_l^{<=T}(u))
     and keep Φ = the ceil(t·L) layers with the lowest s_l. Only the LoRA parameters of Φ train.
     `locate.rule=vote` is the authors' code instead: each user votes for its lowest-similarity layer
     (use it with `locate.pooling=mean`, as they mean-pool; recsim excludes padding from the mean).
  2. Forget: a light sequential filter (SASRec by default) trained on pre-T data and fine-tuned on the
     new window scores the items of S_u^{A-}; the K lowest are removed from u's update data. With
     `forget_scope=window` the candidates are the newest old items an update prompt shows:
     min(protocol window, `recipe.prompt.max_history`); removing an item no prompt shows changes nothing.
  3. Update: L_total = L_e + λ·L_c, L_e the NLL of the filtered active-user samples, L_c the KL between
     the frozen pre-update model and the updated one on inactive-user samples (recsim.methods.kl).
Stage 0 trains the initial model like every other method (all LoRA parameters).

Choices where the paper is silent, all in config: which token's state is compared (`locate.pooling`:
`last` prompt token by default, the state that writes the answer; or `mean`); ceil for the number of
layers (the authors keep 9 of 28 layers at ~30%); Locate sees at most `locate.max_users` active users
(seeded sample) to bound its cost; the filter is retrained at every round on everything before it.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from recsim.backbones.lora import snapshot
from recsim.methods.base import ContinualMethod, register
from recsim.methods.kl import AnchorKL
from recsim.protocols.base import make_samples

log = logging.getLogger(__name__)


def select_layers(old_states: torch.Tensor, new_states: torch.Tensor, t: float, rule: str = "mean_cosine"):
    """Layers to train from per-layer states [L, n, H] of the old and new sequences.

    Returns (chosen layer indices sorted, mean cosine per layer, votes per layer).
    """
    sim = torch.nn.functional.cosine_similarity(new_states, old_states, dim=-1)  # [L, n]
    n_layers = sim.shape[0]
    n_keep = min(n_layers, max(1, math.ceil(t * n_layers - 1e-9)))
    mean_sim = sim.mean(1)  # s_l, averaged over users
    votes = torch.bincount(sim.argmin(0), minlength=n_layers)  # each user's lowest-similarity layer
    if rule == "mean_cosine":
        order = torch.argsort(mean_sim)
    elif rule == "vote":
        order = sorted(range(n_layers), key=lambda l: (-int(votes[l]), float(mean_sim[l])))
    else:
        raise ValueError(f"method.locate.rule={rule!r}: expected 'mean_cosine' or 'vote'")
    chosen = sorted(int(l) for l in list(order)[:n_keep])
    return chosen, mean_sim.tolist(), votes.tolist()


@register
class EvoRec(ContinualMethod):
    name = "evorec"

    def _rng(self, stage):
        return np.random.default_rng([self.cfg.seed, stage.index])

    def training_samples(self, stage, rec):
        if stage.index == 0:
            return super().training_samples(stage, rec)
        sequences, targets = stage.sequences, {u: stage.new_targets[u] for u in stage.active_users}
        if self.cfg.k > 0:
            from recsim.methods.forget import drop_positions, outdated_positions, train_filter

            window = self.protocol.window
            old = make_samples(stage.sequences, {u: [p for p in ps if p < stage.boundary[u]]
                                                 for u, ps in stage.cumulative_targets.items()}, window)
            new = make_samples(stage.sequences, stage.new_targets, window)
            if self.cfg.filter not in self.cfg.filters:
                raise ValueError(f"method.filter={self.cfg.filter!r} is not one of {sorted(self.cfg.filters)}")
            spec = self.cfg.filters[self.cfg.filter]
            result = train_filter(spec.kind, self.protocol.data.num_items, old, new, spec,
                                  seed=self.cfg.seed * 1000 + stage.index)
            # scope=window: only the old items some update prompt shows can be forgotten to any effect;
            # an LLM prompt shows the newest `max_history` of the protocol's window
            shown = min(window, rec.history_shown or window)
            removed = outdated_positions(result.model, stage, stage.active_users, self.cfg.k, shown,
                                         scope=self.cfg.forget_scope, max_len=spec.max_len)
            sequences, targets = drop_positions(stage, removed)
            targets = {u: targets[u] for u in stage.active_users if u in targets}
            # the runner resets `report` before asking for the samples, so this lands in this update's figures
            self.report.update({"forgotten_items": int(sum(map(len, removed.values()))),
                                "filter_seconds": result.pretrain_seconds + result.finetune_seconds})
        return make_samples(sequences, targets, self.protocol.window)

    def locate(self, stage, rec) -> list[int]:
        users = [u for u in stage.active_users if stage.new_targets.get(u) and stage.boundary[u] > 0]
        if len(users) > self.cfg.locate.max_users:
            users = sorted(self._rng(stage).choice(users, self.cfg.locate.max_users, replace=False).tolist())
        old = [tuple(stage.sequences[u][: stage.boundary[u]]) for u in users]
        new = [tuple(stage.sequences[u][: max(stage.new_targets[u]) + 1]) for u in users]
        pooling = self.cfg.locate.pooling
        chosen, sims, votes = select_layers(rec.module.layer_states(old, pooling), rec.module.layer_states(new, pooling),
                                            self.cfg.t, self.cfg.locate.rule)
        self.report.update({"located_layers": chosen, "layer_cosine": [round(s, 6) for s in sims],
                            "layer_votes": votes, "locate_users": len(users)})
        log.info("EvoRec located layers %s (t=%s, rule=%s) from %d users", chosen, self.cfg.t, self.cfg.locate.rule,
                 len(users))
        return chosen

    def before_update(self, stage, rec, samples):
        if stage.index == 0:
            return super().before_update(stage, rec, samples)
        anchor = snapshot(rec.model)  # the frozen pre-update model, for L_c
        layers = None if self.cfg.t >= 1 else set(self.locate(stage, rec))  # t = 1: w/o location
        rec.set_trainable(layers)
        inactive = make_samples(stage.sequences, {u: stage.cumulative_targets[u] for u in stage.inactive_users},
                                self.protocol.window)
        if self.cfg.lam > 0 and inactive:
            if len(inactive) > self.cfg.kl_samples:
                keep = self._rng(stage).choice(len(inactive), self.cfg.kl_samples, replace=False)
                inactive = [inactive[i] for i in sorted(keep)]
            rec.add_loss_term(AnchorKL(anchor, self.cfg.lam, inactive, self.cfg.kl_batch_size,
                                       seed=self.cfg.seed * 1000 + stage.index, name="consistency_kl"))
        self.report["kl_samples"] = len(inactive)
