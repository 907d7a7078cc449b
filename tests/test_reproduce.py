"""recsim.reproduce without training: specs, the launch plan, skipping finished runs, and the rendered
tables (paper number, our mean ± CI, delta) checked against numbers computed by hand."""

import math
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest
import yaml

from recsim import reproduce
from recsim.reproduce import DEFAULT_EXPERIMENTS, EFFICIENCY, SpecError, load_scales, load_specs, main

REPO = Path(__file__).resolve().parents[1]
PAPERS = REPO.parent / "shared" / "papers" / "README.md"
T2 = 4.3027  # t_{0.975, 2}: 3 seeds


# ------------------------------------------------------------------------------------ the real specs


def test_every_spec_parses_and_names_its_runs():
    specs = load_specs(DEFAULT_EXPERIMENTS)
    assert {s.key for s in specs} == {
        "evorec_main_beauty", "evorec_main_toys", "evorec_toys_efficiency", "evorec_ablation",
        "evorec_t_sensitivity", "evorec_lambda_sensitivity", "peso_blocks", "peso_main_books",
        "peso_proximal_movies", "peso_lambda_instruments", "generative_beauty_loo", "l2d_titles",
        "l2d_semantic"}  # fmt: skip
    for spec in specs:
        names = {r.name for r in spec.runs}
        assert set(spec.paper_numbers) <= names, spec.key
        if spec.key.startswith("evorec"):
            assert spec.eval_mode == "candidates" and spec.groups == ["U_A", "U_I"]
        elif spec.key.startswith("l2d"):  # one generative model, a row per decoder; classic rows rank everything
            assert spec.eval_mode == "beam" and spec.groups == ["all"]
            decoders = {r.eval_mode or spec.eval_mode for r in spec.runs}
            assert {"beam", "l2d_global", "l2d_local", "id_head"} <= decoders, spec.key
            assert all(r.reads is None or r.eval_mode for r in spec.runs), spec.key
        else:  # generative: the whole catalogue through the trie-constrained beam, every spec's own decoder
            assert spec.eval_mode == "beam" and spec.groups == ["all"]
            assert any(o == "eval.decoders=[beam]" for o in spec.runs[0].overrides), spec.key
        assert spec.path.read_text().startswith(
            "# paper numbers below are the paper's, copied from ../shared/papers/README.md")
        for run in spec.runs:
            assert any(o.startswith("method=") for o in run.overrides), (spec.key, run.name)
    scales = load_scales(DEFAULT_EXPERIMENTS)
    assert set(scales) == {"smoke", "cpu", "cpu_gpu", "gpu", "paper"}
    assert scales["cpu_gpu"].overrides == [*scales["cpu"].overrides, "trainer.precision=32-true"]
    gpu = scales["gpu"].overrides
    assert "dataset.sample_users=5000" in gpu and "trainer.batch_size=16" in gpu  # the authors' effective batch
    assert not any(o.startswith("trainer.max_train_samples") for o in gpu) and scales["gpu"].seeds == [1, 2, 3]
    assert "backbone=tiny_llama" in scales["smoke"].overrides and scales["smoke"].seeds == [1]
    assert "backbone=smollm2_135m" in scales["cpu"].overrides and scales["cpu"].seeds == [1, 2, 3]
    assert "backbone=qwen2_7b" in scales["paper"].overrides and scales["paper"].seeds == [1, 2, 3]
    assert "NOTHING" in scales["smoke"].warning


def _section(start: str, end: str) -> str:
    if not PAPERS.is_file():
        pytest.skip(f"{PAPERS} not found")
    text = PAPERS.read_text()
    return text[text.index(start) : text.index(end)]


NUMBER = r"(?<![\d.])\d+\.\d+(?![\d.])"


@pytest.mark.parametrize("paper, start, end, table_lines", [
    ("evorec", "## 1. EvoRec", "## 2. PESO", ("|", "Table: ablation", "Sensitivity.")),
    ("peso", "## 2. PESO", "## 3. L2D", ("| ", "Table: proximal", "Table: λ"))])
