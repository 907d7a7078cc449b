"""Shared fixtures: where the staged data is, and Hydra composition of the real configs."""

from __future__ import annotations

import os
import recsim  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RECSIM_DATA", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("RECSIM_CACHE", str(REPO / ".cache" / "recsim"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["RECSIM_DATA"])
    if not (path / "amazon_beauty" / "interactions.csv.gz").is_file():
        pytest.skip(f"staged data not found under RECSIM_DATA={path}")
    return path


def compose(overrides: list[str], output_dir: Path | None = None):
    """The config `python -m recsim.run <overrides>` would see, with paths.output_dir set."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="recsim.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir) if output_dir else "unused"
    return cfg
