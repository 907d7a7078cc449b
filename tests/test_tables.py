"""recsim.tables on fake run directories: merge over seeds, t intervals, skipped runs, errors."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from recsim.tables import (
    CI_BOOTSTRAP,
    CI_SEEDS,
    NoResultsError,
    ResultsFileError,
    aggregate,
    collect,
    render_markdown,
    t_quantile_975,
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


def test_t_quantile_hand_values():
    # standard t tables: t_{0.975,1} = 12.7062, t_{0.975,2} = 4.3027, t_{0.975,30} = 2.0423,
    # t_{0.975,31} = 2.0395 (the old hard-coded table fell back to the normal 1.96 beyond df = 30)
    for df, q in ((1, 12.7062), (2, 4.3027), (30, 2.0423), (31, 2.0395), (120, 1.9799)):
        assert t_quantile_975(df) == pytest.approx(q, abs=1e-4), df
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)


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
    assert header == ("| method | backbone | stage | stage_name | split | seeds"
                      " | U_A HR@1 | U_A NDCG@3 | U_I HR@1 | U_I NDCG@3 |")
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


# ------------------------------------------------------------------- paired differences (--baseline)

from recsim.results import save_ranks  # noqa: E402
from recsim.tables import paired_differences, render_paired  # noqa: E402

import numpy as np  # noqa: E402

KEY = ("candidates", "p1_test", "all")


def paired_run(root: Path, name: str, method: str, seed: int, users, ranks, candidates=None, lam=None) -> Path:
    """A finished run with per-user ranks of stage 1 (stages/01_p1/ranks.npz) and its candidates.npz."""
    d = root / name
    (d / "stages" / "01_p1").mkdir(parents=True)
    (d / "config.yaml").write_text(f"seed: {seed}\n")
    row = dict(dataset="synthetic", method=method, backbone="sasrec", recipe="r", protocol="stages",
               eval_mode="candidates", candidates="1+29", seed=seed, stage=1, stage_name="p1", split="p1_test",
               group="all", metric="HR@1", value=float(np.mean(np.asarray(ranks) < 1)), ci_low=0.0, ci_high=1.0,
               n_users=len(users), **{"cfg.method": method})  # fmt: skip
    if lam is not None:
        row["cfg.method.lam"] = lam
    pd.DataFrame([row, {**row, "metric": "NDCG@3"}]).to_csv(d / "results.csv", index=False)  # values unused
    (d / "DONE").write_text("")
    np.savez(d / "candidates.npz", **{"p1_test/all": np.arange(6) if candidates is None else candidates})
    save_ranks(d / "stages" / "01_p1" / "ranks.npz", {KEY: (users, ranks)})
    return d


USERS = np.arange(10)
BASE = np.array([0, 5] * 5)  # HR@1 per user: 1, 0, 1, 0, ...


@pytest.fixture
def paired(tmp_path):
    paired_run(tmp_path, "base", "base", 1, USERS, BASE)
    paired_run(tmp_path, "same", "same", 1, USERS, BASE)  # identical ranks: a zero difference
    # rank 0 everywhere, users stored in reverse order (paired by id): HR@1 differences 0, 1, 0, 1, ...
    paired_run(tmp_path, "better", "better", 1, USERS[::-1], np.zeros(10, dtype=int))
    paired_run(tmp_path, "noisy", "noisy", 1, USERS, np.array([5, 0] * 5))  # differences -1, +1, ...: mean 0
    return tmp_path


def test_paired_differences_mark_only_a_resolvable_gap(paired):
    diff, notes = paired_differences(collect([paired]), "base", metrics=["HR@1", "MRR"], n_boot=1000)
    assert notes == [] and set(diff["method"]) == {"same", "better", "noisy"}
    get = lambda method, metric: pick(diff, method=method, metric=metric)  # noqa: E731

    better = get("better", "HR@1")
    # mean of (0, 1) x 5 = 0.5; resampling 10 users, P(mean <= 0.1) = 11 / 1024 ~ 1% < 2.5%, so ci_low >= 0.2
    assert better["mean_diff"] == pytest.approx(0.5) and better["ci_low"] >= 0.2 and better["ci_high"] <= 0.8
    assert better["resolvable"] and better["n_rows"] == 10 and better["seeds"] == "1"
    # MRR: base 1 and 1/6 alternate, better is 1: differences (0, 5/6) x 5, mean 5/12
    assert get("better", "MRR")["mean_diff"] == pytest.approx(5 / 12) and get("better", "MRR")["resolvable"]

    same = get("same", "HR@1")
    assert (same["mean_diff"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0) and not same["resolvable"]
    noisy = get("noisy", "HR@1")
    assert noisy["mean_diff"] == pytest.approx(0.0) and noisy["ci_low"] < 0 < noisy["ci_high"]
    assert not noisy["resolvable"]

    text = render_paired(diff, "base", 1000)
    assert "### synthetic · stages · sasrec · r: stage 1 (p1) vs `base`" in text
    assert "1 seed(s) (1), 10 users per seed" in text and "✓ = resolvable" in text
    assert "| method | eval_mode | split | group | n | seeds | Δ HR@1 | Δ MRR |" in text
    line = next(l for l in text.splitlines() if l.startswith("| better"))
    assert line.startswith("| better | candidates | p1_test | all | 10 | 1 | +0.5000 [") and line.count("✓") == 2
    assert "✓" not in next(l for l in text.splitlines() if l.startswith("| same"))
    assert "✓" not in next(l for l in text.splitlines() if l.startswith("| noisy"))


def test_paired_differences_pool_seeds_and_name_unpaired_runs(tmp_path):
    for seed in (1, 2):
        paired_run(tmp_path, f"base_s{seed}", "base", seed, USERS, BASE)
        paired_run(tmp_path, f"better_s{seed}", "better", seed, USERS, np.zeros(10, dtype=int), lam=0.1)
    paired_run(tmp_path, "better_s3", "better", 3, USERS, np.zeros(10, dtype=int), lam=0.1)  # no base of seed 3
    diff, notes = paired_differences(collect([tmp_path]), "base", metrics=["HR@1"])
    row = pick(diff, metric="HR@1")
    assert row["method"] == "better (method.lam=0.1)" and row["n_rows"] == 20 and row["seeds"] == "1;2"
    assert row["mean_diff"] == pytest.approx(0.5) and row["n_users"] == "10"
    assert len(notes) == 1 and "better_s3" in notes[0] and "no base run" in notes[0]


def test_paired_differences_refuse_what_is_not_paired(tmp_path):
    paired_run(tmp_path, "base", "base", 1, USERS, BASE)
    paired_run(tmp_path, "other_users", "m", 1, USERS + 100, BASE)
    with pytest.raises(ValueError, match="different users"):
        paired_differences(collect([tmp_path]), "base")
    with pytest.raises(ValueError, match="no run has that method"):
        paired_differences(collect([tmp_path]), "nope")
    with pytest.raises(ValueError, match="per-user metrics are"):
        paired_differences(collect([tmp_path]), "base", metrics=["update_seconds"])
    (tmp_path / "other_users" / "DONE").unlink()
    paired_run(tmp_path, "other_cands", "m", 1, USERS, BASE, candidates=np.arange(6) + 1)
    with pytest.raises(ValueError, match="different candidates"):
        paired_differences(collect([tmp_path]), "base")


def test_cli_baseline(paired, tmp_path):
    result = run_cli(paired, "--baseline", "base", "--metrics", "HR@1,NDCG@3", "--out", tmp_path / "t")
    assert result.returncode == 0, result.stderr
    assert "## Paired differences vs `base`" in result.stdout and "| Δ HR@1 | Δ NDCG@3 |" in result.stdout
    csv = pd.read_csv(tmp_path / "t_paired.csv")
    assert set(csv["metric"]) == {"HR@1", "NDCG@3"} and csv["resolvable"].sum() == 2  # better: both metrics
    assert "Paired differences" in (tmp_path / "t.md").read_text()

    bare = tmp_path / "bare"  # runs without ranks.npz: the main tables still come out, with a note
    write_run(bare / "0", seed=1, ndcg=0.4, method="base")
    write_run(bare / "1", seed=1, ndcg=0.5, method="lora")
    result = run_cli(bare, "--baseline", "base")
    assert result.returncode == 0, result.stderr
    assert "no ranks.npz of stage last" in result.stderr and "(none: no method run could be paired" in result.stdout