def test_spec_numbers_are_the_papers_and_none_is_left_out(paper, start, end, table_lines):
    """Every number in a paper's specs occurs in its section of papers/README.md, and every number of that
    section's tables is in some spec (EvoRec: 0.4089, the digest's inconsistent figure, on purpose not; PESO:
    PISA's and Contrastive+PIW's, which no code can run, stand in the Books spec's claims instead)."""
    section = _section(start, end)
    lines = [l for l in section.splitlines() if l.startswith(table_lines)]
    in_paper = {float(x) for l in lines for x in re.findall(NUMBER, l)}
    in_specs = set()
    for spec in load_specs(DEFAULT_EXPERIMENTS):
        if not spec.key.startswith(paper):
            continue
        for numbers in spec.paper_numbers.values():
            for value in numbers.values():
                if value is not None:
                    in_specs.add(float(value))
                    assert re.search(rf"(?<![\d.]){re.escape(str(value))}", section), (spec.key, value)
    if paper == "evorec":
        assert in_paper - in_specs == set()
        assert 0.4089 not in in_specs
    else:
        lam = next(s for s in load_specs(DEFAULT_EXPERIMENTS) if s.key == "peso_lambda_instruments")
        settings = {float(o.split("=")[1]) for r in lam.runs for o in r.overrides if o.startswith("method.lam=")}
        assert settings == {0.5, 2.0, 8.0}  # the λ line's values are the runs' settings, not cells
        in_paper -= settings
        books = next(s for s in load_specs(DEFAULT_EXPERIMENTS) if s.key == "peso_main_books")
        claimed = {float(x) for c in books.paper_claims for x in re.findall(NUMBER, c)}
        assert in_paper - in_specs == claimed == {0.0482, 0.0299, 0.0412, 0.0243}


