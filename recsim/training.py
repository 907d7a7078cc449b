"""The one place a Lightning Trainer is built: every fit in recsim (stage training, extra fits of a
method, EvoRec's filter) reads its device and numerics settings from `cfg.trainer` through here.

Keys of `conf/trainer/default.yaml` read here, each with a default so a config written before it still
works: accelerator (auto), devices (1), strategy (auto), num_nodes (1), precision (null: bf16-mixed when
the fit runs on a GPU, 32-true on CPU), deterministic (true), gradient_clip_val (null), accumulate_grad_batches
(1), compile (false), progress_bar (false), log_every_n_steps (1; on a GPU, logging every step
syncs the host with the device at every step).

`compile: true` compiles, at the Trainer's setup, the sub-modules the LightningModule's training_step
actually runs: those its `compile_targets()` names (an LLM's decoder blocks: the ranker calls the decoder
and the head itself, never the peft model's forward, so compiling `model` as a whole compiled nothing that
ran), else its `model` (else the module itself). Each is compiled in place with `nn.Module.compile`, so
parameter names and saved state dicts stay as they are (torch.compile's wrapper would prefix them with
`_orig_mod.`). `compile_mode` is torch.compile's `mode` (null: its default; `reduce-overhead` adds CUDA
graphs, for small batches that are launch-bound). Off by default: each fresh Trainer recompiles, which
costs a minute for an LLM and gains nothing on the short CPU fits of tests.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning
import torch

DEFAULTS = {"accelerator": "auto", "devices": 1, "strategy": "auto", "num_nodes": 1, "precision": None,
            "deterministic": True, "gradient_clip_val": None, "accumulate_grad_batches": 1, "compile": False,
            "compile_mode": None,
            "progress_bar": False, "log_every_n_steps": 1}


def uses_gpu(accelerator: str) -> bool:
    """Whether a fit with this accelerator runs on a CUDA GPU (auto: when one is present)."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def default_precision(accelerator: str) -> str:
    # bf16 autocast halves activation memory on GPUs; on CPU it is slower than fp32 and less exact
    return "bf16-mixed" if uses_gpu(accelerator) else "32-true"


def compile_targets(pl_module) -> list[torch.nn.Module]:
    """The sub-modules `trainer.compile` compiles: `pl_module.compile_targets()`, else its `model`, else itself."""
    if hasattr(pl_module, "compile_targets"):
        return list(pl_module.compile_targets())
    net = getattr(pl_module, "model", None)
    return [net if isinstance(net, torch.nn.Module) else pl_module]


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that record CUDA graphs


class CompileModel(lightning.Callback):
    """Compile the module's networks in place once, when the Trainer sets it up (see the module doc).

    In the CUDA-graph modes shapes are kept static (no automatic dynamic shapes: a graph is recorded per shape,
    which `trainer.static_shapes` keeps to two a fit) with room for the 30 blocks x a few shapes in dynamo's
    cache, and each training step is marked as a new step of the graph tree (outputs of the previous step's
    graphs may then be overwritten)."""

    def __init__(self, mode: str | None = None):
        self.mode = mode

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.mode in CUDA_GRAPH_MODES:
            import torch._dynamo

            torch._dynamo.config.automatic_dynamic_shapes = False
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # read by passes inside the step that pick their own widths (EvoRec's L_c pool): under CUDA graphs each new
        # width is a recompile and a recording, so they keep one
        pl_module.cuda_graphs = self.mode in CUDA_GRAPH_MODES
        for net in compile_targets(pl_module):
            if getattr(net, "_compiled_call_impl", None) is None:  # a module fitted twice compiles once
                net.compile(**({"mode": self.mode} if self.mode else {}))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.mode in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()


def build_trainer(trainer_cfg: Mapping | None, *, max_epochs: int, max_steps: int | None = None, loggers=False,
                  callbacks: list | None = None, enable_validation: bool = False,
                  progress_bar: bool | None = None) -> lightning.Trainer:
    """A fresh Trainer from `trainer_cfg` (the `trainer` config node, a dict, or None for the defaults).

    `max_steps` None or <= 0: no step limit. `loggers`: False or a list of Lightning loggers.
    `enable_validation`: run the validation loop each epoch (for early stopping); off, it never runs.
    `progress_bar` None: `trainer_cfg.progress_bar`. Checkpointing is always off: recsim publishes its
    own stage folders, and a callback that needs the best weights keeps them itself.
    """
    t = {**DEFAULTS, **{k: v for k, v in (trainer_cfg or {}).items() if k in DEFAULTS}}
    callbacks = list(callbacks or [])
    if t["compile"]:
        callbacks.append(CompileModel(t["compile_mode"]))
    return lightning.Trainer(
        accelerator=t["accelerator"], devices=t["devices"], strategy=t["strategy"], num_nodes=t["num_nodes"],
        precision=t["precision"] or default_precision(t["accelerator"]), deterministic=t["deterministic"],
        gradient_clip_val=t["gradient_clip_val"], accumulate_grad_batches=t["accumulate_grad_batches"],
        max_epochs=int(max_epochs), max_steps=int(max_steps) if max_steps and max_steps > 0 else -1,
        logger=loggers, callbacks=callbacks, enable_checkpointing=False, num_sanity_val_steps=0,
        limit_val_batches=None if enable_validation else 0,
        enable_progress_bar=bool(t["progress_bar"] if progress_bar is None else progress_bar),
        enable_model_summary=False, log_every_n_steps=int(t["log_every_n_steps"]),
    )
