"""`make reproduce-tables`: run every paper table's runs at one scale, then print ours beside the paper's.

    python -m recsim.reproduce --scale smoke|cpu|paper [--tables NAME,...] [--out outputs/reproduce]
                               [--experiments DIR] [--jobs 1] [--dry-run] [--render-only]

A *table spec* is one YAML file in ``experiments/`` (see experiments/README.md): the runs of one table
of a paper (name + Hydra overrides), the metrics, user groups and efficiency figures it reports, and the
paper's own numbers. ``experiments/scales.yaml`` holds the scales (backbone, user sample, budgets, seeds).

Launch. For every run x dataset x seed the run directory is ``<out>/<scale>/<dataset>/<run>_s<seed>``.
A run name means the same overrides in every spec (checked over all specs, so directories never depend
on which tables were asked for); runs shared by several tables are computed once. A directory holding
``DONE`` is skipped; anything else is (re)launched as

    python -m recsim.run <spec overrides> <run overrides> dataset=<dataset> <scale overrides>
                         seed=<seed> hydra.run.dir=<dir>

with its output in ``<dir>.log`` (a half-finished run resumes at its last finished stage). A failed run
is reported and the others carry on; the exit status is 1 if any failed.

Render. ``<out>/<scale>/TABLES.md`` and ``tables.csv``: per spec, one row per run (x dataset), and for
each group x metric the paper's number, recsim's mean +- 95% CI over seeds (recsim.tables.aggregate) and
the delta recsim - paper. Quality is the last stage's model on that stage's own split (round R of R update
rounds). Efficiency sums update time over the update stages (stage >= 1) and takes the largest update
for parameter and memory figures, converted to the paper's units (millions, minutes). Plots per spec:
``<spec>_radar.png`` (one polygon per run over group x metric) and ``<spec>_cost.png`` (U_A quality vs
update time, the paper's points beside ours).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import yaml

import recsim
from recsim.tables import CI_BOOTSTRAP, EFFICIENCY_GROUP, aggregate, collect, render_markdown

DEFAULT_EXPERIMENTS = Path(recsim.__file__).resolve().parents[1] / "experiments"
SCALES_FILE = "scales.yaml"
DEFAULT_OUT = Path("outputs/reproduce")

# recsim efficiency metric -> (paper_numbers key, recsim units per paper unit, unit, column label,
# reduction over the update stages). Paper tables give parameters in millions and time in minutes.
EFFICIENCY = {
    "changed_params": ("changed_params_M", 1e6, "M", "params changed (M)", "max"),
    "trainable_params": ("trainable_params_M", 1e6, "M", "trainable params (M)", "max"),
    "update_seconds": ("update_min", 60.0, "min", "update time (min, all rounds)", "sum"),
    "train_samples": ("train_samples", 1.0, "", "train samples (all rounds)", "sum"),
    "peak_mem_mb": ("peak_mem_mb", 1.0, "MB", "peak memory (MB)", "max"),
}
SPEC_KEYS = {"title", "paper", "dataset", "metrics", "groups", "efficiency", "eval_mode", "runs",
             "paper_numbers", "note", "overrides", "radar_metrics", "paper_claims", "order"}  # fmt: skip
RUN_KEYS = {"name", "label", "overrides", "paper_source"}
RESERVED = ("dataset=", "seed=", "hydra.run.dir=")  # set by reproduce itself
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a run name is a directory name


class SpecError(ValueError):
    """A table spec or scales.yaml is malformed; the message names the file."""


# ------------------------------------------------------------------------------------------ specs


@dataclass
class RunSpec:
    name: str
    label: str
    overrides: list[str]  # spec-wide overrides first, then the run's own
    paper_source: str | None = None


@dataclass
class Spec:
    key: str  # file stem: the name used by --tables and in plot file names
    path: Path
    title: str
    paper: str
    datasets: list[str]
    metrics: list[str]
    groups: list[str]
    efficiency: list[str]
    eval_mode: str
    runs: list[RunSpec]
    paper_numbers: dict[str, dict[str, float | None]]
    note: str = ""
    radar_metrics: list[str] = field(default_factory=list)
    paper_claims: list[str] = field(default_factory=list)
    order: int = 100  # position in TABLES.md (then the file name)

    def paper_value(self, run: str, dataset: str, key: str) -> float | None:
        """The paper's number for ``key`` (``U_A/NDCG@3`` or an efficiency key), dataset-qualified first."""
        numbers = self.paper_numbers.get(run, {})
        value = numbers.get(f"{dataset}/{key}", numbers.get(key))
        return None if value is None else float(value)


