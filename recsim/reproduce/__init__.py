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

The package, split along its seams: :mod:`~recsim.reproduce.spec` (specs and scales),
:mod:`~recsim.reproduce.launch` (jobs, run dirs, subprocesses), :mod:`~recsim.reproduce.cells` (runs
into table cells), :mod:`~recsim.reproduce.render` (TABLES.md, tables.csv), :mod:`~recsim.reproduce.plots`
and :mod:`~recsim.reproduce.__main__` (the command line). Everything public is re-exported here.
"""

from __future__ import annotations

import subprocess  # noqa: F401  (tests replace subprocess.run through recsim.reproduce.subprocess)

from recsim.reproduce import plots  # noqa: F401
from recsim.reproduce.cells import Cell, TableRow, build_rows, row_cells
from recsim.reproduce.launch import Job, launch, plan, run_dir, run_jobs
from recsim.reproduce.plots import plot_cost, plot_radar
from recsim.reproduce.render import LEGEND, long_rows, render, render_spec
from recsim.reproduce.spec import (
    DEFAULT_EXPERIMENTS,
    DEFAULT_OUT,
    EFFICIENCY,
    SCALES_FILE,
    RunSpec,
    Scale,
    Spec,
    SpecError,
    check_shared_runs,
    load_scales,
    load_spec,
    load_specs,
)

__all__ = [
    "DEFAULT_EXPERIMENTS", "DEFAULT_OUT", "EFFICIENCY", "LEGEND", "SCALES_FILE", "Cell", "Job", "RunSpec", "Scale",
    "Spec", "SpecError", "TableRow", "build_rows", "check_shared_runs", "launch", "load_scales", "load_spec",
    "load_specs", "long_rows", "main", "plan", "plot_cost", "plot_radar", "render", "render_spec", "row_cells",
    "run_dir", "run_jobs",
]  # fmt: skip


def __getattr__(name: str):
    # main lives in __main__.py; imported on first use only, so `python -m recsim.reproduce` does not find
    # recsim.reproduce.__main__ already imported (runpy warns about that)
    if name == "main":
        from recsim.reproduce.__main__ import main

        return main
    raise AttributeError(f"module 'recsim.reproduce' has no attribute {name!r}")
