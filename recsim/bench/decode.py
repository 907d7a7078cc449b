"""`decode`: per-user time of the decoders (recsim.decoders) beside the quality each reaches on the same users.

Every decoder in `DECODERS` (label, decoder name, settings override) that `bench.decoders` selects ranks the same
first `bench.users` users of stage 0's test split (every group, in the split's order) through its own
`rank(method, rec, samples, candidates)`, the call `recsim.runner.evaluate_stage` makes, so the time is the
decoder's whole cost: prompts, the model's steps, the trie or the nearest-item search, the ranks. One process, one
model: beam (beam `recipe.beam.beam_size`, top-10 and top-20), grounding, candidate likelihood, L2D-G, L2D-L and
the ID head. A decoder recsim.decoders does not register is skipped with a message (its row says why).

Per decoder, in this order:
    prepare   `decoder.prepare(method, rec, protocol, stage, None)`, timed apart (prepare_seconds), outside the
              timed region: what a decoder derives from the stage's training samples (L2D's memory: one pass per
              sample; the ID head's training). The memory build's own seconds, also per 100k entries, are
              reported; L2D-G, L2D-L and the ID head share one memory when their memory settings agree (built
              once, by the first of them: memory_built_by). Nothing is read from or saved to a stage folder, so
              the memory is always built here.
    setup     one call on one user, timed apart (setup_seconds): it builds what a decoder keeps per model (the
              beam's trie, grounding's item embeddings of the whole catalogue, cached on the recommender)
    warm-up   `bench.warmup` calls on one batch (the decoder's `recipe.<name>.batch_size` or `decoder.batch_size`,
              else `eval.batch_size`)
    timed     `bench.repeats` calls on all the users, each synchronised on the device (recsim.bench.timing):
              ms/user = 1000 * seconds / users; the median and the min / max over the repeats (with
              bench.warmup=0 the first repeat pays the first full batch's allocations)
Recall / NDCG @10, @20 and @50, each where a decoder's list is that long, come from the first timed call's ranks;
every repeat must give the same ranks (reported). The decoders whose cost hardly depends on the list's length
(grounding, L2D, the ID head) list `LONG_LIST` items, so their Recall@20 and @50 exist beside beam@20's Recall@20.
The speed-up of a decoder is beam@10's median ms/user over its own (> 1: faster than the top-10 beam). For the
beam, every `constrained_beam_search` call of the timed repeats is recorded (`_recorded_beam_calls`): its steps,
finished hypotheses and the seconds of its timer's three parts (trie masks and lookups, model steps, selection and
cache reordering; CUDA synchronised around each), so the trie's share of decode time is trie_seconds / (trie +
model + search seconds). Peak memory covers each decoder's timed repeats (on CPU the process's RSS, which includes
the model).

The model: the freshly built one (a new adapter: decoding costs the same whatever its values, but its quality is
the untrained model's; L2D's memory is stage 0's), or with `bench.run_dir=<finished run>` the model after stage
`bench.stage` of that run (`recsim.runs.load_stage`: its own config, protocol and weights). A backbone built from
config (`backbone.source: tiny`) has random weights: its figures time the shape and the output says its Recall and
NDCG mean nothing. A Llama-3.2-1B shape, as the training benchmarks time it (benchmarks/gpu_bench.sh, L1B):
    python -m recsim.bench decode recipe=generative dataset=games backbone=tiny_llama
        backbone.name=llama32_1b_shape_random backbone.dtype=bfloat16 backbone.tiny.hidden_size=2048
        backbone.tiny.intermediate_size=8192 backbone.tiny.num_layers=16 backbone.tiny.num_heads=32
        backbone.tiny.num_kv_heads=8
(SmolLM2's tokenizer and vocabulary: the 1B model's layers and width, not its 128k-token head).
With a run, the composed config is replaced in place by the run's (so the table's title and the JSON name the run's
model); command-line overrides of decoding settings (`INFERENCE_KEYS`, the `decoder` group's included) are applied
to the run's config, any other override that disagrees with the run is refused.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

# torch-free at import: recsim.bench.settings reads DECODERS' labels before torch may load (recsim.bench.report,
# .score and .timing import torch, so they are imported where they are used)

# (label, decoder name in recsim.decoders.DECODERS, settings override applied to a copy of the config): one line
# per decoder; bench.decoders selects by label, the table keeps this order. beam@10 is the speed-up reference.
LONG_LIST = 50  # items listed by the decoders whose cost hardly grows with the list (Recall@50 needs 50)
DECODERS = [
    ("beam@10", "beam", {"recipe.beam.top_k": 10}),
    ("beam@20", "beam", {"recipe.beam.top_k": 20}),
    ("grounding", "grounding", {"recipe.grounding.top_k": LONG_LIST}),
    ("candidates", "candidates", {}),
    ("l2d_global", "l2d_global", {"decoder.top_k": LONG_LIST}),
    ("l2d_local", "l2d_local", {"decoder.top_k": LONG_LIST}),
    ("id_head", "id_head", {"decoder.top_k": LONG_LIST}),
]
DECODER_LABELS = [label for label, _, _ in DECODERS]
REFERENCE = "beam@10"
CUTOFFS = (10, 20, 50)
# overrides a finished run's config takes from the command line: they change how it decodes, not what it learnt
INFERENCE_KEYS = ("decoder.", "recipe.beam.", "recipe.grounding.", "recipe.scoring.kernel", "recipe.scoring.autocast",
                  "recipe.scoring.fp32", "recipe.scoring.compile", "recipe.scoring.pad_to_multiple_of",
                  "eval.batch_size", "trainer.accelerator", "trainer.devices", "trainer.progress_bar",
                  "paths.data_dir", "paths.cache_dir")


def decoder_config(cfg: DictConfig, name: str, settings: dict) -> DictConfig:
    """A copy of `cfg` with the entry's settings; a key whose section the recipe lacks is refused. `decoder.*` keys
    set the decoder's own settings (recsim.decoders.base.decoder_settings: the chosen `decoder=` group when it is
    this decoder, else conf/decoder/<name>.yaml), which the copy then carries as its `decoder` group."""
    out = copy.deepcopy(cfg)
    if any(key.startswith("decoder.") for key in settings):
        from recsim.decoders.base import decoder_settings

        with open_dict(out):
            out.decoder = decoder_settings(out, name)
    for key, value in settings.items():
        section = key.rsplit(".", 1)[0]
        if OmegaConf.select(out, section) is None:
            raise SystemExit(f"recsim.bench decode: {key} needs {section} in the config (recipe=generative has "
                             f"recipe.beam and recipe.grounding)")
        OmegaConf.update(out, key, value, merge=False)
    return out


def cutoffs(decoder) -> list[int]:
    """The K of Recall@K / NDCG@K a decoder's ranks support: catalogue decoders up to their list length; the
    1 + negatives pool at 10 only (@20 of 30 candidates is near 1 whatever the model, and says little)."""
    if decoder.pool == "catalogue":
        return [k for k in CUTOFFS if k <= decoder.top_k()]
    return [k for k in CUTOFFS if k == 10 and k <= 1 + int(decoder.cfg.eval.negatives)]


def warmup_batch(cfg: DictConfig, name: str) -> int:
    size = OmegaConf.select(cfg, f"recipe.{name}.batch_size")
    if size is None and (OmegaConf.select(cfg, "decoder.name") == name):
        size = OmegaConf.select(cfg, "decoder.batch_size")
    return int(size if size is not None else cfg.eval.batch_size)


@contextmanager
def _recorded_beam_calls():
    """Every `constrained_beam_search` call made inside, its stats (steps, hypotheses, the timer's seconds)
    appended to the yielded list. ConstrainedBeam.rank imports the function at call time and keeps its timer to
    itself, so wrapping the module attribute is how its figures reach the benchmark; a beam entry that records
    no call is an error (run()), so a change to that import cannot silently empty the figures."""
    import recsim.decoders.beam as beam

    calls, original = [], beam.constrained_beam_search

    def recorded(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(result[2])
        return result

    beam.constrained_beam_search = recorded
    try:
        yield calls
    finally:
        beam.constrained_beam_search = original


def beam_figures(calls: list[dict], repeats: int, users: int) -> dict:
    """Per timed repeat: decode steps (summed over batches), finished hypotheses, the timer's seconds; the trie's
    share of decode time = trie / (trie + model + search)."""
    total = lambda key: sum(c[key] for c in calls) / repeats
    trie, model, search = total("trie_seconds"), total("model_seconds"), total("search_seconds")
    decode = trie + model + search
    return {"calls_per_repeat": len(calls) / repeats, "steps": total("steps"), "hypotheses": total("hypotheses"),
            "hypotheses_per_user": total("hypotheses") / users, "trie_seconds": trie, "model_seconds": model,
            "search_seconds": search, "trie_share": trie / decode if decode > 0 else None,
            "model_share": model / decode if decode > 0 else None,
            "trie_per_search": trie / search if search > 0 else None}


def _leaves(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def run_overrides(cfg: DictConfig, run_cfg: DictConfig, run_dir: str) -> list[str]:
    """The command line's overrides (leaves where `cfg` differs from the default composition) to apply to the
    run's config: decoding settings are kept; any other that disagrees with the run's value is refused."""
    from recsim.bench.settings import compose_run_config

    default = _leaves(OmegaConf.to_container(compose_run_config([], cfg.paths.output_dir)))
    mine = _leaves(OmegaConf.to_container(cfg))
    theirs = _leaves(OmegaConf.to_container(run_cfg))
    missing = object()
    changed = {k: v for k, v in mine.items() if default.get(k, missing) != v}
    carried = [f"{k}={json.dumps(v)}" for k, v in changed.items() if k.startswith(INFERENCE_KEYS)]
    refused = [f"{k}={v!r} (the run has {theirs.get(k, 'no such key')!r})" for k, v in changed.items()
               if not k.startswith(INFERENCE_KEYS) and theirs.get(k, missing) != v]
    if refused:
        raise SystemExit(f"recsim.bench decode: bench.run_dir={run_dir}: the run's config.yaml decides the model, "
                         f"data and protocol; only decoding settings ({', '.join(INFERENCE_KEYS)}) may be "
                         "overridden. Refused:\n  " + "\n  ".join(refused))
    return carried


def _replace_in_place(cfg: DictConfig, new: DictConfig) -> None:
    with open_dict(cfg):
        for key in [k for k in cfg if k not in new]:
            del cfg[key]
        for key in new:
            cfg[key] = new[key]


def load_model(cfg: DictConfig, bench: dict):
    """(rec, method, protocol, stage, source) of a fresh model (stage 0) or of a finished run's stage (see the
    module docstring)."""
    from recsim.runner import compute_device

    if bench["run_dir"] is None:
        if bench["stage"] != -1:
            raise SystemExit(f"recsim.bench decode: bench.stage={bench['stage']} needs bench.run_dir (a fresh "
                             "model has no stages)")
        from recsim.methods import build_method
        from recsim.protocols.prepare import prepare_protocol
        from recsim.runner import build_recommender

        prepared = prepare_protocol(cfg)
        rec = build_recommender(cfg, prepared.data)
        method = build_method(cfg.method)
        method.setup(rec, prepared.protocol)
        rec.module.to(compute_device(cfg))
        return rec, method, prepared.protocol, prepared.protocol.stages[0], {"model": "fresh (untrained adapter)"}
    from recsim.runs import load_stage

    run_dir = Path(bench["run_dir"])
    if not (run_dir / "config.yaml").is_file():
        raise SystemExit(f"recsim.bench decode: bench.run_dir={run_dir}: no config.yaml (not a recsim run)")
    overrides = run_overrides(cfg, OmegaConf.load(run_dir / "config.yaml"), str(run_dir))
    try:
        loaded = load_stage(run_dir, bench["stage"], overrides)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"recsim.bench decode: bench.run_dir / bench.stage: {exc}") from None
    with open_dict(loaded.cfg):
        loaded.cfg.paths.output_dir = cfg.paths.output_dir
    _replace_in_place(cfg, loaded.cfg)
    return loaded.rec, loaded.method, loaded.protocol, loaded.stage, {
        "model": f"stage {loaded.stage.index} ({loaded.stage.name}) of {run_dir}", "run_dir": str(run_dir),
        "stage": loaded.stage.index, "stage_name": loaded.stage.name, "overrides": overrides}


def memory_figures(decoder, rec, built_by: dict, label: str) -> dict | None:
    """A latent decoder's memory: entries, build seconds (also per 100k entries), and which entry built it."""
    memory = getattr(decoder, "memory", None)
    if memory is None:
        return None
    stats = memory.stats(rec.num_items)
    return {"entries": int(stats["memory_entries"]), "items": int(stats["memory_items"]),
            "cold_items": int(stats["cold_items"]), "build_seconds": stats["memory_build_seconds"],
            "seconds_per_100k": stats["memory_seconds_per_100k"], "built_by": built_by.setdefault(memory.key, label)}