@dataclass
class Scale:
    name: str
    description: str
    overrides: list[str]
    seeds: list[int]
    warning: str = ""


def _str_list(value, what: str, path: Path) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise SpecError(f"{path}: {what} must be a list of strings, got {value!r}")
    return [str(v) for v in value]


def load_spec(path: str | Path) -> Spec:
    """One table spec, checked: required keys, run names, paper_numbers keys, efficiency metrics."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a table spec is a mapping, got {type(raw).__name__}")
    unknown = set(raw) - SPEC_KEYS
    missing = {"title", "paper", "dataset", "metrics", "groups", "runs"} - set(raw)
    if unknown or missing:
        raise SpecError(f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    common = _str_list(raw.get("overrides"), "overrides", path)
    runs, seen = [], set()
    for entry in raw["runs"] or []:
        if not isinstance(entry, dict) or not {"name", "overrides"} <= set(entry) or set(entry) - RUN_KEYS:
            raise SpecError(f"{path}: a run is {{name, overrides[, label, paper_source]}}, got {entry!r}")
        name = str(entry["name"])
        if not NAME_RE.match(name) or name in seen:
            raise SpecError(f"{path}: run name {name!r} is repeated or not a valid directory name")
        seen.add(name)
        own = _str_list(entry["overrides"], f"run {name}: overrides", path)
        reserved = [o for o in common + own if o.lstrip("+~").startswith(RESERVED)]
        if reserved:
            raise SpecError(f"{path}: run {name}: {reserved} are set by reproduce (dataset, seed, run dir)")
        runs.append(RunSpec(name, str(entry.get("label") or name), common + own, entry.get("paper_source")))
    if not runs:
        raise SpecError(f"{path}: no runs")
    spec = Spec(
        key=path.stem, path=path, title=str(raw["title"]), paper=str(raw["paper"]).strip(),
        datasets=_str_list(raw["dataset"], "dataset", path), metrics=_str_list(raw["metrics"], "metrics", path),
        groups=_str_list(raw["groups"], "groups", path),
        efficiency=_str_list(raw.get("efficiency"), "efficiency", path),
        eval_mode=str(raw.get("eval_mode", "candidates")), runs=runs,
        paper_numbers=raw.get("paper_numbers") or {}, note=str(raw.get("note") or "").strip(),
        radar_metrics=_str_list(raw.get("radar_metrics"), "radar_metrics", path),
        paper_claims=_str_list(raw.get("paper_claims"), "paper_claims", path), order=int(raw.get("order", 100)),
    )  # fmt: skip
    if spec.eval_mode not in ("candidates", "full") and not any(
        o.startswith("eval.modes=") and spec.eval_mode in o for r in runs for o in r.overrides
    ):  # candidates (and full, for models that rank all) are always scored; others are opt-in
        raise SpecError(f"{path}: eval_mode {spec.eval_mode} needs eval.modes=[candidates,{spec.eval_mode}] in"
                        " the spec's overrides (and run names of their own: that is another setting)")
    bad_eff = [e for e in spec.efficiency if e not in EFFICIENCY]
    if bad_eff:
        raise SpecError(f"{path}: efficiency {bad_eff} unknown; known: {sorted(EFFICIENCY)}")
    _check_paper_numbers(spec)
    return spec


def _check_paper_numbers(spec: Spec) -> None:
    """paper_numbers: {run: {key: number|null}}; key = [<dataset>/]<group>/<metric> or an efficiency key."""
    names = {r.name for r in spec.runs}
    allowed = {f"{g}/{m}" for g in spec.groups for m in spec.metrics} | {EFFICIENCY[e][0] for e in spec.efficiency}
    if not isinstance(spec.paper_numbers, dict):
        raise SpecError(f"{spec.path}: paper_numbers must map run names to numbers")
    for run, numbers in spec.paper_numbers.items():
        if run not in names:
            raise SpecError(f"{spec.path}: paper_numbers names run {run!r}, not one of the runs {sorted(names)}")
        if not isinstance(numbers, dict):
            raise SpecError(f"{spec.path}: paper_numbers[{run}] must be a mapping")
        for key, value in numbers.items():
            first, _, rest = str(key).partition("/")
            plain = rest if first in spec.datasets and rest else str(key)
            if plain not in allowed:
                raise SpecError(
                    f"{spec.path}: paper_numbers[{run}] key {key!r} is not [<dataset>/]<group>/<metric> of"
                    f" this spec nor an efficiency key; allowed: {sorted(allowed)}"
                )
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise SpecError(f"{spec.path}: paper_numbers[{run}][{key}] = {value!r} is not a number or null")


def load_specs(experiments: str | Path) -> list[Spec]:
    """Every spec in ``experiments`` (all *.yaml but scales.yaml) by ``order`` then name, checked together."""
    folder = Path(experiments)
    paths = sorted(p for p in folder.glob("*.yaml") if p.name != SCALES_FILE)
    if not paths:
        raise SpecError(f"{folder}: no table specs (*.yaml besides {SCALES_FILE})")
    specs = sorted((load_spec(p) for p in paths), key=lambda s: (s.order, s.key))
    check_shared_runs(specs)
    return specs


def check_shared_runs(specs: Sequence[Spec]) -> None:
    """On each dataset a run name stands for one set of overrides, and one set of overrides for one name:
    the directory ``<dataset>/<name>_s<seed>`` is then the same computation whichever spec asks for it."""
    by_name: dict[tuple, tuple] = {}
    by_overrides: dict[tuple, tuple] = {}
    for spec in specs:
        for run in spec.runs:
            canon = tuple(sorted(run.overrides))
            for ds in spec.datasets:
                where = (spec.path.name, run.name)
                old = by_name.setdefault((ds, run.name), (canon, where))
                if old[0] != canon:
                    raise SpecError(
                        f"run {run.name!r} on {ds} has overrides {list(canon)} in {where[0]} but {list(old[0])}"
                        f" in {old[1][0]}: one name, one setting (rename one of them)"
                    )
                other = by_overrides.setdefault((ds, canon), (run.name, where))
                if other[0] != run.name:
                    raise SpecError(
                        f"{where[0]} run {run.name!r} and {other[1][0]} run {other[0]!r} have the same"
                        f" overrides on {ds}: give them one name so the run is computed once"
                    )


def load_scales(experiments: str | Path) -> dict[str, Scale]:
    path = Path(experiments) / SCALES_FILE
    if not path.is_file():
        raise SpecError(f"{path}: missing (the scales of reproduce)")
    raw = yaml.safe_load(path.read_text()) or {}
    scales = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict) or not {"overrides", "seeds", "description"} <= set(entry):
            raise SpecError(f"{path}: scale {name!r} needs description, overrides and seeds")
        seeds = entry["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise SpecError(f"{path}: scale {name!r}: seeds must be a non-empty list of integers")
        scales[name] = Scale(name, str(entry["description"]).strip(), _str_list(entry["overrides"], "overrides", path),
                             seeds, str(entry.get("warning") or "").strip())
    return scales


# ------------------------------------------------------------------------------------------- jobs


@dataclass
class Job:
    dataset: str
    run: str
    seed: int
    overrides: list[str]  # everything but hydra.run.dir, in command-line order
    dir: Path

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "recsim.run", *self.overrides, f"hydra.run.dir={self.dir}"]

    def command(self) -> str:
        return shlex.join(self.argv())

    @property
    def done(self) -> bool:
        return (self.dir / "DONE").is_file()

    @property
    def log(self) -> Path:
        return self.dir.with_name(self.dir.name + ".log")


def run_dir(out: Path, scale: str, dataset: str, run: str, seed: int) -> Path:
    return Path(out) / scale / dataset / f"{run}_s{seed}"


def plan(specs: Sequence[Spec], scale: Scale, out: Path) -> list[Job]:
    """One job per distinct run x dataset x seed, seed-major: all of seed 1 first, so an interrupted
    long scale still leaves a complete one-seed table; within a seed, in spec order (methods sharing a
    stage 0 run back to back, and the first trains it for the rest)."""
    jobs: dict[Path, Job] = {}
    for seed in scale.seeds:
        for spec in specs:
            for ds in spec.datasets:
                for run in spec.runs:
                    d = run_dir(out, scale.name, ds, run.name, seed)
                    overrides = [*run.overrides, f"dataset={ds}", *scale.overrides, f"seed={seed}"]
                    jobs.setdefault(d, Job(ds, run.name, seed, overrides, d))
    return list(jobs.values())


def _stale(job: Job) -> list[str] | None:
    """The overrides a finished run was launched with, when they differ from the job's (else None)."""
    recorded = job.dir / ".hydra" / "overrides.yaml"
    if not recorded.is_file():
        return None
    try:
        got = [str(o) for o in yaml.safe_load(recorded.read_text()) or []]
    except yaml.YAMLError:
        return None
    return got if sorted(got) != sorted(job.overrides) else None


