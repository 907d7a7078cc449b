"""The continual-update method interface, and the three plain methods of the spine.

The runner calls, for every stage: ``training_samples`` (which data the update sees: a method may
filter it), ``before_update`` (which parameters train, which loss terms join the loss, adapters to
add or reset), the fit itself (a fresh Lightning Trainer), then ``after_update``. Stage 0 trains the
initial model and is the same for every method that keeps ``shares_base_stage``.
"""

from __future__ import annotations

from recsim.protocols.base import Protocol, Sample, StageData, make_samples


class ContinualMethod:
    name = "method"
    shares_base_stage = True  # stage 0 (the initial model) does not depend on the method

    def __init__(self, cfg):
        self.cfg = cfg
        self.protocol: Protocol | None = None
        self.train_fn = None  # set by the runner: train_fn(samples, optim_cfg, tag) fits whatever is trainable
        self.extra_trainable = 0  # parameters trained by extra fits inside before_update (reported)
        self.report: dict = {}  # what the method decided at the last update (layers, removed items...)

    def setup(self, rec, protocol: Protocol) -> None:
        self.protocol = protocol

    def training_samples(self, stage: StageData, rec) -> list[Sample] | None:
        """Samples the update trains on; None means no update at this stage."""
        targets = stage.cumulative_targets if stage.index == 0 else stage.new_targets
        return make_samples(stage.sequences, targets, self.protocol.window)

    def before_update(self, stage: StageData, rec, samples: list[Sample]) -> None:
        rec.set_trainable()  # default: every adapter parameter (all parameters of a classic model)

    def after_update(self, stage: StageData, rec) -> None:
        rec.clear_loss_terms()

    def schedule_index(self, stage: StageData) -> int:
        """Whose optimiser schedule the stage's fit uses: 0 = stage 0's (trainer.base), else an update's."""
        return stage.index

    def update_optim(self, optim, stage: StageData):
        """The optimiser settings of the stage's fit, from the schedule `schedule_index` picked (a method may
        change them, e.g. PESO's later-stage learning rate as a multiple of stage 0's)."""
        return optim

    def score_candidates(self, rec, samples, candidates, batch_size: int):
        """Inference hook: a method that combines adapters (LSAT) changes how candidates are scored."""
        return rec.score_candidates(samples, candidates, batch_size)

    def generate_rankings(self, rec, samples, candidates, gen_cfg, seed: int, batch_size: int):
        """Inference hook of generation mode (ranked title lists); every inference path goes through the method."""
        return rec.module.generate_rankings(samples, candidates, gen_cfg, seed, batch_size)

    def decode_step(self, rec):
        """Inference hook of the generating decoders (beam search): `step(ids, mask, positions, cache) ->
        (next-token log-probs [N, V], cache)` with the model as the method infers (every active adapter)."""
        return rec.module._step

    def decode_hidden(self, rec):
        """Inference hook of the latent decoders (L2D, the ID head): `hidden(ids, mask) -> last-layer states
        [N, T, H]` (final norm applied; left-padded prompts) with the model as the method infers (every active
        adapter)."""
        return lambda ids, mask: rec.module._decode(ids, mask).last_hidden_state

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores what `state_dict` saved. Called on resume *before* the stage's adapters are loaded into the
        model, so a method that adds adapters (SumLoRA, InfLoRA) re-creates them here and the load fills them."""


class Base(ContinualMethod):
    """Train once on stage 0, never update."""

    name = "base"

    def training_samples(self, stage, rec):
        return super().training_samples(stage, rec) if stage.index == 0 else None


class Retrain(ContinualMethod):
    """At every stage, train from the initial (untrained-adapter) model on all data up to the stage, with
    stage 0's schedule: a retrained model is a stage-0 model on more data, not an update."""

    name = "retrain"

    def schedule_index(self, stage):
        return 0

    def training_samples(self, stage, rec):
        return make_samples(stage.sequences, stage.cumulative_targets, self.protocol.window)

    def before_update(self, stage, rec, samples):
        if stage.index > 0:
            rec.reset_to_initial()
        super().before_update(stage, rec, samples)


class Finetune(ContinualMethod):
    """Continue training the current model on the new stage's data only."""

    name = "finetune"


METHODS = {cls.name: cls for cls in (Base, Retrain, Finetune)}


def register(cls):
    METHODS[cls.name] = cls
    return cls


def build_method(cfg) -> ContinualMethod:
    if cfg.name not in METHODS:
        raise ValueError(f"method.name={cfg.name!r} is not one of {sorted(METHODS)}")
    return METHODS[cfg.name](cfg)
