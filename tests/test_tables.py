"""recsim.tables on fake run directories: merge over seeds, t intervals, skipped runs, errors."""

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from recsim.tables import (
    CI_BOOTSTRAP,
    CI_SEEDS,
    T_975,
    NoResultsError,
    ResultsFileError,
    aggregate,
    collect,
    render_markdown,
)

REPO = Path(__file__).resolve().parents[1]


def write_run(run_dir: Path, seed: int, ndcg: float, method="lora", lam=0.1, done=True, drop=()):
    """A tiny results.csv: 2 stages x 2 groups x 2 metrics, plus 2 efficiency rows per stage."""
    rows = []
    for stage in (0, 1):
        for group in ("U_A", "U_I"):
            for metric, value in (("NDCG@3", ndcg + stage / 10), ("HR@1", ndcg / 2)):
                if group == "U_I":
                    value -= 0.1
                rows.append(
                    dict(stage=stage, stage_name=f"s{stage}", split=f"test_{stage}", group=group,
                         metric=metric, value=value, ci_low=value - 0.02, ci_high=value + 0.04,
                         n_users=50)
                )  # fmt: skip
        for metric, value in (("trainable_params", 4096), ("update_seconds", 10.0 + seed)):
            rows.append(
                dict(stage=stage, stage_name=f"s{stage}", split="-", group="-", metric=metric,
                     value=value, ci_low=float("nan"), ci_high=float("nan"), n_users=float("nan"))
            )  # fmt: skip
    df = pd.DataFrame(rows)
    fixed = dict(dataset="synth", method=method, backbone="tiny", recipe="tallrec", protocol="stages",
                 eval_mode="sampled", seed=seed)  # fmt: skip
    for col, value in fixed.items():
        df[col] = value
    df["cfg.method.lam"] = lam
    run_dir.mkdir(parents=True)
    df.drop(columns=list(drop)).to_csv(run_dir / "results.csv", index=False)
    if done:
        (run_dir / "DONE").write_text("")
    return run_dir


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun"
    write_run(root / "0", seed=1, ndcg=0.40)
    write_run(root / "1", seed=2, ndcg=0.50)
    write_run(root / "2", seed=3, ndcg=0.90, done=False)  # crashed: must not count
    write_run(root / "3", seed=1, ndcg=0.30, method="full")  # one seed only
    return root


def pick(agg, **where):
    mask = pd.Series(True, index=agg.index)
    for col, value in where.items():
        mask &= agg[col] == value
    assert mask.sum() == 1, where
    return agg[mask].iloc[0]


