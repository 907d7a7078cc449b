"""W&B, imported only when `logger=wandb`: one run per job, grouped by sweep, offline without a key.

A run must never block or fail for lack of network: without an API key the mode is offline and files
stay under the run dir (`wandb sync` later). wandb is an optional extra (`pip install -e ".[wandb]"`):
nothing else in recsim imports it, and a missing install fails with a message that names the extra.
"""

from __future__ import annotations

import importlib
import netrc
import os
from pathlib import Path

INSTALL_HINT = 'pip install -e ".[wandb]"  (or: pip install "recsim[wandb]")'


def require_wandb():
    """The wandb module, or an ImportError that says which extra provides it."""
    try:
        return importlib.import_module("wandb")
    except ImportError as err:
        raise ImportError(f"logger=wandb needs the wandb package, an optional extra of recsim: {INSTALL_HINT}"
                          f" -- or run with logger=csv ({err})") from err


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(cfg, out: Path):
    require_wandb()  # before Lightning's own, less helpful, import error
    from lightning.pytorch.loggers import WandbLogger

    mode = cfg.logger.get("mode") or os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")
    group = out.parent.name if out.parent.name != "runs" else None  # a sweep's jobs share their folder
    return WandbLogger(project=cfg.logger.project, entity=cfg.logger.get("entity"), save_dir=str(out), mode=mode,
                       group=group, name=out.name, id=None, log_model=False, reinit="finish_previous")


def finish(results=None) -> None:
    """Put the final results in the run's summary (one key per stage/split/group/metric), then close it,
    so each job of a multirun is its own W&B run with the numbers of its results.csv."""
    wandb = require_wandb()

    if wandb.run is None:
        return
    if results is not None:
        rows = results.dropna(subset=["value"])
        wandb.run.summary.update({f"{r.eval_mode}/{r.stage_name}/{r.split}/{r.group}/{r.metric}": float(r.value)
                                  for r in rows.itertuples()})
    wandb.finish()
