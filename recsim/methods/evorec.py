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
     `forget_scope=window` the candidates are the old items an update prompt can show. An update prompt
     shows the newest `shown` = min(protocol window, `recipe.prompt.max_history`) history items, and
     removing items lets older ones slide in (back-fill). `forget_backfill` chooses:
     - true (default): score the newest min(b, shown + K) old positions, so every item that can slide
       into a prompt after the K removals was scored; the prompts keep their length (as at stage 0).
     - false: score the newest `shown`, and cut each update sample's history at the `shown` positions
       before its target before removing: no back-fill, prompts lose the removed titles.
     (Scoring only the shown window and back-filling let never-scored items into the prompts.)
  3. Update: L_total = L_e + λ·L_c, L_e the NLL of the filtered active-user samples, L_c the KL between
     the frozen pre-update model and the updated one on inactive-user samples (recsim.methods.kl).
     Same values, less work (`kl.cache_frozen`): each inactive sample is prepared once per update, its
     state below the lowest located layer (those layers do not train) and, on a GPU, the frozen model's
     distributions, instead of running both models through every layer at every draw.
     Normalisation (`kl.positions`, `kl.reduction`), default `all` + `sum`: L_c is summed over every
     prompt+answer position of the KL batch. Why: with the per-token mean, λ = 2e-4 is inert. Measured
     (cpu scale, beauty, smollm2_135m, λ = 0 update, step 5): ‖∇L_e‖ = 0.68 while the per-token-mean
     L_c = 8e-3 (answer) / 4e-3 (all) has ‖∇L_c‖ = 0.19 / 0.12, so λ·‖∇L_c‖ ≈ 4e-5 ≪ ‖∇L_e‖ for the
     whole paper range. The term bites when λ·M·‖∇L_c^mean‖ nears ‖∇L_e‖, M the positions summed:
     λ·M ≈ 3-6. With `all`, M ≈ 650 at the cpu scale (8 prompts of ~80 tokens) and ≈ 2-10k at the
     paper's (prompts of hundreds of tokens), so λ ∈ [2e-5, 2e-3] runs from inert to dominant there,
     and reaches λ·M ≈ 1.3 at the cpu scale (sweep higher there). `answer` + `sum` (M ≈ 120) stays
     inert over the range. The authors' code averages its (disabled) term over all positions.
     Measured with this default (H200, SmolLM2-135M, 600 Beauty users, docs/MEASURED.md): the KL of
     U_I's predictions after the update falls 0.095 (λ = 0) → 0.093 (2e-5) → 0.077 (2e-4) → 0.028 (2e-3)
     → 0.004 (2e-2) nats per answer token: the paper's range runs from barely acting to dominant.
Stage 0 trains the initial model like every other method (all LoRA parameters).

Choices where the paper is silent, all in config: which token's state is compared (`locate.pooling`:
`last` prompt token by default, the state that writes the answer; or `mean`); ceil for the number of
layers (the authors keep 9 of 28 layers at ~30%); Locate sees at most `locate.max_users` active users
(seeded sample) to bound its cost; the filter is retrained at every round on everything before it.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from recsim.backbones.lora import snapshot
from recsim.methods.base import ContinualMethod, register
from recsim.methods.kl import AnchorKL
from recsim.protocols.base import Sample, make_samples

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