def test_t_table_matches_the_t_distribution():
    # integrate the t density over [-q, q] (Simpson's rule): it must hold 95% of the mass
    for df in (1, 2, 5, 30):
        q = T_975[df - 1]
        c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        n = 20000
        h = 2 * q / n
        f = [c * (1 + (-q + i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        mass = h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
        assert mass == pytest.approx(0.95, abs=1e-4)


def test_collect_and_aggregate(sweep, capsys):
    df = collect([sweep])
    assert "skipping" in capsys.readouterr().err  # run 2 has no DONE
    assert sorted(df["seed"].unique()) == [1, 2] and len(df["run_dir"].unique()) == 3

    agg = aggregate(df)
    row = pick(agg, method="lora", stage=1, group="U_A", metric="NDCG@3")
    # seeds: 0.40 + 0.1 = 0.50 and 0.50 + 0.1 = 0.60 -> mean 0.55
    # sd = sqrt(((0.05)^2 + (0.05)^2) / 1) = 0.0707107; half = t_{.975,1} * sd / sqrt(2)
    #    = 12.7062 * 0.05 = 0.63531 -> CI [0.55 - 0.63531, 0.55 + 0.63531]
    assert row["mean"] == pytest.approx(0.55)
    assert row["n_seeds"] == 2 and row["seeds"] == "1;2" and row["ci_method"] == CI_SEEDS
    assert row["ci_low"] == pytest.approx(0.55 - 0.63531, abs=1e-5)
    assert row["ci_high"] == pytest.approx(0.55 + 0.63531, abs=1e-5)

    # one seed: the run's own bootstrap CI (value 0.30 + 0.1 = 0.40, CI [0.38, 0.44]), marked
    single = pick(agg, method="full", stage=1, group="U_A", metric="NDCG@3")
    assert single["n_seeds"] == 1 and single["ci_method"] == CI_BOOTSTRAP
    assert (single["ci_low"], single["ci_high"]) == pytest.approx((0.38, 0.44))

    # efficiency: update_seconds 11 and 12 -> mean 11.5; identical params -> zero-width CI
    assert pick(agg, method="lora", stage=0, metric="update_seconds")["mean"] == pytest.approx(11.5)
    params = pick(agg, method="lora", stage=0, metric="trainable_params")
    assert params["ci_low"] == params["ci_high"] == 4096


def test_render_markdown(sweep):
    agg = aggregate(collect([sweep]))
    text = render_markdown(agg)  # last stage, all metrics
    assert "### synth · stages · sampled" in text
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert header.startswith("| method | backbone | seeds | U_A NDCG@3 | U_A HR@1 | U_I NDCG@3")
    assert header.rstrip(" |").endswith("trainable_params | update_seconds")
    lora = next(line for line in text.splitlines() if line.startswith("| lora"))
    assert "| 2 | 0.5500 ± 0.6353 |" in lora and "| 4,096 ± 0 | 11.50 ± 6.35 |" in lora
    full = next(line for line in text.splitlines() if line.startswith("| full"))
    assert "0.4000 ± 0.0300†" in full  # bootstrap CI [0.38, 0.44]: half-width 0.03, single seed

    only = render_markdown(agg, metrics=["HR@1", "NDCG@3"], stage="all")
    header = next(line for line in only.splitlines() if line.startswith("| method"))
    assert header == "| method | backbone | stage | stage_name | split | seeds | U_A HR@1 | U_A NDCG@3 | U_I HR@1 | U_I NDCG@3 |"
    assert len([line for line in only.splitlines() if line.startswith("| lora")]) == 2

    with pytest.raises(ValueError, match="not in the results"):
        render_markdown(agg, metrics=["NDCG@99"])


def test_varying_config_values_become_rows(tmp_path):
    for i, (seed, lam) in enumerate([(1, 0.1), (2, 0.1), (1, 0.5), (2, 0.5)]):
        write_run(tmp_path / str(i), seed=seed, ndcg=0.4 + lam, lam=lam)
    agg = aggregate(collect([tmp_path]))
    assert set(agg["n_seeds"]) == {2}  # the two lam values are never merged
    text = render_markdown(agg)
    assert "| method | backbone | cfg.method.lam | seeds |" in text
    assert "| lora | tiny | 0.1 | 2 |" in text and "| lora | tiny | 0.5 | 2 |" in text


def test_missing_column_error_names_file_and_columns(tmp_path):
    bad = write_run(tmp_path / "bad", seed=1, ndcg=0.4, drop=("n_users", "eval_mode"))
    with pytest.raises(ResultsFileError, match="eval_mode") as err:
        collect([tmp_path])
    assert str(bad / "results.csv") in str(err.value) and "n_users" in str(err.value)


def test_no_results(tmp_path):
    write_run(tmp_path / "unfinished", seed=1, ndcg=0.4, done=False)
    with pytest.raises(NoResultsError):
        collect([tmp_path])


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "recsim.tables", *map(str, args)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip


def test_cli(sweep, tmp_path):
    result = run_cli(sweep)
    assert result.returncode == 0, result.stderr
    assert "0.5500 ± 0.6353" in result.stdout
    assert "skipping" in result.stderr and str(sweep / "2") in result.stderr
    csv = pd.read_csv(sweep / "summary.csv")
    assert {"mean", "ci_low", "ci_high", "n_seeds"} <= set(csv.columns)
    assert set(csv["stage"]) == {0, 1}  # the CSV keeps every stage
    assert (sweep / "summary.md").read_text() in result.stdout

    result = run_cli(sweep / "0", sweep / "1", "--out", tmp_path / "out" / "t", "--stage", "0",
                     "--metrics", "NDCG@3")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "t.md").exists() and "0.4500 ± 0.6353" in result.stdout
    assert "HR@1" not in result.stdout


def test_cli_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(empty)
    assert result.returncode == 1 and "no finished runs" in result.stderr

    write_run(tmp_path / "bad", seed=1, ndcg=0.4, drop=("metric",))
    result = run_cli(tmp_path / "bad")
    assert result.returncode == 1
    assert "missing required columns ['metric']" in result.stderr and "results.csv" in result.stderr


def test_r_matrix_rows_and_run_level_efficiency():
    # each stage evaluated on two splits (a row of R): the split goes into the column label;
    # peak_mem_mb has no stage (blank): it belongs to the whole run and joins the stage's row
    base = dict(dataset="synth", method="lora", backbone="tiny", recipe="r", protocol="stages",
                eval_mode="full", seed=1, stage=1, stage_name="s1", group="all", metric="NDCG@10",
                ci_low=0.0, ci_high=0.2, n_users=10)  # fmt: skip
    df = pd.DataFrame(
        [
            {**base, "split": "test_0", "value": 0.1},
            {**base, "split": "test_1", "value": 0.2},
            {**base, "stage": None, "stage_name": None, "split": "-", "group": "-",
             "metric": "peak_mem_mb", "value": 2048.0, "ci_low": None, "ci_high": None},
        ]
    )  # fmt: skip
    text = render_markdown(aggregate(df))
    assert "| method | backbone | seeds | test_0 / all NDCG@10 | test_1 / all NDCG@10 | peak_mem_mb |" in text
    assert "| lora | tiny | 1 | 0.1000 ± 0.1000† | 0.2000 ± 0.1000† | 2,048† |" in text


def test_repeated_seed_counts_once(tmp_path, capsys):
    write_run(tmp_path / "a", seed=1, ndcg=0.4)
    write_run(tmp_path / "b", seed=1, ndcg=0.6)  # a rerun of the same setting and seed
    agg = aggregate(collect([tmp_path]))
    assert "repeat a (setting, seed) pair" in capsys.readouterr().err
    row = pick(agg, stage=0, group="U_A", metric="NDCG@3")
    assert row["n_seeds"] == 1 and row["mean"] == pytest.approx(0.5)


def runner_like_run(run_dir: Path, seed: int, finished=True):
    """The runner's layout: config.yaml first, per-stage results.csv + DONE under stages/ (resume
    state), and the run's own results.csv + DONE at the end. Efficiency rows: eval_mode '-', no CI."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"seed: {seed}\n")
    base = dict(dataset="synthetic", method="finetune", backbone="sasrec", recipe="candidate_ranking",
                protocol="stages", seed=seed, **{"cfg.method": "finetune"})  # fmt: skip
    frames = []
    for stage in (0, 1):
        rows = [
            {**base, "eval_mode": mode, "candidates": cands, "stage": stage, "stage_name": f"p{stage}",
             "split": f"p{stage}_test", "group": "all", "metric": "NDCG@10", "value": 0.2 + 0.1 * seed,
             "ci_low": 0.1, "ci_high": 0.3, "n_users": 40}
            for mode, cands in (("candidates", "1+29"), ("full", "all"))
        ] + [{**base, "eval_mode": "-", "candidates": "-", "stage": stage, "stage_name": f"p{stage}",
              "split": "-", "group": "-", "metric": "update_seconds", "value": float(seed)}]  # fmt: skip
        frame = pd.DataFrame(rows)
        stage_dir = run_dir / "stages" / f"{stage:02d}_p{stage}"
        stage_dir.mkdir(parents=True)
        frame.to_csv(stage_dir / "results.csv", index=False)
        (stage_dir / "DONE").write_text("")
        frames.append(frame)
    if finished:
        pd.concat(frames).to_csv(run_dir / "results.csv", index=False)
        (run_dir / "DONE").write_text("")


def test_runner_layout(tmp_path, capsys):
    runner_like_run(tmp_path / "0_seed=1", seed=1)
    runner_like_run(tmp_path / "1_seed=2", seed=2)
    runner_like_run(tmp_path / "2_seed=3", seed=3, finished=False)  # crashed after its stages
    df = collect([tmp_path])
    err = capsys.readouterr().err
    assert "2_seed=3 (no results.csv)" in err and "repeat" not in err
    assert sorted(df["seed"].unique()) == [1, 2] and len(df) == 12  # stage copies not counted twice
    text = render_markdown(aggregate(df))
    # one table per ranking mode, each stating its candidates, with the update cost attached
    assert "### synthetic · stages · candidates" in text and "### synthetic · stages · full" in text
    assert "### synthetic · stages · -" not in text
    assert "recipe: candidate_ranking; stage: 1 (p1); candidates: 1+29; split: p1_test" in text
    assert "| method | backbone | seeds | all NDCG@10 | update_seconds |" in text  # cfg.method dropped
    assert text.count("| finetune | sasrec | 2 | 0.3500 ± 0.6353 | 1.50 ± 6.35 |") == 2
