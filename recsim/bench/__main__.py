"""`python -m recsim.bench <what> [hydra overrides...] [bench.KEY=VALUE...]`: run one benchmark, print its
table, write its JSON. Bad `bench.*` values stop it before torch is imported (exit 1, the key named);
no or an unknown benchmark prints the usage (exit 2)."""

from __future__ import annotations

import importlib
import sys
import tempfile
import time

import recsim  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
from recsim.bench.settings import DEFAULTS, _show, compose_run_config, split_overrides
from recsim.schema import ConfigError

BENCHMARKS = {
    "train": "optimiser steps of the training path: samples/s, real and padded tokens/s, effective batch, MFU, peak memory",
    "score": "candidate scoring (method.score_candidates): users/s for 1 + eval.negatives candidates, peak memory",
    "fullrank": "whole-catalogue ranking (score_all + ranks_full) of a classic model, or bench.synthetic_scores=true",
    "decode": "per-user time of the decoders (beam top-10/20, grounding, candidates, L2D-G, L2D-L, ID head) beside "
              "Recall@20/@50 and the speed-up vs beam 10",
}
USAGE = "\n".join([
    "usage: python -m recsim.bench {" + ",".join(BENCHMARKS) + "} [hydra overrides...] [bench.KEY=VALUE...]",
    "", "benchmarks:", *(f"  {name:<9} {text}" for name, text in BENCHMARKS.items()),
    "", "overrides compose the config `python -m recsim.run` sees (e.g. backbone=tiny_llama dataset=synthetic);",
    "bench keys and defaults: " + ", ".join(f"{k}={_show(v)}" for k, v in DEFAULTS.items()),
    "example: python -m recsim.bench train backbone=tiny_llama trainer.batch_size=16 bench.steps=50",
])


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if not argv or argv[0] not in BENCHMARKS:
        problem = "no benchmark given" if not argv else f"unknown benchmark {argv[0]!r}"
        print(f"recsim.bench: {problem}\n{USAGE}", file=sys.stderr)
        return 2
    what, overrides = argv[0], argv[1:]
    if {"-m", "--multirun"} & set(overrides):
        raise SystemExit("recsim.bench: one configuration per benchmark (no -m/--multirun sweeps)")
    from hydra.errors import HydraException

    try:
        bench, overrides = split_overrides(overrides)
        with tempfile.TemporaryDirectory(prefix="recsim-bench-") as scratch:  # the fit's Lightning logs
            cfg = compose_run_config(overrides, scratch)
            module = importlib.import_module(f"recsim.bench.{what}")
            figures = module.run(cfg, bench)
    except (ConfigError, HydraException) as exc:
        raise SystemExit(f"recsim.bench: {exc}") from None
    if figures is None:  # a rank > 0 of a multi-device fit: rank 0 reports for all
        return 0
    from recsim.bench.report import essentials, print_table, write_json

    record = {"benchmark": what, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": essentials(cfg, overrides),
              "bench": bench, "figures": figures}
    c = record["config"]
    model = "random scores" if figures.get("mode") == "synthetic_scores" else f"{c['backbone']} on {c['dataset']}"
    print_table(f"recsim.bench {what}: {model}, {c['device']}, precision {c['precision']}, "
                f"weights {figures.get('weights_dtype', 'n/a')}, "
                f"batch {c['batch_size']}, compile {c['compile']}", module.rows(figures))
    path = write_json(what, bench["out"], record)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