def skipped(label: str, name: str, why: str) -> dict:
    print(f"recsim.bench decode: skipping {label}: {why}")
    return {"label": label, "decoder": name, "skipped": why}


def measure(label: str, name: str, settings: dict, cfg, bench, rec, method, protocol, stage, samples, candidates,
            device, built_by: dict) -> dict:
    """One decoder's prepare, setup, warm-up, timed repeats, ranks and figures."""
    from recsim.bench.timing import timed
    from recsim.decoders import DECODERS, build_decoder
    from recsim.eval.metrics import per_user_metrics
    from recsim.utils.resources import UpdateMeter

    if name not in DECODERS:  # a decoder not (yet) registered: the others still run
        return skipped(label, name, f"decoder {name!r} is not registered in recsim.decoders.DECODERS "
                                    f"({', '.join(DECODERS)})")
    dcfg = decoder_config(cfg, name, settings)
    decoder = build_decoder(name, dcfg)
    if decoder.llm_only and rec.kind != "llm":
        raise SystemExit(f"recsim.bench decode: {label} ({name}) needs an LLM backbone; bench.decoders=[candidates] "
                         "for a classic model")
    # outside the timed region: L2D's memory, the ID head's training (no stage folder: always built here)
    _, prepare_seconds = timed(lambda: decoder.prepare(method, rec, protocol, stage, None), device)
    rank = lambda s, c: decoder.rank(method, rec, s, c)
    _, setup_seconds = timed(lambda: rank(samples[:1], candidates[:1]), device)
    batch = warmup_batch(dcfg, name)
    for _ in range(bench["warmup"]):
        rank(samples[:batch], candidates[:batch])
    seconds, ranks, counts = [], [], []
    with _recorded_beam_calls() as calls, UpdateMeter() as meter:
        for _ in range(bench["repeats"]):
            (r, c), s = timed(lambda: rank(samples, candidates), device)
            ranks.append(r)
            counts.append(c)
            seconds.append(s)
    if name == "beam" and not calls:
        raise RuntimeError("recsim.bench decode: the beam decoder made no recorded constrained_beam_search call "
                           "(did ConstrainedBeam.rank stop importing it from recsim.decoders.beam at call time?)")
    n = len(samples)
    ms = [1000 * s / n for s in seconds]
    ks = cutoffs(decoder)
    per_user = per_user_metrics(ranks[0], ks)
    metrics = {m: float(per_user[m].mean()) for k in ks for m in (f"Recall@{k}", f"NDCG@{k}")}
    return {"label": label, "decoder": name, "settings": settings, "pool": decoder.pool_label(),
            "list_length": decoder.top_k() if decoder.pool == "catalogue" else None, "warmup_batch": batch,
            "prepare_seconds": prepare_seconds, "memory": memory_figures(decoder, rec, built_by, label),
            "setup_seconds": setup_seconds, "seconds": seconds, "ms_per_user": float(np.median(ms)),
            "ms_per_user_min": min(ms), "ms_per_user_max": max(ms), "users_per_s": n / float(np.median(seconds)),
            "metrics": metrics, "same_ranks_every_repeat": all(np.array_equal(r, ranks[0]) for r in ranks),
            "found_share": float((ranks[0] >= 0).mean()), "counts": decoder.count_rows(counts[0]),
            "listed_per_user": counts[0]["listed"] / n if "listed" in counts[0] else None,
            "beam": beam_figures(calls, bench["repeats"], n) if calls else None,
            "peak_mem_mb": meter.peak_mb, "memory_kind": meter.memory_kind}


