"""recipe=generative end to end through `python -m recsim.run`: the catalogue decoders' rows, load_stage reproducing
a finished stage's ranks, and semantic IDs from a released index on a real-format run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
TINY = ["backbone=tiny_llama", "debug=smoke", "dataset.simulator.num_users=40", "recipe=generative",
        "eval.n_boot=20", "trainer.progress_bar=false"]


def run(args, out: Path):
    cmd = [sys.executable, "-m", "recsim.run", *args, f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def generative_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    run(TINY + ["eval.decoders=[beam,candidates,grounding]", "eval.validation=false"], out)
    return out


def test_generative_run_reports_every_decoder(generative_run):
    df = pd.read_csv(generative_run / "results.csv")
    assert {"beam", "candidates", "grounding"} <= set(df.eval_mode)
    beam = df[df.eval_mode == "beam"]
    assert set(beam.candidates) == {"all"}  # the whole catalogue, not 1 + negatives
    assert set(df[df.eval_mode == "candidates"].candidates) == {"1+29"}
    shares = beam[beam.metric == "invalid_share"]
    assert len(shares) and (shares.value == 0).all()  # measured: a trie cannot emit a non-item
    assert {"HR@10", "NDCG@10"} <= set(beam.metric)


def test_load_stage_reproduces_the_stage_ranks(generative_run):
    """The public load_stage rebuilds the model of the last stage: beam-decoding its split again gives the ranks the
    run saved in ranks.npz, user for user."""
    from recsim.decoders import build_decoder
    from recsim.results import RANKS_FILE, load_ranks
    from recsim.runs import load_stage

    loaded = load_stage(generative_run, -1)
    saved = load_ranks(loaded.stage_dir / RANKS_FILE)
    split = loaded.protocol.splits[loaded.stage.eval_split]
    group = next(g for g, s in split.samples.items() if s)
    users, want = saved[("beam", split.name, group)]
    ranks, _ = build_decoder("beam", loaded.cfg).rank(loaded.method, loaded.rec, split.samples[group],
                                                      split.candidates[group])
    assert np.array_equal(users, [s.user for s in split.samples[group]])
    assert np.array_equal(ranks, want)


def test_load_stage_refuses_an_unfinished_stage(generative_run):
    from recsim.runs import load_stage

    with pytest.raises(ValueError, match="not finished"):
        load_stage(generative_run, 7)


def test_beam_cutoffs_above_top_k_are_refused(tmp_path):
    cmd = [sys.executable, "-m", "recsim.run", *TINY, "eval.decoders=[beam]", "recipe.beam.top_k=5",
           f"hydra.run.dir={tmp_path / 'bad'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "recipe.beam.top_k=5" in proc.stderr + proc.stdout
    assert not (tmp_path / "bad" / "results.csv").exists()
