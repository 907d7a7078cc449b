"""Every method of the PESO family, five stages of generative recommendation through `python -m recsim.run` on
synthetic data with tiny_llama: beam-decoded rows at every stage, R[i, j] filled, storage reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
FAMILY = ["single_lora", "peso", "prox_l2", "prox_output_kl", "prox_orthogonal", "sumlora", "sdlora", "inflora"]
FIVE_STAGES = ["stage=stages", "stage.first_share=0.5", "stage.window_shares=[0.1,0.1,0.1,0.1,0.1]"]
TINY = ["backbone=tiny_llama", "debug=smoke", "dataset.simulator.num_users=40", "recipe=generative",
        "eval.decoders=[beam]", "eval.n_boot=20", "eval.validation=false", "trainer.progress_bar=false",
        "recipe.beam.beam_size=4", "recipe.beam.top_k=10", *FIVE_STAGES]


@pytest.mark.parametrize("method", FAMILY)
def test_family_runs_five_generative_stages(tmp_path, method):
    out = tmp_path / method
    cmd = [sys.executable, "-m", "recsim.run", *TINY, f"method={method}", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(out / "results.csv")
    beam = df[(df.eval_mode == "beam") & (df.group == "all") & (df.metric == "NDCG@10")]
    assert sorted(beam.stage.unique()) == [0, 1, 2, 3, 4]
    r = json.loads((out / "r_matrix.json").read_text())["beam"]["R"]
    assert len(r) == 5 and all(v == v for v in r[4])  # the last model scored on every stage's split
    invalid = df[(df.eval_mode == "beam") & (df.metric == "invalid_share")]
    assert (invalid.value == 0).all()
    changed = df[df.metric == "changed_params"].set_index("stage").value
    assert (changed[[1, 2, 3, 4]] > 0).all()  # every update moved something (the new adapter, for the cumulative)
    if method in ("sumlora", "sdlora", "inflora"):
        storage = df[df.metric == "adapter_bytes"].set_index("stage").value
        assert storage[4] > storage[1]  # one adapter more per stage