def run(cfg, bench: dict) -> dict:
    from recsim.bench.report import weights_dtype
    from recsim.bench.score import split_users
    from recsim.runner import compute_device

    selected = [entry for entry in DECODERS if entry[0] in bench["decoders"]]
    if bench["run_dir"] is None:  # settings the recipe lacks, refused before a model is built
        for _, name, settings in selected:
            decoder_config(cfg, name, settings)
    rec, method, protocol, stage, source = load_model(cfg, bench)
    device = compute_device(cfg)
    split, samples, candidates = split_users(protocol, bench["users"])
    built_by: dict = {}  # memory key -> the label whose prepare built it
    results = [measure(*entry, cfg, bench, rec, method, protocol, stage, samples, candidates, device, built_by)
               for entry in selected]
    timed_rows = [r for r in results if "skipped" not in r]
    if not timed_rows:
        raise SystemExit("recsim.bench decode: every selected decoder was skipped (see above)")
    reference = next((r for r in timed_rows if r["label"] == REFERENCE), None)
    for r in timed_rows:
        r["speedup_vs_beam10"] = reference["ms_per_user"] / r["ms_per_user"] if reference else None
    peak = max(timed_rows, key=lambda r: r["peak_mem_mb"])
    random_weights = OmegaConf.select(cfg, "backbone.source") == "tiny"
    quality = ("RANDOM WEIGHTS (a backbone built from config): Recall and NDCG are meaningless, the times are the "
               "shape's" if random_weights else "untrained adapter: Recall and NDCG are the untrained model's"
               if bench["run_dir"] is None else "the run's trained model")
    return {**source, "random_weights": random_weights, "quality": quality, "stage": stage.index,
            "stage_name": stage.name, "split": split, "users": len(samples), "users_requested": bench["users"],
            "warmup_batches": bench["warmup"], "repeats": bench["repeats"], "beam_size": int(cfg.recipe.beam.beam_size)
            if OmegaConf.select(cfg, "recipe.beam") is not None else None, "item_id": OmegaConf.select(cfg, "item_id.name"),
            "num_items": int(rec.num_items), "decoders": results, "weights_dtype": weights_dtype(rec.module),
            "peak_mem_mb": peak["peak_mem_mb"], "memory_kind": peak["memory_kind"]}