def launch(job: Job) -> tuple[Job, int, float]:
    """Run one job, its stdout and stderr into ``<dir>.log``. Returns (job, exit status, seconds)."""
    job.dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(job.log, "a") as log:
        log.write(f"# {_dt.datetime.now().isoformat(timespec='seconds')}: {job.command()}\n")
        log.flush()
        try:
            rc = subprocess.run(job.argv(), stdout=log, stderr=subprocess.STDOUT).returncode
        except OSError as err:  # the interpreter could not be started
            log.write(f"recsim.reproduce: cannot launch: {err}\n")
            rc = 127
    if rc == 0 and not job.done:  # exit 0 without DONE would be read as a finished run otherwise
        rc = 1
    return job, rc, time.monotonic() - start


def _tail(path: Path, n: int = 5) -> str:
    try:
        return "\n".join("      " + line for line in path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_jobs(jobs: list[Job], n_parallel: int = 1) -> list[Job]:
    """Launch the unfinished jobs (``n_parallel`` at a time); returns the ones that failed."""
    todo = [j for j in jobs if not j.done]
    for job in jobs:
        if job.done:
            stale = _stale(job)
            if stale is not None:
                print(f"recsim.reproduce: warning: {job.dir} is DONE but was launched with {stale}, not"
                      f" {job.overrides}; its numbers are used as they are (delete it to rerun)", file=sys.stderr)
    print(f"recsim.reproduce: {len(jobs)} runs, {len(jobs) - len(todo)} already done, launching {len(todo)}",
          file=sys.stderr)
    failed = []

    def report(result, i):
        job, rc, secs = result
        if rc == 0:
            print(f"[{i}/{len(todo)}] done   {job.dir} ({secs:.0f} s)", file=sys.stderr)
        else:
            failed.append(job)
            print(f"[{i}/{len(todo)}] FAILED {job.dir} (exit {rc}, {secs:.0f} s); log: {job.log}\n"
                  + _tail(job.log), file=sys.stderr)

    if n_parallel <= 1:
        for i, job in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] run    {job.command()}", file=sys.stderr)
            report(launch(job), i)
    else:
        with ThreadPoolExecutor(max_workers=n_parallel) as pool:
            for i, result in enumerate(pool.map(launch, todo), 1):
                report(result, i)
    return failed


