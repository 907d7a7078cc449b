"""End to end through `python -m recsim.run`: every spine method, a real-data slice, determinism,
resume after an interruption, and a seed sweep merged by `python -m recsim.tables`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
TINY = ["backbone=tiny_llama", "debug=smoke", "dataset.simulator.num_users=60"]
TIMING = ["update_seconds", "peak_mem_mb"]


def run(args, out: Path | None = None, multirun=False):
    cmd = [sys.executable, "-m", "recsim.run"] + (["-m"] if multirun else []) + args
    cmd.append(f"hydra.sweep.dir={out}" if multirun else f"hydra.run.dir={out}")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def quality(out: Path) -> pd.DataFrame:
    df = pd.read_csv(out / "results.csv")
    df = df.drop(columns=[c for c in df.columns if c.startswith("cfg.")])  # the command lines differ
    return df[~df.metric.isin(TIMING)].reset_index(drop=True)


@pytest.mark.parametrize("method", ["base", "retrain", "finetune"])
def test_spine_methods_on_synthetic(tmp_path, method):
    out = tmp_path / method
    run(TINY + [f"method={method}"], out)
    assert (out / "DONE").is_file() and (out / "results.md").is_file() and (out / "r_matrix.json").is_file()
    df = pd.read_csv(out / "results.csv")
    assert set(df[df.eval_mode == "candidates"].group) == {"U_A", "U_I", "all"}
    assert {"dataset", "method", "backbone", "seed", "stage", "metric", "value", "ci_low", "ci_high"} <= set(df.columns)
    changed = df[(df.metric == "changed_params")].set_index("stage").value
    if method == "base":
        assert changed[1] == 0  # base never updates: stage 1 leaves the model as it was ...
        q = df[(df.eval_mode == "candidates") & (df.split == "round1")]
        s0, s1 = q[q.stage == 0].value.to_numpy(), q[q.stage == 1].value.to_numpy()
        assert (s0 == s1).all()  # ... so it scores exactly as after stage 0
    else:
        assert changed[1] > 0
    assert (out / "stages" / "01_update1" / "adapter" / "adapter_config.json").is_file()  # peft's own format


def test_sequential_backbone_on_stages_protocol(tmp_path):
    run(["backbone=sasrec", "debug=smoke", "stage=stages", "method=finetune"], tmp_path / "s")
    df = pd.read_csv(tmp_path / "s" / "results.csv")
    assert {"candidates", "full"} <= set(df.eval_mode)
    assert sorted(df[df.eval_mode == "full"].stage.unique()) == [0, 1, 2, 3]
    assert set(df[df.split == "R"].metric) >= {"backward_transfer(NDCG@10)", "forgetting(NDCG@10)"}


def test_real_data_slice(tmp_path, data_dir):
    out = tmp_path / "beauty"
    run(["backbone=tiny_llama", "debug=smoke", "dataset=beauty", "dataset.sample_users=40", "method=finetune"], out)
    df = pd.read_csv(out / "results.csv")
    assert (df.dataset == "beauty").all() and len(df[df.eval_mode == "candidates"]) > 0
    stats = json.loads((out / "dataset_stats.json").read_text())
    assert stats["sample"]["users"] == 40 and stats["full"]["users"] == 22332  # the sample, and the whole data
    # T comes from the whole dataset (the 40-user sample alone would give 2014-05-22)
    assert json.loads((out / "protocol.json").read_text())["cut_dates"] == ["2014-03-07"]


def test_same_seed_same_results_and_resume(tmp_path):
    args = TINY + ["method=finetune", "stage=stages", "reuse_base_stage=false"]  # both runs compute everything
    a, b = tmp_path / "a", tmp_path / "b"
    run(args, a)
    run(args, b)
    pd.testing.assert_frame_equal(quality(a), quality(b))
    # interrupt b after stage 1: drop later stages and the run-level outputs, then rerun the same command
    for stage in (b / "stages").iterdir():
        if int(stage.name[:2]) >= 2:
            shutil.rmtree(stage)
    for name in ("results.csv", "results.md", "DONE"):
        (b / name).unlink()
    proc = run(args, b)
    assert "already finished" in proc.stderr + proc.stdout
    pd.testing.assert_frame_equal(quality(a), quality(b))


def test_seed_sweep_and_tables(tmp_path):
    sweep = tmp_path / "sweep"
    run(["backbone=sasrec", "debug=smoke", "method=base,finetune", "seed=1,2"], sweep, multirun=True)
    runs = [p for p in sweep.iterdir() if (p / "DONE").exists()]
    assert len(runs) == 4
    proc = subprocess.run([sys.executable, "-m", "recsim.tables", str(sweep)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = pd.read_csv(sweep / "summary.csv")
    row = summary[(summary.method == "finetune") & (summary.metric == "HR@1") & (summary.group == "all")
                  & (summary.eval_mode == "candidates") & (summary.stage == 1) & (summary.split == "round1")]
    assert len(row) == 1 and row.n_seeds.iloc[0] == 2
    per_seed = [pd.read_csv(p / "results.csv") for p in runs if "finetune" in p.name]
    values = [d[(d.metric == "HR@1") & (d.group == "all") & (d.eval_mode == "candidates") & (d.stage == 1)
                & (d.split == "round1")].value.iloc[0]
              for d in per_seed]
    assert row["mean"].iloc[0] == pytest.approx(sum(values) / 2)


def test_base_stage_trained_once_and_shared(tmp_path):
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    first = run(TINY + ["method=base", cache], tmp_path / "base")
    assert "reusing" not in first.stderr + first.stdout
    second = run(TINY + ["method=finetune", cache], tmp_path / "ft")
    assert "reusing" in second.stderr + second.stdout
    fresh = tmp_path / "fresh"
    run(TINY + ["method=finetune", "reuse_base_stage=false", cache], fresh)
    pd.testing.assert_frame_equal(quality(tmp_path / "ft"), quality(fresh))  # reuse changes nothing
    assert (quality(tmp_path / "ft").method == "finetune").all()


def test_base_stage_of_another_recsim_version_reused_only_when_asked(tmp_path):
    """A cached stage 0 whose key.json differs only in the recsim sources (another code version) is reused with
    reuse_base_stage_across_versions=true, and says so; without it, stage 0 is trained again."""
    cache_dir = tmp_path / "cache"
    cache = f"paths.cache_dir={cache_dir}"
    run(TINY + ["method=base", cache], tmp_path / "base")
    (folder,) = [p for p in (cache_dir / "base_stage").iterdir() if p.is_dir()]
    key = json.loads((folder / "key.json").read_text())
    assert key["seed"] == 1 and key["recsim_sources"]
    key["recsim_sources"] = "an older version"
    (folder / "key.json").write_text(json.dumps(key))
    folder.rename(folder.with_name("0ld0ld0ld0ld0ld0"))  # its exact key is no longer this version's
    again = run(TINY + ["method=finetune", cache], tmp_path / "again")
    assert "reusing" not in again.stderr + again.stdout
    shutil.rmtree(next(p for p in (cache_dir / "base_stage").iterdir() if p.name != "0ld0ld0ld0ld0ld0"))
    reused = run(TINY + ["method=finetune", "reuse_base_stage_across_versions=true", cache], tmp_path / "reused")
    assert "trained by recsim sources an older version" in reused.stderr + reused.stdout
    record = json.loads((tmp_path / "reused" / "stages" / "00_base" / "reused_from.json").read_text())
    assert record == {"folder": "0ld0ld0ld0ld0ld0", "recsim_sources": "an older version"}
    columns = pd.read_csv(tmp_path / "reused" / "results.csv").columns
    assert not [c for c in columns if "reuse_base_stage" in c]  # changes nothing learned: no cfg column
    stage0 = lambda out: quality(out).query("stage == 0").drop(columns=["method"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(stage0(tmp_path / "reused"), stage0(tmp_path / "base"))


def test_wandb_logger_offline_without_a_key(tmp_path, monkeypatch):
    """logger=wandb with no API key runs offline, never blocks, and keeps its files in the run dir."""
    out = tmp_path / "wb"
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env.update({"HOME": str(tmp_path), "WANDB_DIR": str(out), "WANDB_SILENT": "true"})
    cmd = [sys.executable, "-m", "recsim.run", "backbone=sasrec", "debug=smoke", "logger=wandb", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "DONE").is_file()
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run under the run dir"
