"""Every experiment config composes, and runs end to end with the tiny backbone (a broken experiment
file is a failing test, as in lightning-hydra-template)."""

from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, compose
from test_run_e2e import run

EXPERIMENTS = sorted(p.stem for p in (REPO / "recsim" / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    cfg = compose([f"experiment={name}"])
    assert cfg.method.name and cfg.stage.name and cfg.dataset.name


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_with_tiny_backbone(tmp_path, name):
    out = tmp_path / name
    run([f"experiment={name}", "backbone=tiny_llama", "debug=smoke", "dataset.simulator.num_users=50",
         "method.filters.sasrec.epochs=2" if "evorec" in name else "seed=1"], out)
    df = pd.read_csv(out / "results.csv")
    cfg = compose([f"experiment={name}"])
    stages = len(cfg.stage.t_quantiles) + 1 if cfg.stage.name == "two_period" else len(cfg.stage.window_shares)
    assert sorted(df[df.eval_mode == "candidates"].stage.unique()) == list(range(stages))
    if "generation" in cfg.eval.decoders:
        assert "invalid_share" in set(df.metric)
