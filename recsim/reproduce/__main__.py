"""`python -m recsim.reproduce`: the command line (see the package docstring)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from recsim.reproduce.launch import plan, run_jobs
from recsim.reproduce.render import render
from recsim.reproduce.spec import DEFAULT_EXPERIMENTS, DEFAULT_OUT, SpecError, load_scales, load_specs

def _parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recsim.reproduce",
        description="Run the paper tables' runs at one scale and render ours beside the paper's numbers.",
    )
    parser.add_argument("--scale", required=True, help="smoke, cpu, gpu or paper (experiments/scales.yaml)")
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
