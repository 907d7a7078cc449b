"""What every benchmark reports: the config essentials beside its figures, as a small table and one JSON file."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf


def device_name(cfg: DictConfig) -> str:
    """The device the benchmark runs on, as its vendor names it (CPU: the processor and its core count)."""
    from recsim.training import uses_gpu  # here: recsim.training loads Lightning, which ranking alone never needs

    if uses_gpu(cfg.trainer.accelerator):
        return torch.cuda.get_device_name(torch.cuda.current_device())
    import os

    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores visible)"


def essentials(cfg: DictConfig, overrides: list[str]) -> dict:
    """The settings a figure depends on: model, data, device, versions, numerics, batch, compile."""
    import transformers

    from recsim.training import DEFAULTS as TRAINER_DEFAULTS, default_precision

    t = {**TRAINER_DEFAULTS, **{k: v for k, v in cfg.trainer.items() if k in TRAINER_DEFAULTS}}
    return {
        "backbone": cfg.backbone.name, "backbone_kind": cfg.backbone.kind, "dataset": cfg.dataset.name,
        "stage": cfg.stage.name, "device": device_name(cfg), "torch": torch.__version__,
        "transformers": transformers.__version__,
        "precision": t["precision"] or default_precision(t["accelerator"]),  # the Trainer's (train benchmark)
        "batch_size": int(cfg.backbone.batch_size if cfg.backbone.kind in ("sequential", "graph")
                          else cfg.trainer.batch_size),
        "eval_batch_size": int(cfg.eval.batch_size), "accumulate_grad_batches": int(t["accumulate_grad_batches"]),
        "devices": OmegaConf.to_container(cfg.trainer, resolve=True).get("devices", 1),
        "compile": bool(t["compile"]), "deterministic": bool(t["deterministic"]),
        "scoring_kernel": OmegaConf.select(cfg, "recipe.scoring.kernel"),  # LLM scoring: packed / kv_repeat (if set)
        "scoring_autocast": OmegaConf.select(cfg, "recipe.scoring.autocast"),  # auto: bf16 on a GPU (if set)
        "compile_mode": t["compile_mode"], "pad_to_multiple_of": OmegaConf.select(cfg, "trainer.pad_to_multiple_of"),
        "overrides": list(overrides),
    }


def weights_dtype(module) -> str:
    """The dtype the model's weights are held in (what scoring runs in; the Trainer may autocast training)."""
    return str(next(module.parameters()).dtype).removeprefix("torch.")


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    """Two aligned columns under a title."""
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    print("-" * max(len(title), width + 14))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def write_json(what: str, out: str | None, record: dict) -> Path:
    """`out`, or outputs/bench/<what>-<timestamp>.json (relative to the working directory, as runs are)."""
    path = Path(out) if out else Path("outputs") / "bench" / f"{what}-{time.strftime('%Y-%m-%d_%H-%M-%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def fmt(value, unit: str = "", digits: int = 4) -> str:
    """A figure for the table: None as n/a, floats to `digits` significant digits."""
    if value is None:
        return "n/a"
    text = f"{value:.{digits}g}" if isinstance(value, float) else str(value)
    return f"{text} {unit}".rstrip()
