"""Wall time of one update (round 1) of several method variants in one process, without stage 0 or evaluation.

Each variant starts from the same model (the initial adapter: an update's cost does not depend on the
weights) and runs the runner's own `fit_stage`, so the figure is the runner's `update_seconds`: the
method's data choice (EvoRec's filter), its preparation (Locate) and the fit. Variants run in the order
given, `--repeat` times round-robin, so a load that drifts over the run hits every variant alike.

    python benchmarks/update_cost.py --variants finetune evorec:false evorec:auto evorec:true -- \
        backbone=smollm2_135m dataset=synthetic trainer.max_train_samples=32 method.kl_samples=28

A variant is `method[:cache_frozen][/override...]` (e.g. `evorec/method.lam=0`); overrides after `--` go to
every variant (method.* ones only to the methods that have the key).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import lightning as L
    import torch

    from recsim.bench.settings import compose_run_config
    from recsim.methods import build_method
    from recsim.protocols.prepare import prepare_protocol
    from recsim.runner import _stage_seed, build_recommender, fit_stage

    common = [o for o in args.overrides if not o.startswith("method.")]
    method_keys = [o for o in args.overrides if o.startswith("method.")]
    rec, protocol = None, None
    out = Path(tempfile.mkdtemp(prefix="update_cost_"))
    for rep in range(args.repeat):
        for variant in args.variants:
            head, *extra = variant.split("/")
            name, _, cache = head.partition(":")
            cfg = compose_run_config([f"method={name}", *common], str(out))
            own = [o for o in method_keys if o.split("=")[0][len("method."):].split(".")[0] in cfg.method]
            cfg = compose_run_config([f"method={name}", *common, *own,
                                      *([f"method.kl.cache_frozen={cache}"] if cache else []), *extra], str(out))
            if rec is None:
                prepared = prepare_protocol(cfg)
                protocol = prepared.protocol
                rec = build_recommender(cfg, prepared.data)
            rec.reset_to_initial()
            method = build_method(cfg.method)
            method.setup(rec, protocol)
            stage = protocol.stages[1]
            L.seed_everything(_stage_seed(cfg.seed, stage.index), workers=True)
            eff = fit_stage(cfg, stage, rec, method, out / f"{rep}_{variant}", None)
            row = {"variant": variant, "repeat": rep, "update_seconds": round(eff["update_seconds"], 1),
                   "train_samples": eff["train_samples"], "filter_seconds": round(eff.get("filter_seconds", 0.0), 1),
                   "kl_samples": eff.get("kl_samples"), "kl_pool": eff.get("kl_pool"),
                   "threads": torch.get_num_threads()}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