def _without_backfill(stage, targets: dict[int, list[int]], removed: dict[int, list[int]], shown: int) -> list:
    """Update samples whose history is the `shown` positions before the target minus the removed ones:
    a removed item leaves a gap instead of letting an older item in."""
    out = []
    for s in make_samples(stage.sequences, targets, shown):
        gone = set(removed.get(s.user, ()))
        positions = range(s.position - len(s.history), s.position)
        kept = tuple(i for p, i in zip(positions, s.history) if p not in gone)
        out.append(Sample(s.user, kept, s.target, s.position))
    return out


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

            backfill = self.cfg.forget_backfill
            if not isinstance(backfill, bool):
                raise ValueError(f"method.forget_backfill={backfill!r}: expected true or false")
            window = self.protocol.window
            old = make_samples(stage.sequences, {u: [p for p in ps if p < stage.boundary[u]]
                                                 for u, ps in stage.cumulative_targets.items()}, window)
            new = make_samples(stage.sequences, stage.new_targets, window)
            if self.cfg.filter not in self.cfg.filters:
                raise ValueError(f"method.filter={self.cfg.filter!r} is not one of {sorted(self.cfg.filters)}")
            spec = self.cfg.filters[self.cfg.filter]
            result = train_filter(spec.kind, self.protocol.data.num_items, old, new, spec,
                                  seed=self.cfg.seed * 1000 + stage.index,
                                  trainer_cfg=getattr(getattr(rec, "cfg", None), "trainer", None))
            # scope=window: only the old items some update prompt shows can be forgotten to any effect;
            # an LLM prompt shows the newest `max_history` of the protocol's window
            shown = min(window, rec.history_shown or window)
            # back-fill: K removals pull up to K older items into the shown window, so score those too
            scored = shown + self.cfg.k if backfill else shown
            removed = outdated_positions(result.model, stage, stage.active_users, self.cfg.k, scored,
                                         scope=self.cfg.forget_scope, max_len=spec.max_len)
            # the runner resets `report` before asking for the samples, so this lands in this update's figures
            self.report.update({"forgotten_items": int(sum(map(len, removed.values()))),
                                "filter_seconds": result.pretrain_seconds + result.finetune_seconds,
                                "filter_pretrain_seconds": result.pretrain_seconds})
            if self.cfg.get("filter_pretrain", "alongside") == "alongside":
                # the paper: SASRec's pre-training on pre-T data (~2.35 min) runs alongside the LLM's training, no
                # added latency; only its fine-tune on the new window (~0.17 min) is part of the update
                self.report["offline_seconds"] = result.pretrain_seconds
            if not backfill:
                return _without_backfill(stage, targets, removed, shown)
            sequences, targets = drop_positions(stage, removed)
            targets = {u: targets[u] for u in stage.active_users if u in targets}
        return make_samples(sequences, targets, self.protocol.window)

    def locate(self, stage, rec) -> list[int]:
        start = time.perf_counter()
        users = [u for u in stage.active_users if stage.new_targets.get(u) and stage.boundary[u] > 0]
        if len(users) > self.cfg.locate.max_users:
            users = sorted(self._rng(stage).choice(users, self.cfg.locate.max_users, replace=False).tolist())
        old = [tuple(stage.sequences[u][: stage.boundary[u]]) for u in users]
        new = [tuple(stage.sequences[u][: max(stage.new_targets[u]) + 1]) for u in users]
        pooling = self.cfg.locate.pooling
        chosen, sims, votes = select_layers(rec.module.layer_states(old, pooling), rec.module.layer_states(new, pooling),
                                            self.cfg.t, self.cfg.locate.rule)
        self.report.update({"located_layers": chosen, "layer_cosine": [round(s, 6) for s in sims],
                            "layer_votes": votes, "locate_users": len(users),
                            "locate_seconds": round(time.perf_counter() - start, 3)})  # .tolist() synced the device
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
        self._consistency = None
        if self.cfg.lam > 0 and inactive:
            if len(inactive) > self.cfg.kl_samples:
                keep = self._rng(stage).choice(len(inactive), self.cfg.kl_samples, replace=False)
                inactive = [inactive[i] for i in sorted(keep)]
            # cache_frozen: the frozen model's distributions on this fixed pool and the states below the
            # lowest located layer are computed once, not at every step (same L_c; see recsim.methods.kl)
            self._consistency = AnchorKL(anchor, self.cfg.lam, inactive, self.cfg.kl_batch_size,
                                         seed=self.cfg.seed * 1000 + stage.index, name="consistency_kl",
                                         positions=self.cfg.kl.positions, reduction=self.cfg.kl.reduction,
                                         cache_frozen=self.cfg.kl.get("cache_frozen", "auto"))
            rec.add_loss_term(self._consistency)
        self.report["kl_samples"] = len(inactive)

    def after_update(self, stage, rec):
        term, self._consistency = getattr(self, "_consistency", None), None
        if term is not None and term.pool is not None:  # how L_c ran: split layer, frozen store
            self.report["kl_pool"] = term.pool.summary()
        super().after_update(stage, rec)  # drops the term, and with it the pool's device memory
