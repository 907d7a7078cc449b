"""The paper's reference model (arXiv 2511.14763): a student distilled from the target in two phases, so that on
members it follows the hard labels (which the target memorised) and on non-members the target's soft labels.

    phase 1, known non-members:  L = (1 − α) · L_hard + α · L_soft
    phase 2, known members:      L = α · L_hard + (1 − α) · L_soft
    L_hard = CE(p_ref, answer tokens)                  the target item's tokens, teacher-forced
    L_soft = T² · KL(p_target^T ‖ p_ref^T)             the target's next-token distribution at the same
                                                       positions, both at temperature T
both means over the answer tokens of the batch, `epochs` epochs each (the paper: 5).

Choices (the paper's text leaves them open; all in `audit.reference.*`):
- The student: the run's own base backbone with a fresh LoRA (the run's `backbone.lora`, seeded by the audit
  seed), the same size as the target, since recsim's targets are LoRA adapters on that base; with semantic-ID
  item tokens their embedding rows start untrained too. Trained through `recsim.training.build_trainer` like
  every fit (AdamW, constant lr = `lr`, default the run's stage-0 lr; batch = the run's trainer.batch_size),
  seeded as the runner seeds a stage (`seed_everything`), so an audit is repeatable on CPU.
- The data: the attacker's known members and known non-members (`audit.known_member_share`), the only labelled
  data an attacker has. Each phase is a fresh Trainer (a fresh optimiser); `max_steps` caps each phase.
- α = 0.7 by default (α > ½: each phase leans on the label the paper says it should): a recsim choice; the
  digest gives no value. T = 1.
- The target's distribution comes through the method's hidden-state hook (recsim.audit.features.answer_states),
  dropout off, no grad; the target never trains.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from recsim.audit.features import answer_states, head_logits


def fresh_recommender(cfg, data, seed: int):
    """The run's base backbone with an untrained LoRA: what the reference and the shadow model start from."""
    from recsim.models.recommender import LLMRecommender
    from recsim.runner import compute_device

    rec = LLMRecommender(cfg, data, cfg.paths.cache_dir, seed)
    rec.module.to(compute_device(cfg))
    return rec


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      hard_weight: float, soft_weight: float, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """{"loss", "hard", "soft"}: hard_weight · CE(student, targets) + soft_weight · T² KL(teacher^T ‖ student^T),
    token means over the M rows of [M, V] logits."""
    hard = F.cross_entropy(student_logits, targets)
    student_lp = F.log_softmax(student_logits / temperature, -1)
    teacher_lp = F.log_softmax(teacher_logits / temperature, -1)
    soft = F.kl_div(student_lp, teacher_lp, log_target=True, reduction="none").sum(-1).mean() * temperature ** 2
    return {"loss": hard_weight * hard + soft_weight * soft, "hard": hard, "soft": soft}


def phase_weights(alpha: float, members: bool) -> tuple[float, float]:
    """(hard, soft) weights of a phase: members α·hard + (1 − α)·soft, non-members (1 − α)·hard + α·soft."""
    return (alpha, 1 - alpha) if members else (1 - alpha, alpha)


class ReferenceDistillation(L.LightningModule):
    """One phase of the distillation: the student trains, the target (held outside the module, so the
    Trainer never moves it, never switches its dropout on and never optimises it) gives the soft labels."""

    def __init__(self, student, target, target_method, hard_weight: float, soft_weight: float, temperature: float,
                 lr: float):
        super().__init__()
        self.student = student.module  # the LLMRanker: its LoRA is what trains
        self.student_rec = student
        self._target = (target, target_method)  # a tuple: not registered as a child module
        self.hard_weight, self.soft_weight, self.temperature, self.lr = hard_weight, soft_weight, temperature, lr

    def training_step(self, batch, batch_idx):
        out = self.student.answer_logits(batch)
        target, method = self._target
        with torch.no_grad():
            target.module.eval()
            states, _, _ = answer_states(target, method, batch)
            teacher = head_logits(target, states)
        terms = distillation_loss(out["logits"], teacher, out["targets"], self.hard_weight, self.soft_weight,
                                  self.temperature)
        self.log_dict({f"reference/{k}": v.detach() for k, v in terms.items()}, batch_size=batch["input_ids"].shape[0])
        return terms["loss"]

    def compile_targets(self):
        return self.student.compile_targets()  # trainer.compile: the student's decoder blocks, as for any LLM fit

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.student.parameters() if p.requires_grad], lr=self.lr,
                                 weight_decay=0.0)


def distill_reference(cfg, data, target, target_method, known_members, known_nonmembers, settings, seed: int,
                      log_dir) -> tuple[object, dict]:
    """The reference model after both phases, and what each phase did (steps, last losses)."""
    from lightning.pytorch.loggers import CSVLogger

    from recsim.runner import compute_device, training_loader
    from recsim.training import build_trainer

    reference = fresh_recommender(cfg, data, seed)
    reference.set_trainable()
    lr = float(settings.lr if settings.lr is not None else cfg.trainer.base.lr)
    batch_size = int(cfg.trainer.batch_size)
    report = {}
    for phase, (name, samples, members) in enumerate((("nonmembers", known_nonmembers, False),
                                                     ("members", known_members, True)), start=1):
        hard, soft = phase_weights(float(settings.alpha), members)
        module = ReferenceDistillation(reference, target, target_method, hard, soft, float(settings.temperature), lr)
        L.seed_everything(seed * 10 + phase, workers=True)  # the fit's dropout draws, as the runner seeds a stage
        trainer = build_trainer(OmegaConf.to_container(cfg.trainer, resolve=True), max_epochs=int(settings.epochs),
                                max_steps=settings.max_steps,
                                loggers=[CSVLogger(str(log_dir), name="logs", version=f"reference_phase{phase}")])
        trainer.fit(module, training_loader(cfg, reference, samples, batch_size, seed * 10 + phase))
        reference.module.to(compute_device(cfg))  # Lightning's teardown moved it back to the CPU
        logged = {k.split("/")[-1]: float(v) for k, v in trainer.logged_metrics.items()}
        report[f"phase{phase}_{name}"] = {"samples": len(samples), "hard_weight": hard, "soft_weight": soft,
                                          "steps": int(trainer.global_step), **{f"last_{k}": v for k, v in logged.items()}}
    return reference, report