def _metric(r: dict, name: str) -> str:
    value = r["metrics"].get(name)
    return "n/a" if value is None else f"{value:.4f}"


def rows(f: dict) -> list[tuple[str, str]]:
    from recsim.bench.report import fmt

    fewer = f" (the split has {f['users']} of {f['users_requested']} requested)" if f["users"] < f["users_requested"] else ""
    head = (f"{'pool':<5} {'ms/user median [min, max]':<28} {'users/s':>8} {'R@10':>7} {'N@10':>7} {'R@20':>7} "
            f"{'R@50':>7} {'vs beam@10':>10}")
    timed = [r for r in f["decoders"] if "skipped" not in r]
    out = [("model", f"{f['model']}, item_id {f['item_id']}, {f['num_items']} items, beam_size {f['beam_size']}"),
           ("quality", f["quality"]),
           ("timed", f"{f['users']} users of {f['split']}{fewer}, {f['repeats']} repeats after {f['warmup_batches']} "
                     "warm-up batches"),
           ("decoder", head)]
    for r in f["decoders"]:
        if "skipped" in r:
            out.append((r["label"], f"skipped: {r['skipped']}"))
            continue
        spread = f"{r['ms_per_user']:.4g} [{r['ms_per_user_min']:.4g}, {r['ms_per_user_max']:.4g}]"
        speedup = "n/a" if r["speedup_vs_beam10"] is None else f"{r['speedup_vs_beam10']:.3g}x"
        out.append((r["label"], f"{r['pool']:<5} {spread:<28} {r['users_per_s']:>8.4g} {_metric(r, 'Recall@10'):>7} "
                                f"{_metric(r, 'NDCG@10'):>7} {_metric(r, 'Recall@20'):>7} {_metric(r, 'Recall@50'):>7} "
                                f"{speedup:>10}"))
    for r in timed:
        m = r["memory"]
        if m:
            built = "built here" if m["built_by"] == r["label"] else f"shared, built by {m['built_by']}"
            out.append((f"{r['label']} memory",
                        f"{m['entries']} entries of {m['items']} items ({m['cold_items']} cold), built in "
                        f"{fmt(m['build_seconds'], 's')} ({fmt(m['seconds_per_100k'], 's')} per 100k entries; "
                        f"{built}); prepare {fmt(r['prepare_seconds'], 's')}, outside the timed region"))
    for r in timed:
        b = r["beam"]
        if b:
            share = "n/a" if b["trie_share"] is None else f"{b['trie_share']:.1%}"
            out.append((f"{r['label']} search", f"trie {share} of decode time (trie {b['trie_seconds']:.3g} s, model "
                                                f"{b['model_seconds']:.3g} s, search {b['search_seconds']:.3g} s), "
                                                f"{b['steps']:g} decode steps, {b['hypotheses_per_user']:.4g} "
                                                "finished hypotheses/user per repeat"))
    for r in timed:
        same = "" if r["same_ranks_every_repeat"] else ", ranks DIFFER between repeats"
        listed = "" if r["listed_per_user"] is None else (
            f"{r['listed_per_user']:.3g} items listed/user of {r['list_length']}, short lists "
            f"{r['counts']['short_list_share']:.0%}, invalid {r['counts']['invalid_share']:.0%}; ")
        out.append((f"{r['label']} other", f"{listed}setup {fmt(r['setup_seconds'], 's')} (first call, 1 user), "
                                           f"peak {fmt(r['peak_mem_mb'], 'MiB')} ({r['memory_kind']}){same}"))
    return out