# ------------------------------------------------------------------------------------------ cells


@dataclass
class Cell:
    """One recsim figure, in the paper's unit, with the paper's number beside it."""
    mean: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    n_seeds: int = 0
    ci_method: str = ""
    paper: float | None = None

    @property
    def delta(self) -> float:
        return self.mean - self.paper if self.paper is not None and not math.isnan(self.mean) else math.nan


def _own_split(run_dirs: list[Path], stage: int, splits: list[str]) -> str:
    """The split the last stage is judged on: protocol.json's eval_split, else inferred from the names
    (two_period: round<stage>; stages: window<stage+1>; else the one with the highest trailing number)."""
    for d in run_dirs:
        try:
            for s in json.loads((d / "protocol.json").read_text())["stages"]:
                if int(s["index"]) == stage and s["eval_split"] in splits:
                    return s["eval_split"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if len(splits) == 1:
        return splits[0]
    for guess in (f"round{stage}", f"window{stage + 1}"):
        if guess in splits:
            return guess
    return max(splits, key=lambda s: (int(m.group()) if (m := re.search(r"\d+$", s)) else -1, s))


def _from_agg(row: pd.Series, factor: float = 1.0) -> dict:
    return dict(mean=row["mean"] / factor, ci_low=row["ci_low"] / factor, ci_high=row["ci_high"] / factor,
                n_seeds=int(row["n_seeds"]), ci_method=str(row["ci_method"]))


def row_cells(spec: Spec, run: RunSpec, dataset: str, dirs: list[Path]) -> tuple[dict, dict]:
    """Cells of one table row from the finished run dirs of its seeds, and facts for the header.

    Quality: rows of the spec's eval_mode at the highest stage, on that stage's own split, aggregated
    over seeds by recsim.tables.aggregate. Efficiency: per seed, the update stages (>= 1) reduced by sum
    (time, samples) or max (parameters, memory), then aggregated over seeds the same way.
    """
    cells: dict[str, Cell] = {}
    for g in spec.groups:
        for m in spec.metrics:
            cells[f"{g}/{m}"] = Cell(paper=spec.paper_value(run.name, dataset, f"{g}/{m}"))
    for e in spec.efficiency:
        cells[e] = Cell(paper=spec.paper_value(run.name, dataset, EFFICIENCY[e][0]))
    facts: dict = {"dirs": dirs}
    if not dirs:
        return cells, facts
    df = collect(dirs)
    facts["backbone"] = sorted(df["backbone"].dropna().astype(str).unique())
    stages = pd.to_numeric(df["stage"], errors="coerce")

    quality = df[(df["eval_mode"] == spec.eval_mode) & (df["group"] != EFFICIENCY_GROUP) & (df["split"] != "R")]
    radar = set(spec.radar_metrics) | set(spec.metrics)
    if len(quality):
        last = int(pd.to_numeric(quality["stage"]).max())
        quality = quality[pd.to_numeric(quality["stage"]) == last]
        split = _own_split(dirs, last, sorted(quality["split"].astype(str).unique()))
        quality = quality[(quality["split"].astype(str) == split) & quality["metric"].isin(radar)]
        facts.update(stage=last, split=split,
                     candidates=sorted(quality.get("candidates", pd.Series(dtype=str)).dropna().astype(str).unique()))
        if len(quality):
            agg = aggregate(quality)
            for _, row in agg.iterrows():
                key = f"{row['group']}/{row['metric']}"
                if key in cells and cells[key].n_seeds:
                    raise ValueError(f"{run.name} on {dataset}: two aggregated results for {key}; the seeds of one"
                                     " run differ in a setting (see the cfg.* columns of their results.csv)")
                cells.setdefault(key, Cell(paper=spec.paper_value(run.name, dataset, key))).__dict__.update(_from_agg(row))
            users = agg.groupby("group")["n_users"].mean()
            facts["n_users"] = {g: float(users[g]) for g in spec.groups if g in users}

    eff = df[(df["group"] == EFFICIENCY_GROUP) & (stages >= 1) & df["metric"].isin(spec.efficiency)]
    if len(eff):
        reduce = {m: EFFICIENCY[m][4] for m in spec.efficiency}
        per_seed = eff.groupby(["metric", "seed"])["value"]
        totals = pd.concat([per_seed.sum().rename("sum"), per_seed.max().rename("max")], axis=1).reset_index()
        totals["value"] = [r[reduce[r["metric"]]] for _, r in totals.iterrows()]
        frame = totals[["metric", "seed", "value"]].assign(group=EFFICIENCY_GROUP, ci_low=np.nan, ci_high=np.nan)
        for _, row in aggregate(frame).iterrows():
            cells[row["metric"]].__dict__.update(_from_agg(row, EFFICIENCY[row["metric"]][1]))
    return cells, facts


# ----------------------------------------------------------------------------------------- render


def _fmt(x: float, quality: bool) -> str:
    if quality:
        return f"{x:.4f}"
    if abs(x) >= 1e4:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def _fmt_paper(value: float | None, quality: bool) -> str:
    return "–" if value is None else _fmt(value, quality)


def _fmt_ours(c: Cell, quality: bool) -> str:
    if c.n_seeds == 0 or math.isnan(c.mean):
        return "–"
    text = _fmt(c.mean, quality)
    if not (math.isnan(c.ci_low) or math.isnan(c.ci_high)):
        text += " ± " + _fmt((c.ci_high - c.ci_low) / 2, quality)
    return text + ("†" if c.n_seeds == 1 else "")


def _fmt_delta(c: Cell, quality: bool) -> str:
    d = c.delta
    return "–" if math.isnan(d) else ("+" if d >= 0 else "−") + _fmt(abs(d), quality)


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _seed_range(seeds: Sequence[int]) -> str:
    return "{" + ",".join(map(str, seeds)) + "}" if len(seeds) > 1 else str(seeds[0])


@dataclass
class TableRow:
    run: RunSpec
    dataset: str
    cells: dict
    facts: dict


def build_rows(spec: Spec, scale: Scale, out: Path) -> list[TableRow]:
    rows = []
    for run in spec.runs:
        for ds in spec.datasets:
            dirs = [run_dir(out, scale.name, ds, run.name, s) for s in scale.seeds]
            finished = [d for d in dirs if (d / "DONE").is_file() and (d / "results.csv").is_file()]
            try:
                cells, facts = row_cells(spec, run, ds, finished)
            except ValueError as err:  # ResultsFileError included: the row is marked, the others render
                print(f"recsim.reproduce: error: {spec.key}, run {run.name} on {ds}: {err}", file=sys.stderr)
                cells, facts = row_cells(spec, run, ds, [])
                facts.update(dirs=finished, error=str(err))
            rows.append(TableRow(run, ds, cells, facts))
    return rows


def _columns(spec: Spec) -> list[tuple[str, str, bool]]:
    """(cell key, column label, is quality) in display order."""
    cols = [(f"{g}/{m}", f"{g} {m}", True) for g in spec.groups for m in spec.metrics]
    return cols + [(e, EFFICIENCY[e][3], False) for e in spec.efficiency]


def render_spec(spec: Spec, scale: Scale, rows: list[TableRow], rel: Path) -> str:
    """One spec's markdown section: header line, the table, notes, plots."""
    multi = len(spec.datasets) > 1
    backbones = sorted({b for r in rows for b in r.facts.get("backbone", [])})
    splits = sorted({f"{r.facts['split']} (stage {r.facts['stage']})" for r in rows if "split" in r.facts})
    cands = sorted({c for r in rows for c in r.facts.get("candidates", [])})
    users = []
    for ds in spec.datasets:
        per_group = {}
        for r in rows:
            if r.dataset == ds:
                for g, n in r.facts.get("n_users", {}).items():
                    per_group.setdefault(g, []).append(n)
        if per_group:
            text = ", ".join(f"{g} {np.mean(v):.0f}" for g, v in per_group.items())
            users.append(f"{ds}: {text}" if multi else text)
    header = [
        f"scale **{scale.name}**",
        f"backbone {', '.join(backbones) or '(no finished run)'}",
        f"seeds {', '.join(map(str, scale.seeds))}",
        f"users per group {'; '.join(users) or '–'} (evaluated, mean over runs and seeds)",
        f"eval_mode {spec.eval_mode}" + (f" ({', '.join(cands)} candidates)" if cands else ""),
        f"split {', '.join(splits) or '–'}: the last stage's own",
    ]
    lines = [f"## {spec.title}", "", f"Spec `{spec.path.name}`. Paper numbers: {spec.paper}", "",
             " · ".join(header) + f". The recsim columns are this scale's runs ({rel}/), not the paper's setting.",
             ""]
    if scale.warning:
        lines += [f"> **{scale.warning}**", ""]
    cols = _columns(spec)
    head = ["run"] + (["dataset"] if multi else [])
    for _, label, _ in cols:
        head += [f"{label} paper", f"{label} recsim", "Δ"]
    lines += [_md_row(head + ["source"]), _md_row(["---"] * len(head[: 2 if multi else 1]) + ["---:"] * (3 * len(cols)) + ["---"])]
    footnotes = []
    for r in rows:
        n_done = len(r.facts["dirs"])
        seeds = _seed_range(scale.seeds)
        source = f"`{r.dataset}/{r.run.name}_s{seeds}` ({n_done}/{len(scale.seeds)} done)"
        if "error" in r.facts:
            source += f"; ERROR: {r.facts['error']}"
        if r.run.paper_source:
            footnotes.append(f"{r.run.label}: paper numbers from {r.run.paper_source}.")
            source += f"; paper: see note {len(footnotes)}"
        cells = [r.run.label] + ([r.dataset] if multi else [])
        for key, _, quality in cols:
            c = r.cells[key]
            cells += [_fmt_paper(c.paper, quality), _fmt_ours(c, quality), _fmt_delta(c, quality)]
        lines.append(_md_row(cells + [source]))
    lines.append("")
    for i, text in enumerate(footnotes, 1):
        lines.append(f"{i}. {text}")
    if footnotes:
        lines.append("")
    if spec.note:
        lines += [f"Protocol notes: {spec.note}", ""]
    if spec.paper_claims:
        lines += ["The paper's other claims for this table (not tabulated): " + "; ".join(spec.paper_claims) + ".", ""]
    return "\n".join(lines)


def long_rows(spec: Spec, scale: Scale, rows: list[TableRow]) -> list[dict]:
    out = []
    for r in rows:
        for key, label, quality in _columns(spec):
            c = r.cells[key]
            group, _, metric = key.partition("/") if quality else (EFFICIENCY_GROUP, "", key)
            out.append(dict(
                scale=scale.name, spec=spec.key, run=r.run.name, label=r.run.label, dataset=r.dataset,
                group=group, metric=metric, unit="" if quality else EFFICIENCY[key][2],
                split=r.facts.get("split", "") if quality else "update stages",
                paper=c.paper, recsim_mean=c.mean, recsim_ci_low=c.ci_low, recsim_ci_high=c.ci_high,
                n_seeds=c.n_seeds, ci_method=c.ci_method, delta=c.delta,
                run_dirs=";".join(str(d) for d in r.facts["dirs"]),
            ))  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------ plots


def plot_radar(spec: Spec, scale: Scale, rows: list[TableRow], path: Path) -> bool:
    """One polygon per run (x dataset) over the axes group x metric; False when there is nothing to draw."""
    metrics = spec.radar_metrics or spec.metrics
    axes = [f"{g}/{m}" for g in spec.groups for m in metrics]
    polys = []
    for r in rows:
        values = [r.cells.get(a, Cell()).mean for a in axes]
        if all(not math.isnan(v) for v in values):
            label = f"{r.run.label} ({r.dataset})" if len(spec.datasets) > 1 else r.run.label
            polys.append((label, values))
    if len(axes) < 3 or not polys:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    angles = np.linspace(0, 2 * np.pi, len(axes), endpoint=False)
    closed = np.append(angles, angles[0])
    fig, ax = plt.subplots(figsize=(6.5, 6.5), subplot_kw={"projection": "polar"})
    for label, values in polys:
        ax.plot(closed, values + values[:1], marker="o", linewidth=1.5, label=label)
        ax.fill(closed, values + values[:1], alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels([a.replace("/", " ") for a in axes])
    top = max(max(v) for _, v in polys)
    ax.set_ylim(0, top * 1.1 if top > 0 else 1)
    ax.set_title(f"{spec.key}: recsim, scale {scale.name}\n(mean over seeds {', '.join(map(str, scale.seeds))})",
                 fontsize=10)
    ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.12), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_cost(spec: Spec, scale: Scale, rows: list[TableRow], path: Path) -> bool:
    """Quality (U_A, the spec's first metric) vs total update time, one labelled point per run; the
    paper's points in a second panel when the paper gives both figures."""
    if "update_seconds" not in spec.efficiency:
        return False
    group = "U_A" if "U_A" in spec.groups else spec.groups[0]
    qkey = f"{group}/{spec.metrics[0]}"
    ours, paper = [], []
    for r in rows:
        label = f"{r.run.label} ({r.dataset})" if len(spec.datasets) > 1 else r.run.label
        q, t = r.cells.get(qkey, Cell()), r.cells["update_seconds"]
        if not (math.isnan(q.mean) or math.isnan(t.mean)):
            ours.append((label, t.mean, q))
        if q.paper is not None and t.paper is not None:
            paper.append((label, t.paper, q.paper))
    if not ours:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if paper else 1
    fig, axs = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax = axs[0][0]
    for label, x, q in ours:
        err = None if math.isnan(q.ci_low) else [[q.mean - q.ci_low], [q.ci_high - q.mean]]
        ax.errorbar([x], [q.mean], yerr=err, fmt="o", capsize=3)
        ax.annotate(label, (x, q.mean), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("update time (min, all update rounds)")
    ax.set_ylabel(f"{group} {spec.metrics[0]}")
    ax.set_title(f"recsim, scale {scale.name}", fontsize=10)
    if paper:
        ax2 = axs[0][1]
        for label, x, y in paper:
            ax2.plot([x], [y], "s", color="tab:gray")
            ax2.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax2.set_xlabel("update time (min)")
        ax2.set_ylabel(f"{group} {spec.metrics[0]}")
        ax2.set_title("the paper's numbers", fontsize=10)
    fig.suptitle(f"{spec.key}: quality vs update cost", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------- report


LEGEND = (
    "Columns: `paper` = the paper's number, copied into `experiments/<spec>.yaml` from"
    " `shared/papers/README.md` §1 (`–`: the paper gives none); `recsim` = this scale's mean ± half-width"
    " of the 95% CI (Student-t over seeds; † = one seed: the run's bootstrap CI over users for quality"
    " metrics, none for cost); `Δ` = recsim − paper. Quality is the last stage's model on that stage's"
    " own split; update time is summed over the update stages and parameter counts are the largest"
    " update, in the paper's units (minutes, millions)."
)


def render(specs: Sequence[Spec], scale: Scale, out: Path, experiments: Path) -> tuple[Path, int]:
    """TABLES.md, tables.csv and the plots under ``<out>/<scale>/``; returns the TABLES.md path and the
    number of rows whose results could not be read (marked ERROR in the table)."""
    folder = Path(out) / scale.name
    folder.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    parts = [f"# Paper tables reproduced by recsim: scale `{scale.name}`", ""]
    if scale.warning:
        parts += [f"> **⚠ {scale.warning}**", ""]
    parts += [
        f"Generated {stamp} by `python -m recsim.reproduce --scale {scale.name}` from the run directories"
        f" under `{folder}/`. Scale: {scale.description} Overrides: `{' '.join(scale.overrides)}`;"
        f" seeds {', '.join(map(str, scale.seeds))}. Specs: `{experiments}`.", "", LEGEND, "",
    ]  # fmt: skip
    records, finished, errors = [], [], 0
    for spec in specs:
        rows = build_rows(spec, scale, out)
        parts.append(render_spec(spec, scale, rows, folder))
        plots = []
        if plot_radar(spec, scale, rows, folder / f"{spec.key}_radar.png"):
            plots.append(f"![{spec.key} radar]({spec.key}_radar.png)")
        if plot_cost(spec, scale, rows, folder / f"{spec.key}_cost.png"):
            plots.append(f"![{spec.key} quality vs cost]({spec.key}_cost.png)")
        if plots:
            parts += [" ".join(plots), ""]
        records += long_rows(spec, scale, rows)
        errors += sum("error" in r.facts for r in rows)
        finished += [d for r in rows for d in r.facts["dirs"]]
    finished = sorted(set(finished), key=str)
    if finished:  # recsim.tables' own view: every metric and setting, no paper numbers
        try:
            agg = aggregate(collect(finished))
            wanted = dict.fromkeys(m for s in specs for m in [*s.radar_metrics, *s.metrics, *s.efficiency])
            shown = [m for m in wanted if m in set(agg["metric"])] or None
            every = render_markdown(agg, metrics=shown)
            parts += ["## Appendix: these runs in `python -m recsim.tables`' view (last stage, every split)", "",
                      every]
        except (ValueError, FileNotFoundError) as err:
            parts += [f"(recsim.tables view unavailable: {err})", ""]
    md = folder / "TABLES.md"
    md.write_text("\n".join(parts))
    pd.DataFrame(records).to_csv(folder / "tables.csv", index=False)
    return md, errors


# -------------------------------------------------------------------------------------------- CLI


def _parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recsim.reproduce",
        description="Run the paper tables' runs at one scale and render ours beside the paper's numbers.",
    )
    parser.add_argument("--scale", required=True, help="smoke, cpu or paper (experiments/scales.yaml)")
    parser.add_argument("--tables", type=_parse_list, help="comma list of spec names (file stems); default all")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default outputs/reproduce)")
    parser.add_argument("--experiments", type=Path, default=DEFAULT_EXPERIMENTS, help="folder of table specs")
    parser.add_argument("--jobs", type=int, default=1, help="runs launched in parallel (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of unfinished runs, run nothing")
    parser.add_argument("--render-only", action="store_true", help="launch nothing; tabulate the finished runs")
    args = parser.parse_args(argv)

    try:
        specs = load_specs(args.experiments)
        scales = load_scales(args.experiments)
    except (SpecError, OSError) as err:
        print(f"recsim.reproduce: error: {err}", file=sys.stderr)
        return 2
    if args.scale not in scales:
        print(f"recsim.reproduce: error: unknown scale {args.scale!r}; known: {', '.join(scales)}", file=sys.stderr)
        return 2
    scale = scales[args.scale]
    if args.tables:
        names = {s.key for s in specs}
        unknown = [t for t in args.tables if t not in names]
        if unknown:
            print(f"recsim.reproduce: error: unknown tables {unknown}; known: {', '.join(sorted(names))}",
                  file=sys.stderr)
            return 2
        specs = [s for s in specs if s.key in args.tables]

    jobs = plan(specs, scale, args.out)
    if args.dry_run:
        todo = [j for j in jobs if not j.done]
        print(f"# scale {scale.name}: {len(jobs)} runs ({len({(j.run, j.dataset) for j in jobs})} settings x"
              f" {len(scale.seeds)} seeds) for {', '.join(s.key for s in specs)}; {len(jobs) - len(todo)} done")
        for job in jobs:
            print(f"# done: {job.dir}" if job.done else job.command())
        return 0

    failed = []
    if not args.render_only:
        if "RECSIM_DATA" not in os.environ:
            print("recsim.reproduce: note: RECSIM_DATA is not set, so runs read ./data (make reproduce-tables"
                  " sets it to ../shared/data)", file=sys.stderr)
        # SIGTERM as an exception: subprocess.run then kills the run in flight instead of orphaning it
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            failed = run_jobs(jobs, args.jobs)
        finally:
            signal.signal(signal.SIGTERM, previous)
    try:
        md, errors = render(specs, scale, args.out, args.experiments)
    except (ValueError, FileNotFoundError) as err:
        print(f"recsim.reproduce: error while rendering: {err}", file=sys.stderr)
        return 1
    print(md.read_text())
    print(f"recsim.reproduce: wrote {md}, {md.with_name('tables.csv')} and the plots", file=sys.stderr)
    if failed:
        print(f"recsim.reproduce: {len(failed)} run(s) failed: " + ", ".join(str(j.dir) for j in failed),
              file=sys.stderr)
    if errors:
        print(f"recsim.reproduce: {errors} table row(s) could not be read (marked ERROR)", file=sys.stderr)
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