def test_shared_run_names_must_mean_one_setting(tmp_path):
    base = yaml.safe_load((DEFAULT_EXPERIMENTS / "evorec_main_beauty.yaml").read_text())
    base["runs"] = [{"name": "evorec", "overrides": ["method=evorec", "method.t=0.5"]}]
    base["paper_numbers"] = {}
    for f in ("evorec_t_sensitivity.yaml", "scales.yaml"):
        (tmp_path / f).write_text((DEFAULT_EXPERIMENTS / f).read_text())
    (tmp_path / "clash.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(SpecError, match="one name, one setting"):
        load_specs(tmp_path)
    base["paper_numbers"] = {"nope": {"U_A/NDCG@3": 0.1}}
    (tmp_path / "clash.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(SpecError, match="not one of the runs"):
        load_specs(tmp_path)
    base.update(paper_numbers={}, eval_mode="generation", runs=[{"name": "evorec_gen", "overrides": ["method=evorec"]}])
    (tmp_path / "clash.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(SpecError, match=r"needs eval.decoders=\[...,generation\]"):
        load_specs(tmp_path)
    base["overrides"] = ["eval.decoders=[candidates,generation]"]
    (tmp_path / "clash.yaml").write_text(yaml.safe_dump(base))
    assert [s.key for s in load_specs(tmp_path)][0] == "clash"


def _commands(out: str) -> list[list[str]]:
    return [shlex.split(l) for l in out.splitlines() if l and not l.startswith("#")]


def test_dry_run_lists_each_run_and_seed_once(tmp_path, capsys):
    specs = load_specs(DEFAULT_EXPERIMENTS)
    settings = {(ds, r.name) for s in specs for ds in s.datasets for r in s.runs if r.reads is None}  # rows that
    # read another run's directories launch nothing
    smoke = load_scales(DEFAULT_EXPERIMENTS)["smoke"]

    assert main(["--scale", "smoke", "--dry-run", "--out", str(tmp_path)]) == 0
    cmds = _commands(capsys.readouterr().out)
    assert len(cmds) == len(settings) * len(smoke.seeds)
    dirs = [c[-1] for c in cmds]
    assert len(set(dirs)) == len(dirs)
    evorec = [c for c in cmds if c[-1] == f"hydra.run.dir={tmp_path}/smoke/beauty/evorec_s1"]
    assert len(evorec) == 1  # in the main table, the ablation and the t study: launched once
    assert evorec[0][1:4] == ["-m", "recsim.run", "method=evorec"]
    assert evorec[0][4:-1] == ["dataset=beauty", *smoke.overrides, "seed=1"]
    wo_loc = next(c for c in cmds if c[-1].endswith("/toys/wo_location_s1"))
    assert wo_loc[3:6] == ["method=evorec", "method.t=1", "dataset=toys"]
    two = next(c for c in cmds if c[-1].endswith("/toys/evorec_2rounds_s1"))
    assert "stage.t_quantiles=[0.7,0.8]" in two and "method=evorec" in two

    assert main(["--scale", "cpu", "--dry-run", "--tables", "evorec_main_beauty", "--out", str(tmp_path)]) == 0
    cmds = _commands(capsys.readouterr().out)
    assert len(cmds) == 7 * 3  # 7 methods x 3 seeds
    assert sorted({c[-2] for c in cmds}) == ["seed=1", "seed=2", "seed=3"]
    assert all("backbone=smollm2_135m" in c for c in cmds)

    assert main(["--scale", "nope", "--dry-run"]) == 2
    assert main(["--scale", "smoke", "--tables", "nope", "--dry-run"]) == 2


# ---------------------------------------------------------------------- a tiny spec with fake runs


SPEC = {
    "title": "Fake table",
    "paper": "A paper, table 1",
    "dataset": "beauty",
    "metrics": ["NDCG@3"],
    "groups": ["U_A", "U_I"],
    "efficiency": ["changed_params", "update_seconds"],
    "eval_mode": "candidates",
    "radar_metrics": ["HR@1", "NDCG@3"],
    "runs": [
        {"name": "base", "label": "no update", "overrides": ["method=base"]},
        {"name": "evo2", "label": "EvoRec, 2 rounds", "overrides": ["stage.t_quantiles=[0.7,0.8]", "method=evorec"]},
    ],
    "paper_numbers": {
        "base": {"U_A/NDCG@3": 0.3582, "U_I/NDCG@3": None, "changed_params_M": 0, "update_min": None},
        "evo2": {"U_A/NDCG@3": 0.4762, "U_I/NDCG@3": 0.3691, "changed_params_M": 13.8, "update_min": 7.9},
    },
}
SCALES = {
    "three": {"description": "3 seeds", "overrides": ["backbone=tiny_llama"], "seeds": [1, 2, 3]},
    "one": {"description": "1 seed", "overrides": ["backbone=tiny_llama"], "seeds": [1], "warning": "FAKE SCALE"},
}


@pytest.fixture
def no_plots(monkeypatch):
    """Skip matplotlib where a test does not look at the plots (keeps the file well under 20 s)."""
    monkeypatch.setattr(reproduce.plots, "plot_radar", lambda *a: False)
    monkeypatch.setattr(reproduce.plots, "plot_cost", lambda *a: False)


@pytest.fixture
def experiments(tmp_path):
    folder = tmp_path / "experiments"
    folder.mkdir()
    (folder / "fake.yaml").write_text(yaml.safe_dump(SPEC))
    (folder / "scales.yaml").write_text(yaml.safe_dump(SCALES))
    return folder


def fake_run(d: Path, method: str, seed: int, rounds: int, ua: float, seconds: float, done=True) -> Path:
    """A finished run in the runner's layout: config.yaml, results.csv (every stage, both groups and
    'all', an R row, efficiency rows per stage) and DONE."""
    rows = []
    for stage in range(rounds + 1):
        for r in range(1, rounds + 1):  # like eval.all_splits: every stage scores every round's split
            for group, shift in (("U_A", 0.0), ("U_I", -0.1), ("all", -0.05)):
                for metric, base in (("NDCG@3", ua), ("HR@1", ua / 2), ("HR@3", ua + 0.1)):
                    own = stage == rounds and r == rounds  # only the last stage's own split is tabulated
                    value = base + shift if own else 0.9
                    rows.append(dict(eval_mode="candidates", candidates="1+29", stage=stage, stage_name=f"s{stage}",
                                     split=f"round{r}", group=group, metric=metric, value=value,
                                     ci_low=value - 0.03, ci_high=value + 0.05, n_users=20 if group == "U_A" else 30))
        for metric, value in (("changed_params", 1e6 * stage), ("update_seconds", seconds if stage else 999.0)):
            rows.append(dict(eval_mode="-", candidates="-", stage=stage, stage_name=f"s{stage}", split="-", group="-",
                             metric=metric, value=value, ci_low=None, ci_high=None, n_users=None))
    rows.append(dict(eval_mode="candidates", candidates="1+29", stage=rounds, stage_name=f"s{rounds}", split="R",
                     group="all", metric="forgetting(NDCG@10)", value=0.01, ci_low=None, ci_high=None, n_users=None))
    df = pd.DataFrame(rows).assign(dataset="beauty", method=method, backbone="tiny_llama", recipe="candidate_ranking",
                                   protocol="two_period", seed=seed)
    df["cfg.method"] = method
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"seed: {seed}\n")
    df.to_csv(d / "results.csv", index=False)
    if done:
        (d / "DONE").write_text("")
    return d


def fill(out: Path, scale="three", seeds=(1, 2, 3), skip=()):
    for seed in seeds:
        if ("base", seed) not in skip:
            fake_run(out / scale / "beauty" / f"base_s{seed}", "base", seed, 1, ua=0.35, seconds=0.0)
        if ("evo2", seed) not in skip:  # U_A NDCG@3 0.40 / 0.50 / 0.60; update 2 x 60/90/120 s
            fake_run(out / scale / "beauty" / f"evo2_s{seed}", "evorec", seed, 2, ua=0.3 + 0.1 * seed,
                     seconds=30.0 + 30.0 * seed)


def table_row(md: str, label: str) -> list[str]:
    line = next(l for l in md.splitlines() if l.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


class Spy:
    """Stands in for subprocess.run: counts launches; optionally plays a run that finishes."""

    def __init__(self, finish=None, rc=0):
        self.calls, self.finish, self.rc = [], finish, rc

    def __call__(self, argv, **kwargs):
        self.calls.append(argv)
        if self.finish:
            self.finish(Path(argv[-1].split("=", 1)[1]))
        return type("Done", (), {"returncode": self.rc})()


def test_render_paper_ours_and_delta_by_hand(experiments, tmp_path, monkeypatch):
    out = tmp_path / "out"
    fill(out)
    spy = Spy()
    monkeypatch.setattr(reproduce.subprocess, "run", spy)
    assert main(["--scale", "three", "--experiments", str(experiments), "--out", str(out)]) == 0
    assert spy.calls == []  # every run is DONE: nothing relaunched

    md = (out / "three" / "TABLES.md").read_text()
    cells = table_row(md, "EvoRec, 2 rounds")
    # columns: run | U_A NDCG@3 paper, recsim, Δ | U_I ... | params (M) ... | time (min) ... | source
    half = T2 * 0.1 / math.sqrt(3)  # sd of 0.40, 0.50, 0.60 is 0.1
    assert cells[1:4] == ["0.4762", f"0.5000 ± {half:.4f}", "+0.0238"]
    assert cells[4:7] == ["0.3691", f"0.4000 ± {half:.4f}", "+0.0309"]
    assert cells[7:10] == ["13.8", "2 ± 0", "−11.8"]  # the larger of the two updates: 2M changed
    # total update time: 2 x 60, 2 x 90, 2 x 120 s = 2, 3, 4 min: mean 3, sd 1
    assert cells[10:13] == ["7.9", f"3 ± {T2 / math.sqrt(3):.4g}", "−4.9"]
    assert "beauty/evo2_s{1,2,3}" in cells[13] and "3/3 done" in cells[13]
    base = table_row(md, "no update")
    assert base[1:4] == ["0.3582", "0.3500 ± 0.0000", "−0.0082"]
    assert base[4:7] == ["–", "0.2500 ± 0.0000", "–"]  # the paper gives no U_I number
    assert "round2 (stage 2)" in md and "round1 (stage 1)" in md  # each run's own last split
    assert "scale **three**" in md and "tiny_llama" in md and "U_A 20, U_I 30" in md

    csv = pd.read_csv(out / "three" / "tables.csv")
    row = csv[(csv.run == "evo2") & (csv.group == "U_A") & (csv.metric == "NDCG@3")].iloc[0]
    assert row.paper == 0.4762 and row.recsim_mean == pytest.approx(0.5) and row.n_seeds == 3
    assert row.delta == pytest.approx(0.5 - 0.4762) and row.split == "round2"
    assert row.recsim_ci_high - row.recsim_ci_low == pytest.approx(2 * half, rel=1e-4)  # T2 has 4 decimals
    t = csv[(csv.run == "evo2") & (csv.metric == "update_seconds")].iloc[0]
    assert t.unit == "min" and t.recsim_mean == pytest.approx(3.0) and t.delta == pytest.approx(-4.9)
    for name in ("fake_radar.png", "fake_cost.png"):
        assert (out / "three" / name).stat().st_size > 1000


def test_single_seed_shows_the_runs_bootstrap_ci_and_the_warning(experiments, tmp_path, no_plots):
    out = tmp_path / "out"
    fill(out, scale="one", seeds=(1,))
    assert main(["--scale", "one", "--experiments", str(experiments), "--out", str(out), "--render-only"]) == 0
    md = (out / "one" / "TABLES.md").read_text()
    assert md.count("FAKE SCALE") >= 2  # at the top and above every table
    cells = table_row(md, "EvoRec, 2 rounds")
    assert cells[2] == "0.4000 ± 0.0400†"  # the run's own CI [v - 0.03, v + 0.05]: half-width 0.04
    assert cells[11] == "2†"  # 2 x 60 s, no spread with one seed


def test_unfinished_runs_are_launched_and_failures_reported(experiments, tmp_path, monkeypatch, capsys, no_plots):
    out = tmp_path / "out"
    fill(out, skip={("evo2", 2), ("base", 3)})
    fake_run(out / "three" / "beauty" / "base_s3", "base", 3, 1, ua=0.35, seconds=0.0, done=False)  # crashed

    def finish(d: Path):
        run, seed = d.name.split("_s")
        shutil_rm(d)
        fake_run(d, {"evo2": "evorec"}.get(run, run), int(seed), 2 if run == "evo2" else 1, ua=0.5, seconds=90.0)

    spy = Spy(finish=finish)
    monkeypatch.setattr(reproduce.subprocess, "run", spy)
    assert main(["--scale", "three", "--experiments", str(experiments), "--out", str(out)]) == 0
    launched = sorted(argv[-1] for argv in spy.calls)
    assert launched == [f"hydra.run.dir={out}/three/beauty/base_s3", f"hydra.run.dir={out}/three/beauty/evo2_s2"]
    evo = next(a for a in spy.calls if a[-1].endswith("evo2_s2"))
    assert evo[3:] == ["stage.t_quantiles=[0.7,0.8]", "method=evorec", "dataset=beauty", "backbone=tiny_llama",
                       "seed=2", f"hydra.run.dir={out}/three/beauty/evo2_s2"]
    assert (out / "three" / "beauty" / "evo2_s2.log").is_file()

    spy2 = Spy()  # a second invocation finds everything DONE
    monkeypatch.setattr(reproduce.subprocess, "run", spy2)
    assert main(["--scale", "three", "--experiments", str(experiments), "--out", str(out)]) == 0
    assert spy2.calls == []

    (out / "three" / "beauty" / "evo2_s3" / "DONE").unlink()
    failing = Spy(rc=1)
    monkeypatch.setattr(reproduce.subprocess, "run", failing)
    capsys.readouterr()
    assert main(["--scale", "three", "--experiments", str(experiments), "--out", str(out)]) == 1
    assert len(failing.calls) == 1 and "FAILED" in capsys.readouterr().err
    md = (out / "three" / "TABLES.md").read_text()  # still rendered, from the two seeds that finished
    assert "2/3 done" in table_row(md, "EvoRec, 2 rounds")[13]


def shutil_rm(d: Path):
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def test_efficiency_units_match_the_papers_keys():
    assert EFFICIENCY["changed_params"][:3] == ("changed_params_M", 1e6, "M")
    assert EFFICIENCY["update_seconds"][:3] == ("update_min", 60.0, "min")


def test_inconsistent_seeds_mark_their_row_and_a_stale_run_warns(
    experiments, tmp_path, monkeypatch, capsys, no_plots
):
    out = tmp_path / "out"
    fill(out, skip={("evo2", 3)})
    fake_run(out / "three" / "beauty" / "evo2_s3", "other", 3, 2, ua=0.6, seconds=120.0)  # another method column
    hydra = out / "three" / "beauty" / "base_s1" / ".hydra"
    hydra.mkdir()
    (hydra / "overrides.yaml").write_text(yaml.safe_dump(["method=finetune", "dataset=beauty", "seed=1"]))
    spy = Spy()
    monkeypatch.setattr(reproduce.subprocess, "run", spy)
    assert main(["--scale", "three", "--experiments", str(experiments), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert spy.calls == [] and "base_s1 is DONE but was launched with" in err
    md = (out / "three" / "TABLES.md").read_text()
    assert "ERROR" in table_row(md, "EvoRec, 2 rounds")[13]
    assert table_row(md, "no update")[2] == "0.3500 ± 0.0000"  # the other row still renders


@pytest.mark.parametrize("scale", ["cpu", "cpu_gpu", "gpu"])
def test_every_run_of_a_scale_composes_and_validates(scale):
    """Every table run at this scale, as `recsim.reproduce` would launch it, passes the config schema."""
    from conftest import compose
    from recsim.schema import validate

    sc = load_scales(DEFAULT_EXPERIMENTS)[scale]
    for spec in load_specs(DEFAULT_EXPERIMENTS):
        for run in spec.runs:
            for ds in spec.datasets:
                validate(compose([*run.overrides, f"dataset={ds}", *sc.overrides, f"seed={sc.seeds[0]}"]))


def test_runs_on_absent_data_are_skipped_and_marked(tmp_path, monkeypatch, capsys):
    """A table on raw files nobody downloaded is never run on another dataset: its jobs are skipped with the
    missing file named, and its rows say "data not present"."""
    from recsim.reproduce.launch import Job, missing_data, run_jobs

    monkeypatch.setenv("RECSIM_DATA", str(tmp_path))
    why = missing_data("books")
    assert why is not None and str(tmp_path / "Books_5.json.gz") in why and "books.yaml" in why
    assert missing_data("synthetic") is None
    spy = Spy()
    monkeypatch.setattr(reproduce.subprocess, "run", spy)
    jobs = [Job("books", "peso", 1, ["method=peso", "dataset=books"], tmp_path / "out" / "books" / "peso_s1")]
    assert run_jobs(jobs) == []
    assert spy.calls == [] and "skipping 1 run(s) on books" in capsys.readouterr().err


def test_a_row_can_read_another_runs_decoder(tmp_path, monkeypatch, no_plots):
    """`reads` + `eval_mode`: one trained run, a row per decoder; nothing is launched for the reading row, and it
    shows the rows of its own decoder."""
    spec = {**SPEC, "runs": [*SPEC["runs"], {"name": "evo2_beam", "label": "EvoRec, beam", "reads": "evo2",
                                              "eval_mode": "beam"}]}
    spec["runs"][1] = {**spec["runs"][1], "overrides": [*spec["runs"][1]["overrides"], "eval.decoders=[candidates,beam]"]}
    folder = tmp_path / "experiments"
    folder.mkdir()
    (folder / "fake.yaml").write_text(yaml.safe_dump(spec))
    (folder / "scales.yaml").write_text(yaml.safe_dump(SCALES))
    out = tmp_path / "out"
    fill(out)
    for seed in (1, 2, 3):  # the beam's rows beside the candidates' ones: U_A NDCG@3 = 0.1 * seed
        f = out / "three" / "beauty" / f"evo2_s{seed}" / "results.csv"
        df = pd.read_csv(f)
        beam = df[df.eval_mode == "candidates"].assign(eval_mode="beam", candidates="all")
        beam.loc[(beam.group == "U_A") & (beam.metric == "NDCG@3") & (beam.stage == 2) & (beam.split == "round2"),
                 "value"] = 0.1 * seed
        pd.concat([df, beam]).to_csv(f, index=False)
    spy = Spy()
    monkeypatch.setattr(reproduce.subprocess, "run", spy)
    assert main(["--scale", "three", "--experiments", str(folder), "--out", str(out)]) == 0
    assert spy.calls == []  # evo2_beam owns no directory: nothing to launch
    md = (out / "three" / "TABLES.md").read_text()
    assert table_row(md, "EvoRec, beam")[2].startswith("0.2000 ± ")  # mean of 0.1, 0.2, 0.3
    assert table_row(md, "EvoRec, 2 rounds")[2].startswith("0.5000 ± ")  # the candidates' rows, as before
    assert "evo2_s{1,2,3}` (3/3 done), decoder beam" in md and "per row (beam, candidates)" in md
    for bad, match in ((dict(reads="nope"), "reads 'nope', not a run of this spec"),
                       (dict(reads="evo2", overrides=["method=base"]), "no overrides of its own")):
        spec["runs"][2] = {"name": "evo2_beam", "eval_mode": "beam", **bad}
        (folder / "fake.yaml").write_text(yaml.safe_dump(spec))
        with pytest.raises(SpecError, match=match):
            load_specs(folder)


def test_a_baseline_row_replaces_the_scales_backbone(tmp_path):
    from recsim.reproduce.launch import plan
    from recsim.reproduce.spec import Scale

    spec = {**SPEC, "runs": [{"name": "base", "overrides": ["method=base"]},
                             {"name": "sasrec", "overrides": ["method=base"], "backbone": "sasrec"}]}
    spec["paper_numbers"] = {}
    (tmp_path / "fake.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "scales.yaml").write_text(yaml.safe_dump(SCALES))
    scale = Scale("s", "d", ["backbone=tiny_llama", "backbone.lora.r=4", "dataset.sample_users=9"], [1])
    jobs = {j.run: j.overrides for j in plan(load_specs(tmp_path), scale, tmp_path / "out")}
    assert jobs["base"] == ["method=base", "dataset=beauty", "backbone=tiny_llama", "backbone.lora.r=4",
                            "dataset.sample_users=9", "seed=1"]
    assert jobs["sasrec"] == ["method=base", "dataset=beauty", "dataset.sample_users=9", "backbone=sasrec", "seed=1"]


def test_l2d_spec_numbers_are_the_papers():
    """Every paper number of the L2D specs occurs in §3 of papers/README.md (the specs place them on other data,
    which their notes say)."""
    section = _section("## 3. L2D", "## 4. Distillation")
    found = 0
    for spec in load_specs(DEFAULT_EXPERIMENTS):
        if spec.key.startswith("l2d"):
            for numbers in spec.paper_numbers.values():
                for value in numbers.values():
                    found += 1
                    assert re.search(rf"(?<![\d.]){re.escape(str(value))}(?![\d])", section), (spec.key, value)
    assert found >= 7
