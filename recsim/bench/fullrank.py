"""`fullrank`: users/s of whole-catalogue ranking (`rec.score_all` + `recsim.eval.metrics.ranks_full`).

With a classic backbone it times, on the first `bench.users` users of stage 0's test split with every
item the user touched before the target masked (exactly what `recsim.runner.evaluate_stage` masks):
  * the runner's path: `rec.score_all(samples)` (collate, forward, scores copied to the host as float64)
    then `ranks_full` on those host scores;
  * the device path: the module's `score_all` left on the device and ranked there by `ranks_full`
    (the same ranks: float32 scores widened to float64 compare alike, checked and reported).
The model is the freshly built one; ranking costs the same whatever its weights.

`bench.synthetic_scores=true` times `ranks_full` alone on a random [users, items + 1] float32 score matrix
built on the device, with random targets and `bench.history_len` random masked items per user as a 0-padded
[users, history_len] tensor (no data beyond the catalogue size, no model): the issue's target, 20,000 users
x 12,000 items in under 2 s on an H200, is `bench.synthetic_scores=true bench.users=20000 bench.items=12000`.
Each measurement follows `bench.warmup` untimed passes of the same work.
"""

from __future__ import annotations

import numpy as np
import torch

from recsim.bench.report import fmt, weights_dtype
from recsim.bench.timing import timed
from recsim.eval.metrics import ranks_full


def catalogue_size(cfg) -> int:
    """Items of the composed dataset (loaded, or read from its parquet cache)."""
    from recsim.data.load import load_dataset
    from recsim.protocols.base import EncodedData

    return EncodedData.from_data(load_dataset(cfg.dataset, cache_dir=cfg.paths.cache_dir)).num_items


def synthetic(cfg, bench: dict, device: torch.device) -> dict:
    items = bench["items"] or catalogue_size(cfg)
    users, hist = bench["users"], bench["history_len"]
    g = torch.Generator(device=device).manual_seed(int(cfg.seed))
    scores = torch.randn(users, items + 1, generator=g, device=device)  # [users, items + 1]
    targets = torch.randint(1, items + 1, (users,), generator=g, device=device)  # [users]
    history = torch.randint(1, items + 1, (users, hist), generator=g, device=device)  # [users, hist]
    for _ in range(bench["warmup"]):
        ranks_full(scores, targets, history)
    _, seconds = timed(lambda: ranks_full(scores, targets, history), device)
    return {"mode": "synthetic_scores", "users": users, "items": items, "history_len": hist,
            "warmup_passes": bench["warmup"], "seconds": seconds, "users_per_s": users / seconds,
            "seconds_on_device": seconds, "score_all_seconds": None, "rank_seconds": seconds}


def from_model(cfg, bench: dict, device: torch.device) -> dict:
    from recsim.bench.score import split_users
    from recsim.protocols.prepare import prepare_protocol
    from recsim.runner import build_recommender

    prepared = prepare_protocol(cfg)
    rec = build_recommender(cfg, prepared.data)
    if not rec.can_rank_all:
        raise SystemExit(f"recsim.bench: backbone={cfg.backbone.name} cannot rank the whole catalogue; fullrank "
                         "needs a classic backbone (sasrec, gru4rec, bpr_mf) or bench.synthetic_scores=true")
    rec.module.to(device)
    split, samples, _ = split_users(prepared.protocol, bench["users"])
    targets = np.array([s.target for s in samples])
    before = [prepared.data.sequences[s.user][: s.position] for s in samples]  # as evaluate_stage masks
    histories = rec.collate(samples)["history"]
    for _ in range(bench["warmup"]):
        ranks_full(rec.score_all(samples), targets, before)
        ranks_full(rec.module.score_all(histories), targets, before)
    full, score_s = timed(lambda: rec.score_all(samples), device)
    ranks, rank_s = timed(lambda: ranks_full(full, targets, before), device)
    on_device, device_score_s = timed(lambda: rec.module.score_all(histories), device)
    device_ranks, device_rank_s = timed(lambda: ranks_full(on_device, targets, before), device)
    n = len(samples)
    return {"mode": "model", "split": split, "users": n, "users_requested": bench["users"],
            "items": prepared.data.num_items, "warmup_passes": bench["warmup"],
            "score_all_seconds": score_s, "rank_seconds": rank_s, "seconds": score_s + rank_s,
            "users_per_s": n / (score_s + rank_s),
            "device_score_all_seconds": device_score_s, "device_rank_seconds": device_rank_s,
            "seconds_on_device": device_score_s + device_rank_s,
            "users_per_s_on_device": n / (device_score_s + device_rank_s),
            "same_ranks": bool(np.array_equal(ranks, device_ranks)), "weights_dtype": weights_dtype(rec.module)}


def run(cfg, bench: dict) -> dict:
    from recsim.runner import compute_device
    from recsim.utils.resources import UpdateMeter

    device = compute_device(cfg)
    with UpdateMeter() as meter:
        figures = (synthetic if bench["synthetic_scores"] else from_model)(cfg, bench, device)
    return {**figures, "device_type": device.type, "peak_mem_mb": meter.peak_mb, "memory_kind": meter.memory_kind}


def rows(f: dict) -> list[tuple[str, str]]:
    out = [("ranked", f"{f['users']} users x {f['items']} items ({f['mode']}), after {f['warmup_passes']} "
                      "warm-up passes")]
    if f["mode"] == "model":
        out += [("runner path", f"{fmt(f['seconds'], 's')} = score_all {fmt(f['score_all_seconds'], 's')} + "
                                f"ranks_full on host scores {fmt(f['rank_seconds'], 's')}"),
                ("users/s", fmt(f["users_per_s"])),
                (f"on the {f['device_type']}", f"{fmt(f['seconds_on_device'], 's')} = score_all "
                 f"{fmt(f['device_score_all_seconds'], 's')} + ranks_full {fmt(f['device_rank_seconds'], 's')}"),
                ("users/s on device", fmt(f["users_per_s_on_device"])),
                ("same ranks", str(f["same_ranks"]))]
    else:
        out += [("ranks_full", f"{fmt(f['seconds'], 's')} on the {f['device_type']}"),
                ("users/s", fmt(f["users_per_s"]))]
    return out + [("peak memory", f"{fmt(f['peak_mem_mb'], 'MiB')} ({f['memory_kind']}, whole benchmark)")]
