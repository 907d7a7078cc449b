"""LSAT (Shi et al., 2024, "Preliminary study on incremental learning for LLM-based recommender
systems"): a long-term LoRA that keeps learning from all data and a short-term LoRA trained on the
recent window only, combined at inference.

recsim's reading (their code is not public):
- stage 0: the long-term adapter ("default") is the initial model, shared with every method;
- each update: the long-term adapter continues for `long_epochs` epochs on all data up to the stage
  (at most `long_samples`, seeded), then a fresh short-term adapter ("short", re-initialised each
  update) trains on the new window with the usual update schedule;
- inference, `combine=ensemble` (default): the mean of the two adapters' candidate scores (average of
  their per-token log-likelihoods); `combine=merge`: one adapter whose A and B are the averages of the
  two adapters' A and B.
Both adapters are saved in peft's format at every stage.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from omegaconf import OmegaConf

from recsim.backbones import lora as lora_ops
from recsim.methods.base import ContinualMethod, register
from recsim.protocols.base import make_samples

SHORT = "short"


@register
class LSAT(ContinualMethod):
    name = "lsat"

    def setup(self, rec, protocol):
        super().setup(rec, protocol)
        if getattr(rec, "kind", None) != "llm":
            raise ValueError("method=lsat needs an LLM backbone (backbone.kind=llm)")
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.seed)
            rec.model.add_adapter(SHORT, copy.deepcopy(rec.model.peft_config["default"]))
        rec.model.set_adapter("default")
        self.short_initial = lora_ops.snapshot(rec.model, SHORT)
        self.short_ready = False

    def before_update(self, stage, rec, samples):
        if stage.index == 0:
            return super().before_update(stage, rec, samples)
        # long-term adapter: keeps learning from all data up to this stage
        long = make_samples(stage.sequences, stage.cumulative_targets, self.protocol.window)
        if self.cfg.long_samples and len(long) > self.cfg.long_samples:
            keep = np.random.default_rng([self.cfg.seed, stage.index]).choice(len(long), self.cfg.long_samples, replace=False)
            long = [long[i] for i in sorted(keep)]
        rec.model.set_adapter("default")
        self.extra_trainable = rec.set_trainable(adapter="default")
        optim = OmegaConf.merge(rec.schedule(stage.index)[0], {"epochs": self.cfg.long_epochs})
        self.train_fn(long, optim, "long_term")
        # short-term adapter: fresh, trained on the new window by the runner's fit
        lora_ops.load_snapshot(rec.model, self.short_initial)
        rec.model.set_adapter(SHORT)
        rec.set_trainable(adapter=SHORT)
        self.report.update({"long_term_samples": len(long)})

    def after_update(self, stage, rec):
        super().after_update(stage, rec)
        rec.model.set_adapter("default")
        self.short_ready = self.short_ready or stage.index > 0

    def score_candidates(self, rec, samples, candidates, batch_size):
        long = rec.score_candidates(samples, candidates, batch_size)
        if not self.short_ready:
            return long
        if self.cfg.combine == "merge":
            params = {n: (p.detach() + dict(rec.model.named_parameters())[n.replace(".default.", f".{SHORT}.")].detach()) / 2
                      for n, p in lora_ops.lora_parameters(rec.model, "default").items()}
            return rec.module.with_params(params, rec.module.score_candidates, samples, candidates, batch_size)
        rec.model.set_adapter(SHORT)
        try:
            short = rec.score_candidates(samples, candidates, batch_size)
        finally:
            rec.model.set_adapter("default")
        return (long + short) / 2

    def state_dict(self):
        return {"short_ready": self.short_ready}

    def load_state_dict(self, state):
        self.short_ready = state.get("short_ready", False)
