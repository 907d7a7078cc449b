"""`train`: throughput, MFU and peak memory of recsim's training path.

The fit is `recsim.runner.train` itself (the rec's collate in a shuffled DataLoader, a Trainer from
`recsim.training.build_trainer(cfg.trainer, ...)`, the LightningModule's `training_step`), so every
trainer option a run reads (compile, precision, accumulate_grad_batches, batch_size, devices,
deterministic, gradient_clip_val) applies unchanged. It trains on stage 0's samples of the composed
protocol as the `base` method picks them, a seeded subsample of as many as `bench.warmup + bench.steps`
optimiser steps consume (repeated over epochs when the stage has fewer).

Timing is a Lightning Callback inside ONE fit rather than the difference of two fits: two fits would
each pay the Trainer's setup, the optimiser's creation and (with `trainer.compile`) a compile, and their
difference would carry the noise of both; the callback starts the clock at the end of the last warm-up
step (compilation, allocator growth and first-batch overheads stay in the warm-up) and stops it at the end
of the last measured step, both after a `torch.cuda.synchronize`. Everything between those two points
counts, the DataLoader's collate and the per-step logging included, as a run pays them.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning
import numpy as np
import torch
from omegaconf import OmegaConf

from recsim.bench.flops import lora_step_flops, model_dims
from recsim.bench.report import fmt, weights_dtype
from recsim.bench.settings import DEFAULTS
from recsim.bench.timing import synchronize
from recsim.training import uses_gpu

COUNTS = ("samples", "real_tokens", "padded_tokens", "answer_tokens", "flops")


def batch_stats(batch: dict) -> dict:
    """Sizes of one collated batch: samples, real (non-pad) and padded tokens, answer tokens, real lengths.

    LLM batches: tokens of prompt + answer (attention_mask), answer tokens = positions with a label.
    Sequential batches: history items; padded = batch × the collated width (the module's length buckets
    then skip most of that padding, so padded tokens/s there is what was collated, not what was computed)."""
    if "attention_mask" in batch:
        mask = batch["attention_mask"]
        answer = int((batch["labels"][:, 1:] != -100).sum())
    else:
        mask, answer = batch["history"] != 0, 0
    lengths = mask.sum(dim=1).tolist()
    return {"samples": len(lengths), "real_tokens": int(sum(lengths)), "padded_tokens": int(mask.numel()),
            "answer_tokens": answer, "lengths": lengths}


class StepTimer(lightning.Callback):
    """Times optimiser steps `warmup + 1 .. warmup + steps` of a fit and sums what they processed.

    A step ends at the `on_train_batch_end` whose batch advanced `trainer.global_step` (with gradient
    accumulation, the last micro-batch of the step). `ends[s]` is the synchronised clock at the end of step
    s; `ends[0]` the start of the first batch, so `bench.warmup=0` times from there. The micro-batches of a
    step are counted after its clock is read: counting reads device tensors, which would synchronise
    mid-step. Counts are summed over every rank at the end of the fit (one all-reduce)."""

    def __init__(self, warmup: int, steps: int, dims=None):
        self.warmup, self.steps, self.dims = warmup, steps, dims
        self.ends: dict[int, float] = {}
        self.totals = dict.fromkeys(COUNTS, 0)
        self.world_size, self.is_global_zero = 1, True
        self._pending: list[dict] = []
        self._last_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.world_size, self.is_global_zero = trainer.world_size, trainer.is_global_zero

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.ends:
            synchronize(pl_module.device)
            self.ends[0] = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._pending.append(batch)
        step = trainer.global_step
        if step == self._last_step:  # accumulating: the optimiser has not stepped yet
            return
        synchronize(pl_module.device)
        self.ends[step] = time.perf_counter()
        self._last_step = step
        if self.warmup < step <= self.warmup + self.steps:
            stats = [batch_stats(b) for b in self._pending]
            for key in COUNTS[:-1]:
                self.totals[key] += sum(s[key] for s in stats)
            if self.dims is not None:
                d = self.dims
                self.totals["flops"] += lora_step_flops(
                    d.n_linear, [n for s in stats for n in s["lengths"]], sum(s["answer_tokens"] for s in stats),
                    layers=d.layers, d_attn=d.d_attn, vocab=d.vocab, hidden=d.hidden)
        self._pending = []

    def on_train_end(self, trainer, pl_module) -> None:
        summed = trainer.strategy.reduce(torch.tensor([self.totals[k] for k in COUNTS], dtype=torch.int64,
                                                      device=pl_module.device), reduce_op="sum")
        self.totals = dict(zip(COUNTS, (int(v) for v in summed.tolist())))

    def step_seconds(self) -> list[float]:
        last = self.warmup + self.steps
        if last not in self.ends:
            raise RuntimeError(f"the fit stopped after {max(self.ends)} of {last} optimiser steps")
        return [self.ends[s] - self.ends[s - 1] for s in range(self.warmup + 1, last + 1)]


def training_samples(cfg, rec, protocol, needed: int) -> tuple[list, int]:
    """(stage 0's samples as the base method trains on them, capped to `needed` by a seeded subsample;
    how many the stage holds). `trainer.max_train_samples` caps them first, as in a run."""
    from recsim.methods.base import Base

    method = Base(cfg.method)  # the base method's stage-0 samples, whichever method the config names
    method.setup(rec, protocol)
    stage = protocol.stages[0]
    samples = method.training_samples(stage, rec) or []
    if not samples:
        raise SystemExit(f"recsim.bench: stage 0 of {cfg.stage.name} on {cfg.dataset.name} has no training samples")
    available = len(samples)
    cap = min(needed, cfg.trainer.get("max_train_samples") or needed)
    if len(samples) > cap:  # seeded and spread over the stage, so prompt lengths are representative
        keep = np.random.default_rng(cfg.seed).choice(len(samples), cap, replace=False)
        samples = [samples[i] for i in sorted(keep)]
    method.before_update(stage, rec, samples)  # which parameters train: every adapter weight, as in stage 0
    return samples, available


def expected_world_size(trainer_cfg) -> int:
    """Processes the fit will run on, from the config (the Trainer knows for sure only once it runs; this
    only sizes the sample pool, so "auto" devices count every visible GPU)."""
    devices = trainer_cfg.get("devices", 1)
    if devices == "auto":
        devices = torch.cuda.device_count() if uses_gpu(trainer_cfg.accelerator) else 1
    count = len(devices) if not isinstance(devices, int) else devices
    return max(1, count) * int(trainer_cfg.get("num_nodes") or 1)


def run(cfg, bench: dict) -> dict | None:
    """Fit `bench.warmup + bench.steps` optimiser steps; the figures of the timed ones (None on ranks > 0)."""
    from recsim.protocols.prepare import prepare_protocol
    from recsim.runner import build_recommender, train
    from recsim.utils.resources import UpdateMeter

    lightning.seed_everything(cfg.seed, workers=True)
    prepared = prepare_protocol(cfg)
    rec = build_recommender(cfg, prepared.data)
    optim, batch_size = rec.schedule(0)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    timed_end = bench["warmup"] + bench["steps"]
    dims = model_dims(rec.module) if rec.kind == "llm" else None
    timer = StepTimer(bench["warmup"], bench["steps"], dims)
    callbacks = [timer]
    total_steps = timed_end
    if bench["profile"]:  # extra steps after the timed ones: the profiler's overhead never reaches the timing
        from recsim.bench.profile import StepProfiler

        total_steps += bench["profile_steps"]
        callbacks.append(StepProfiler(timed_end + 1, total_steps, bench["profile"]))
    needed = total_steps * batch_size * accumulate * expected_world_size(cfg.trainer)
    samples, available = training_samples(cfg, rec, prepared.protocol, needed)
    # every epoch holds at least one optimiser step, so max_epochs = total_steps never stops the fit early
    optim = OmegaConf.merge(optim, {"epochs": total_steps, "max_steps": total_steps})
    with UpdateMeter() as meter:
        train(cfg, rec, samples, optim, batch_size, cfg.seed, Path(cfg.paths.output_dir), "bench", callbacks=callbacks)
    if not timer.is_global_zero:
        return None
    steps = timer.step_seconds()
    seconds = sum(steps)
    t = timer.totals
    flops_per_s = t["flops"] / seconds if dims is not None else None
    peak = bench["peak_tflops"] * 1e12 * timer.world_size
    return {
        "steps": bench["steps"], "warmup": bench["warmup"], "seconds": seconds, "step_seconds": steps,
        "samples": t["samples"], "samples_per_s": t["samples"] / seconds,
        "real_tokens": t["real_tokens"], "real_tokens_per_s": t["real_tokens"] / seconds,
        "padded_tokens": t["padded_tokens"], "padded_tokens_per_s": t["padded_tokens"] / seconds,
        "answer_tokens": t["answer_tokens"], "effective_batch_size": batch_size * accumulate * timer.world_size,
        "world_size": timer.world_size, "train_samples_available": available, "train_samples_used": len(samples),
        "trainable_params": sum(p.numel() for p in rec.module.parameters() if p.requires_grad),
        "flops": t["flops"] if dims is not None else None,
        "flops_per_step": t["flops"] / bench["steps"] if dims is not None else None,
        "achieved_tflops": flops_per_s / 1e12 if flops_per_s is not None else None,
        "mfu": flops_per_s / peak if flops_per_s is not None else None,
        "peak_tflops": bench["peak_tflops"],
        "peak_is_gpu_default": not uses_gpu(cfg.trainer.accelerator) and bench["peak_tflops"] == DEFAULTS["peak_tflops"],
        "flop_model": "4*N_linear*T_real + 6*layers*d_attn*sum(n_i^2) + 4*V*H*M_answer (LoRA A/B not counted)"
                      if dims is not None else "none for classic models",
        "model_dims": vars(dims) if dims is not None else None,
        "weights_dtype": weights_dtype(rec.module), "peak_mem_mb": meter.peak_mb, "memory_kind": meter.memory_kind,
        "profile": callbacks[1].summary if bench["profile"] else None,
    }


def rows(f: dict) -> list[tuple[str, str]]:
    """The table: throughput first, then what it was measured on."""
    mfu_note = " (peak = the H200's bf16 rate, not this CPU's)" if f["peak_is_gpu_default"] else ""
    return [
        ("timed steps", f"{f['steps']} after {f['warmup']} warm-up, {fmt(f['seconds'], 's')}"),
        ("samples/s", fmt(f["samples_per_s"])),
        ("real tokens/s", fmt(f["real_tokens_per_s"])),
        ("padded tokens/s", fmt(f["padded_tokens_per_s"])),
        ("effective batch", str(f["effective_batch_size"])),
        ("achieved TFLOP/s", fmt(f["achieved_tflops"])),
        ("MFU", (fmt(f["mfu"]) + f" of {fmt(f['peak_tflops'])} TFLOP/s per device{mfu_note}")
                if f["mfu"] is not None else "n/a (no FLOP model for classic models)"),
        ("peak memory", f"{fmt(f['peak_mem_mb'], 'MiB')} ({f['memory_kind']})"),
    ]
