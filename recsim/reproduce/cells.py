"""Reading finished runs into table cells: our mean +- 95% CI (recsim.tables.aggregate) beside the paper's.

Quality is the last stage's model on that stage's own split; efficiency sums update time over the update
stages (stage >= 1) and takes the largest update for parameter and memory figures, in the paper's units.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recsim.reproduce.launch import run_dir
from recsim.reproduce.spec import EFFICIENCY, RunSpec, Scale, Spec
from recsim.results import EFFICIENCY_GROUP
from recsim.tables import aggregate, collect

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

    Quality: rows of the run's eval_mode (else the spec's) at the highest stage, on that stage's own split, aggregated
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

    mode = run.eval_mode or spec.eval_mode
    quality = df[(df["eval_mode"] == mode) & (df["group"] != EFFICIENCY_GROUP) & (df["split"] != "R")]
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
                cell = cells.setdefault(key, Cell(paper=spec.paper_value(run.name, dataset, key)))
                cell.__dict__.update(_from_agg(row))
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
            dirs = [run_dir(out, scale.name, ds, run.source, s) for s in scale.seeds]
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
