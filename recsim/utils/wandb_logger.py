"""W&B, imported only when `logger=wandb`: one run per job, grouped by sweep, offline without a key.

A run must never block or fail for lack of network: without an API key the mode is offline and files
stay under the run dir (`wandb sync` later).
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(cfg, out: Path):
    from lightning.pytorch.loggers import WandbLogger

    mode = cfg.logger.get("mode") or os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")
    group = out.parent.name if out.parent.name != "runs" else None  # a sweep's jobs share their folder
    return WandbLogger(project=cfg.logger.project, entity=cfg.logger.get("entity"), save_dir=str(out), mode=mode,
                       group=group, name=out.name, id=None, log_model=False, reinit="finish_previous")


def finish() -> None:
    import wandb

    if wandb.run is not None:
        wandb.finish()
