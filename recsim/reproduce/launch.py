"""Jobs: one per run x dataset x seed, its run directory, and launching the unfinished ones.

The run directory is ``<out>/<scale>/<dataset>/<run>_s<seed>``; a directory holding ``DONE`` is skipped,
anything else is (re)launched as ``python -m recsim.run ... hydra.run.dir=<dir>`` with its output in
``<dir>.log``. A failed run is reported and the others carry on.
"""

from __future__ import annotations

import datetime as _dt
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from recsim.reproduce.spec import Scale, Spec

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


def missing_data(dataset: str) -> str | None:
    """The first source file of dataset config `dataset` that is not on disk (data_dir from RECSIM_DATA, as the
    runs read it), named with where to get it; None when every file is there (or the data is simulated)."""
    from omegaconf import OmegaConf

    from recsim.data.load import READERS, default_data_dir

    path = Path(__file__).resolve().parents[1] / "conf" / "dataset" / f"{dataset}.yaml"
    if not path.is_file():
        return None  # not a packaged dataset name: the run itself reports what is wrong
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw["data_dir"] = default_data_dir()
    reader = READERS.get(raw.get("reader"))
    if reader is None:
        return None
    try:
        absent = [f for f in reader.sources(raw) if not Path(f).exists()]
    except Exception as err:  # a reader that checks its folder itself
        return str(err)
    if not absent:
        return None
    return f"{absent[0]} not found (where to download it: the header of recsim/conf/dataset/{path.name})"


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
                    if run.reads is not None:  # a row of another run's directories
                        continue
                    d = run_dir(out, scale.name, ds, run.name, seed)
                    scale_overrides = scale.overrides
                    if run.backbone:  # a classic baseline: its own backbone instead of the scale's
                        scale_overrides = [o for o in scale.overrides if not o.startswith(("backbone=", "backbone."))]
                        scale_overrides.append(f"backbone={run.backbone}")
                    overrides = [*run.overrides, f"dataset={ds}", *scale_overrides, f"seed={seed}"]
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
    absent = {ds: missing_data(ds) for ds in sorted({j.dataset for j in jobs if not j.done})}
    for ds, why in absent.items():
        if why:  # never another dataset in its place: the table says "data not present"
            n = sum(j.dataset == ds and not j.done for j in jobs)
            print(f"recsim.reproduce: skipping {n} run(s) on {ds}: {why}", file=sys.stderr)
    todo = [j for j in jobs if not j.done and not absent.get(j.dataset)]
    for job in jobs:
        if job.done:
            stale = _stale(job)
            if stale is not None:
                print(f"recsim.reproduce: warning: {job.dir} is DONE but was launched with {stale}, not"
                      f" {job.overrides}; its numbers are used as they are (delete it to rerun)", file=sys.stderr)
    done = sum(j.done for j in jobs)
    print(f"recsim.reproduce: {len(jobs)} runs, {done} already done, {len(jobs) - done - len(todo)} skipped (no data),"
          f" launching {len(todo)}", file=sys.stderr)
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
