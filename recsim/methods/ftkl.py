"""FT-KL: fine-tuning on the new data plus λ·KL(p_frozen ‖ p_current) on the same new-data batches,
the frozen model being the one before the update (the distribution is the one of recsim.methods.kl)."""

from __future__ import annotations

from recsim.backbones.lora import snapshot
from recsim.methods.base import ContinualMethod, register
from recsim.methods.kl import AnchorKL


@register
class FTKL(ContinualMethod):
    name = "ftkl"

    def before_update(self, stage, rec, samples):
        super().before_update(stage, rec, samples)
        if stage.index > 0 and self.cfg.lam > 0:
            rec.add_loss_term(AnchorKL(snapshot(rec.model), self.cfg.lam, samples=None, name="ft_kl"))
