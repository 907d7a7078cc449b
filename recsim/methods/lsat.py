"""LSAT (Shi et al., "Preliminary Study on Incremental Learning for Large Language Model-based
Recommender Systems", CIKM 2024, arXiv 2312.15599): a long-term LoRA learns from all data, a
short-term LoRA from the recent period only, and the two are combined at inference.

What the paper and its code say (read with the `search` tool, 2025): the paper's text (abstract and
third-party summaries) has "a short-term module trained on new data" and "a long-term module trained on
historical data", combined by an output ensemble (LSAT-EN) or by LoRA fusion through task arithmetic
(LSAT-TA). The authors' code (github.com/TianhaoShi2001/LSAT) settles the open points:
- long-term adapter: `arithmetic.py` loads `retrain_trstart0_trtotal_{n}`, the adapter that
  `full_retrain.sh` / `train.py --mode full` trains from a fresh LoRA on every period 0..n-1. So the
  long-term adapter is *re-trained from scratch on all data* each period: `long_term: retrain` (default).
  `long_term: continue` is recsim's cheaper reading (keep training the current long-term adapter for
  `long_epochs` epochs with the update schedule).
- short-term adapter: `retrain_trstart{m}_trtotal_1`, a fresh LoRA trained on period m alone. recsim
  re-initialises "short" at every update and trains it on the new window with the update schedule.
- fusion weight: `arithmetic.py` tries weight1 in 0.1..0.9 for the long-term adapter (1 − weight1 for
  the short-term one), keeps the best on the validation period (their metric: AUC) and reports test
  with it. recsim does the same with `weight_grid` (default [0, 0.25, 0.5, 0.75, 1]: the ends are the
  two adapters alone) and `select_metric` (default NDCG@10 over all validation users) on the stage's
  validation split, for both combinations:
    ensemble:  score = w·s_long + (1 − w)·s_short, s = mean per-token log-likelihood of a candidate;
               in generation mode, greedy decoding on w·log p_long + (1 − w)·log p_short per token
               (each adapter with its own KV cache);
    merge:     one adapter with A = w·A_long + (1 − w)·A_short and B likewise (their task arithmetic
               averages every adapter tensor, A and B separately), for scoring and generation.
  Ties between weights keep the first in `weight_grid`. Generation mode uses the w chosen on candidate
  scoring (generating lists for every grid point would multiply its cost by the grid's size).
- The latent decoders (L2D, the ID head) need one hidden state per prompt: under `merge` it is the merged
  adapter's; the ensemble fuses two adapters' predictions, not states, so it has one only when w is 0 or 1 (one
  adapter alone). recsim refuses `combine: ensemble` with those decoders before any work (recsim.schema); the
  hook raises for a finished run loaded with it.
Stage 0 trains the long-term adapter ("default") like every other method; before the first update
inference uses it alone. Both adapters are saved in peft's format at every stage.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from omegaconf import OmegaConf

from recsim.backbones import lora as lora_ops
from recsim.backbones.adapters import Adapters
from recsim.eval.metrics import metric_values
from recsim.methods.base import ContinualMethod, register
from recsim.protocols.base import make_samples

log = logging.getLogger(__name__)
SHORT = "short"
LONG_TERM = ("retrain", "continue")
COMBINE = ("ensemble", "merge")


@register
class LSAT(ContinualMethod):
    name = "lsat"

    def setup(self, rec, protocol):
        super().setup(rec, protocol)
        if getattr(rec, "kind", None) != "llm":
            raise ValueError("method=lsat needs an LLM backbone (backbone.kind=llm)")
        if self.cfg.long_term not in LONG_TERM:
            raise ValueError(f"method.long_term={self.cfg.long_term!r}: expected one of {list(LONG_TERM)}")
        if self.cfg.combine not in COMBINE:
            raise ValueError(f"method.combine={self.cfg.combine!r}: expected one of {list(COMBINE)}")
        grid = list(self.cfg.weight_grid)
        if not grid or any(not 0 <= float(w) <= 1 for w in grid):
            raise ValueError(f"method.weight_grid={grid}: expected a non-empty list of weights in [0, 1]")
        try:  # a bad metric name fails now, not after training
            metric_values(np.zeros((1, 2)), self.cfg.select_metric)
        except ValueError:
            raise ValueError(f"method.select_metric={self.cfg.select_metric!r}: expected HR@K, NDCG@K, Recall@K or MRR") from None
        self.adapters = Adapters(rec.model)
        self.adapters.add(SHORT, seed=self.cfg.seed)  # "default"'s LoRA settings, its A matrices seeded
        self.adapters.activate("default")
        self.short_initial = self.adapters.snapshot(SHORT)
        self.short_ready = False
        self.weight: float | None = None  # w of the long-term adapter; None until the first update

    def before_update(self, stage, rec, samples):
        if stage.index == 0:
            return super().before_update(stage, rec, samples)
        long = make_samples(stage.sequences, stage.cumulative_targets, self.protocol.window)
        if self.cfg.long_samples and len(long) > self.cfg.long_samples:
            keep = np.random.default_rng([self.cfg.seed, stage.index]).choice(len(long), self.cfg.long_samples,
                                                                              replace=False)
            long = [long[i] for i in sorted(keep)]
        self.adapters.activate("default")
        if self.cfg.long_term == "retrain":  # the authors' code: a fresh LoRA on all periods, stage 0's schedule
            rec.reset_to_initial()
            optim = rec.schedule(0)[0]
        else:
            optim = OmegaConf.merge(rec.schedule(stage.index)[0], {"epochs": self.cfg.long_epochs})
        self.extra_trainable = self.adapters.trainable("default")
        self.train_fn(long, optim, "long_term")
        # short-term adapter: fresh, trained on the new window by the runner's fit
        self.adapters.load_snapshot(SHORT, self.short_initial)
        self.adapters.activate(SHORT)
        self.adapters.trainable(SHORT)
        self.report.update({"long_term_samples": len(long), "long_term": self.cfg.long_term})

    def after_update(self, stage, rec):
        super().after_update(stage, rec)
        self.adapters.activate("default")
        if stage.index > 0:
            self.short_ready = True
            self.weight = self.select_weight(stage, rec)

    # ---- the fusion weight ----------------------------------------------------------------------
    def select_weight(self, stage, rec) -> float:
        """w in `weight_grid` with the best `select_metric` on the stage's validation split (first on ties)."""
        grid = [float(w) for w in self.cfg.weight_grid]
        split = getattr(self.protocol, "valid_splits", {}).get(stage.eval_split)
        if split is None:
            if len(grid) == 1:
                return grid[0]
            raise ValueError(f"method=lsat chooses its weight on the validation split of {stage.eval_split!r}, "
                             f"but the protocol has none; give one weight instead (method.weight_grid=[0.5])")
        per_weight = {w: [] for w in grid}
        for group, samples in split.samples.items():
            if not samples:
                continue
            if group not in split.candidates:
                raise ValueError(f"validation split {split.name!r}: group {group!r} has no candidates drawn")
            cands = split.candidates[group]
            if self.cfg.combine == "ensemble":  # two scorings, every w from them
                long, short = self._adapter_scores(rec, samples, cands)
                scored = {w: w * long + (1 - w) * short for w in grid}
            else:
                scored = {w: self._merged_scores(rec, samples, cands, w) for w in grid}
            for w in grid:
                per_weight[w].append(metric_values(scored[w], self.cfg.select_metric))
        values = {w: float(np.concatenate(v).mean()) if v else float("nan") for w, v in per_weight.items()}
        best = max(grid, key=lambda w: (values[w], -grid.index(w)))  # the first w of the highest value
        metric = self.cfg.select_metric
        self.report.update({"lsat_weight": best, f"lsat_valid_{metric}": {str(w): values[w] for w in grid}})
        log.info("LSAT (%s): w = %s on %s (%s by w: %s)", self.cfg.combine, best, split.name, metric, values)
        return best

    def _adapter_scores(self, rec, samples, cands):
        bs = self.cfg.eval_batch_size
        long = rec.score_candidates(samples, cands, bs)
        self.adapters.activate(SHORT)
        try:
            short = rec.score_candidates(samples, cands, bs)
        finally:
            self.adapters.activate("default")
        return long, short

    def merged_params(self, rec, w: float) -> dict[str, torch.Tensor]:
        """The default adapter's names with w·long + (1 − w)·short tensors (A and B merged separately)."""
        short = self.adapters.snapshot(SHORT)
        return {n: w * p.detach() + (1 - w) * short[n.replace(".default.", f".{SHORT}.")]
                for n, p in lora_ops.lora_parameters(rec.model, "default").items() if "lora_" in n}

    def _merged_scores(self, rec, samples, cands, w, batch_size=None):
        bs = batch_size or self.cfg.eval_batch_size
        return rec.module.with_params(self.merged_params(rec, w), rec.module.score_candidates, samples, cands, bs)

    # ---- inference --------------------------------------------------------------------------------
    def score_candidates(self, rec, samples, candidates, batch_size):
        if not self.short_ready:
            return rec.score_candidates(samples, candidates, batch_size)
        w = self.weight
        if self.cfg.combine == "merge":
            return self._merged_scores(rec, samples, candidates, w, batch_size)
        if w == 1:
            return rec.score_candidates(samples, candidates, batch_size)
        self.adapters.activate(SHORT)
        try:
            short = rec.score_candidates(samples, candidates, batch_size)
        finally:
            self.adapters.activate("default")
        if w == 0:
            return short
        return w * rec.score_candidates(samples, candidates, batch_size) + (1 - w) * short

    def generate_rankings(self, rec, samples, candidates, gen_cfg, seed, batch_size):
        if not self.short_ready:
            return super().generate_rankings(rec, samples, candidates, gen_cfg, seed, batch_size)
        w = self.weight
        if self.cfg.combine == "merge":
            return rec.module.with_params(self.merged_params(rec, w), rec.module.generate_rankings, samples,
                                          candidates, gen_cfg, seed, batch_size)
        weights = {"default": w, SHORT: 1 - w}
        return rec.module.generate_rankings(
            samples, candidates, gen_cfg, seed, batch_size,
            generate=lambda ids, mask, n: rec.module.ensemble_generate(ids, mask, n, weights))

    def decode_hidden(self, rec):
        if not self.short_ready or (self.cfg.combine == "ensemble" and self.weight == 1):
            return super().decode_hidden(rec)
        last = lambda ids, mask: rec.module._decode(ids, mask).last_hidden_state
        if self.cfg.combine == "merge":
            params = self.merged_params(rec, self.weight)
            return lambda ids, mask: rec.module.with_params(params, last, ids, mask)
        if self.weight == 0:
            def short_only(ids, mask):
                self.adapters.activate(SHORT)
                try:
                    return last(ids, mask)
                finally:
                    self.adapters.activate("default")
            return short_only
        raise ValueError(f"method=lsat with method.combine=ensemble (w = {self.weight}) fuses two adapters' "
                         "predictions, not hidden states: the latent decoders (l2d_global, l2d_local, id_head) are not "
                         "defined for it; use method.combine=merge")

    def state_dict(self):
        return {"short_ready": self.short_ready, "weight": self.weight}

    def load_state_dict(self, state):
        self.short_ready = state.get("short_ready", False)
        self.weight = state.get("weight", 0.5 if self.short_ready else None)
