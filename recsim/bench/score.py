"""`score`: users/s of candidate scoring, the runner's evaluation path.

What is timed is the call `recsim.runner.evaluate_stage` makes, `method.score_candidates(rec, samples,
candidates, cfg.eval.batch_size)`, on the first `bench.users` users of stage 0's test split (every group,
in the split's order) with their stored 1 + `eval.negatives` candidates, after `bench.warmup` untimed calls
on one `eval.batch_size` batch. `bench.profile=<dir>` then profiles `bench.profile_steps` calls on one
batch (recsim.bench.profile). The model is the freshly built one (a new adapter): scoring costs the same
whatever the adapter's values. Peak memory covers the timed call only.

`bench.agreement=true` (LLMs) scores the same users again with `recipe.scoring.fp32=true`, the exact fp32
pass, timed as well, and reports how the configured scores (bf16 autocast on a GPU) compare: the share of
users whose top-10 keeps its order (and its set), the largest and the mean absolute difference. The
issue's bar for bf16: identical top-10 for >= 99% of users, differences within 1e-2.
"""

from __future__ import annotations

import numpy as np

from recsim.bench.report import fmt, weights_dtype
from recsim.bench.timing import timed


def split_users(protocol, users: int):
    """(samples, candidates [n, C]) of the first `users` users of stage 0's test split, groups in order."""
    split = protocol.splits[protocol.stages[0].eval_split]
    groups = [g for g, s in split.samples.items() if s]
    samples = [s for g in groups for s in split.samples[g]][:users]
    candidates = np.concatenate([split.candidates[g] for g in groups])[:users] if groups else np.zeros((0, 0))
    if not samples:
        raise SystemExit(f"recsim.bench: split {split.name} has no users to score")
    return split.name, samples, candidates


def top_k_agreement(scores: np.ndarray, reference: np.ndarray, k: int = 10) -> dict:
    """How `scores` [n, C] rank like `reference`: the share of rows whose top-k keeps its order, and its set
    (ties broken by candidate position, as a stable sort does), the largest and mean absolute difference."""
    top = lambda s: np.argsort(-s, axis=1, kind="stable")[:, :k]
    mine, theirs = top(scores), top(reference)
    same_set = [set(a) == set(b) for a, b in zip(mine, theirs)]
    diff = np.abs(scores - reference)
    return {"k": k, "top_k_order_kept": float((mine == theirs).all(1).mean()),
            "top_k_set_kept": float(np.mean(same_set)), "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean())}


def run(cfg, bench: dict) -> dict:
    from recsim.methods import build_method
    from recsim.protocols.prepare import prepare_protocol
    from recsim.runner import build_recommender, compute_device
    from recsim.utils.resources import UpdateMeter

    prepared = prepare_protocol(cfg)
    rec = build_recommender(cfg, prepared.data)
    method = build_method(cfg.method)
    method.setup(rec, prepared.protocol)
    device = compute_device(cfg)
    rec.module.to(device)
    split, samples, candidates = split_users(prepared.protocol, bench["users"])
    batch = int(cfg.eval.batch_size)
    for _ in range(bench["warmup"]):
        method.score_candidates(rec, samples[:batch], candidates[:batch], batch)
    with UpdateMeter() as meter:
        scores, seconds = timed(lambda: method.score_candidates(rec, samples, candidates, batch), device)
    agreement = None
    if bench["agreement"]:
        scoring = getattr(rec.module, "scoring_cfg", None)
        if scoring is None:
            raise SystemExit("recsim.bench: bench.agreement compares LLM scoring passes; this backbone has none")
        configured, scoring.fp32 = scoring.get("fp32", False), True
        try:
            method.score_candidates(rec, samples[:batch], candidates[:batch], batch)  # warm-up of the fp32 pass
            exact, fp32_seconds = timed(lambda: method.score_candidates(rec, samples, candidates, batch), device)
        finally:
            scoring.fp32 = configured
        agreement = {**top_k_agreement(scores, exact), "fp32_seconds": fp32_seconds,
                     "fp32_users_per_s": len(samples) / fp32_seconds}
    profile = None
    if bench["profile"]:  # after the timed call, so the profiler's overhead never reaches the timing
        from recsim.bench.profile import Profiled

        runs = bench["profile_steps"]
        with Profiled(bench["profile"], device, runs) as profiled:
            for _ in range(runs):
                method.score_candidates(rec, samples[:batch], candidates[:batch], batch)
        profile = profiled.summary
    n, width = candidates.shape
    return {"profile": profile, "agreement": agreement, "split": split, "users": n, "users_requested": bench["users"],
            "candidates_per_user": width,
            "warmup_batches": bench["warmup"], "seconds": seconds, "users_per_s": n / seconds,
            "candidates_per_s": n * width / seconds, "method": cfg.method.name,
            "weights_dtype": weights_dtype(rec.module), "peak_mem_mb": meter.peak_mb, "memory_kind": meter.memory_kind}


def rows(f: dict) -> list[tuple[str, str]]:
    fewer = f" (the split has {f['users']} of {f['users_requested']} requested)" if f["users"] < f["users_requested"] else ""
    return [
        ("timed", f"{f['users']} users x {f['candidates_per_user']} candidates of {f['split']}{fewer}, "
                  f"after {f['warmup_batches']} warm-up batches"),
        ("seconds", fmt(f["seconds"], "s")),
        ("users/s", fmt(f["users_per_s"])),
        ("candidates/s", fmt(f["candidates_per_s"])),
        ("peak memory", f"{fmt(f['peak_mem_mb'], 'MiB')} ({f['memory_kind']})"),
    ] + ([] if not f.get("agreement") else [
        ("fp32 users/s", fmt(f["agreement"]["fp32_users_per_s"])),
        ("vs fp32", f"top-{f['agreement']['k']} order kept {f['agreement']['top_k_order_kept']:.1%}, set kept "
                    f"{f['agreement']['top_k_set_kept']:.1%}, max |diff| {f['agreement']['max_abs_diff']:.2g}, "
                    f"mean {f['agreement']['mean_abs_diff']:.2g}"),
    ])
