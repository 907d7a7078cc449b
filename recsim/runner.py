"""The continual loop: stages are an outer loop inside one job (a fresh Trainer per stage).

After every stage each evaluation split is scored, filling R[i, j] (model after stage i, split of
stage j). Each finished stage is published atomically (adapter, method state, results, DONE); rerunning
the same command on the same output dir resumes after the last finished stage. Stage-local seeds
(seed, stage index) make a resumed run replay exactly what an uninterrupted one does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from recsim.eval.continual import continual_summary
from recsim.eval.metrics import ranks_full, summarise
from recsim.methods import build_method
from recsim.protocols.base import EncodedData, EvalSplit
from recsim.protocols.holdout import HOLDOUT, stage_key as holdout_stage_key
from recsim.protocols.prepare import prepare_protocol, save_prepared
from recsim.results import RANKS_FILE, RESULT_COLUMNS, load_ranks, matrix_markdown, render_run_markdown, save_ranks  # noqa: F401
from recsim.selection import BestOnValidation
from recsim.utils.io import publish_dir, write_csv, write_json, write_text
from recsim.utils.resources import UpdateMeter, reuse_freed_memory
from recsim.training import build_trainer, uses_gpu
from recsim.utils.state import load_state, save_state

log = logging.getLogger(__name__)


def build_recommender(cfg: DictConfig, data: EncodedData):
    kind = cfg.backbone.kind
    if kind == "llm":
        from recsim.models.recommender import LLMRecommender

        return LLMRecommender(cfg, data, cfg.paths.cache_dir, cfg.seed)
    if kind == "sequential":
        from recsim.models.recommender import SequentialRecommender

        return SequentialRecommender(cfg, data, cfg.seed)
    if kind == "graph":
        from recsim.models.alpharec import AlphaRecRecommender

        return AlphaRecRecommender(cfg, data, cfg.seed)
    if kind == "student":
        from recsim.models.student import StudentRecommender

        return StudentRecommender(cfg, data, cfg.paths.cache_dir, cfg.seed)
    raise ValueError(f"backbone.kind={kind!r}: expected 'llm', 'sequential', 'graph' or 'student'")


def _stage_seed(seed: int, stage: int) -> int:
    return seed * 1000 + stage


def training_subsample(cfg, stage_index: int, samples):
    """What a stage's fit trains on of the method's samples: all of them, or with `trainer.max_train_samples` a
    seeded subsample of that many (keeps CPU runs affordable); the membership audit replays it."""
    cap = cfg.trainer.get("max_train_samples")
    if samples and cap and len(samples) > cap:
        keep = np.random.default_rng(_stage_seed(cfg.seed, stage_index)).choice(len(samples), cap, replace=False)
        samples = [samples[i] for i in sorted(keep)]
    return samples


def _loggers(cfg, out: Path, version: str):
    from lightning.pytorch.loggers import CSVLogger

    loggers = [CSVLogger(str(out), name="logs", version=version)]
    if cfg.logger.get("wandb"):
        from recsim.utils.wandb_logger import wandb_logger

        loggers.append(wandb_logger(cfg, out))
    return loggers


def training_loader(cfg, rec, samples, batch_size: int, seed: int) -> DataLoader:
    """Seeded shuffled batches, or with `trainer.group_by_length` (LLMs) batches of similar token counts:
    less padding per step, from transformers' seeded mega-batch sampler (see conf/trainer/default.yaml)."""
    generator = torch.Generator().manual_seed(seed)
    pin = uses_gpu(cfg.trainer.get("accelerator", "auto"))  # page-locked batches: the copy to the GPU does not block the host
    collate = rec.collate
    grouped, static = (bool(cfg.trainer.get(k)) and hasattr(rec, "sample_length") for k in ("group_by_length",
                                                                                          "static_shapes"))
    lengths = [rec.sample_length(s) for s in samples] if grouped or static else None  # once, for both
    if static:  # every batch as wide as the fit's longest sample, rounded up: one shape a fit (the last: fewer rows)
        multiple = int(cfg.trainer.get("pad_to_multiple_of") or 8)
        collate = functools.partial(rec.collate, width=-(-max(lengths) // multiple) * multiple)
    if grouped:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = LengthGroupedSampler(batch_size, lengths=lengths, generator=generator)
        return DataLoader(samples, batch_size=batch_size, sampler=sampler, collate_fn=collate, pin_memory=pin)
    return DataLoader(samples, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=generator,
                      pin_memory=pin)


def train(cfg, rec, samples, optim, batch_size: int, seed: int, out: Path, log_version: str,
          val_samples=None, callbacks=None) -> None:
    """Fit `rec.module` on `samples` with a fresh Lightning Trainer (whatever is trainable now trains).

    With `val_samples` and a recommender that has `callbacks()` (early stopping in the sequential models),
    the fit validates on them after every epoch and those callbacks decide when to stop. `callbacks`
    are added as they are (e.g. recsim.selection's checkpoint selection)."""
    rec.set_optim(optim)
    loader = training_loader(cfg, rec, samples, batch_size, seed)
    validate = bool(val_samples) and hasattr(rec, "callbacks")
    extra = [*(rec.callbacks() if validate else []), *(callbacks or [])]
    trainer = build_trainer(cfg.trainer, max_epochs=optim.epochs, max_steps=optim.get("max_steps"),
                            loggers=_loggers(cfg, out, log_version), callbacks=extra or None,
                            enable_validation=validate)
    if validate:
        trainer.fit(rec.module, loader, DataLoader(val_samples, batch_size=batch_size, collate_fn=rec.collate))
    else:
        trainer.fit(rec.module, loader)
    rec.module.to(compute_device(cfg))  # Lightning's teardown moved the model back to the CPU


def compute_device(cfg) -> torch.device:
    return torch.device("cuda" if uses_gpu(cfg.trainer.accelerator) else "cpu")


def fit_stage(cfg, stage, rec, method, out: Path, protocol=None) -> dict:
    """One update, timed as a whole: the method's data choice (e.g. training a filter), its preparation
    (locating layers, Fisher, extra fits) and the fit. Returns the efficiency figures.

    The stage's visible validation split (`visible_validation`) drives the classic models' early
    stopping and, with `trainer.checkpoint_selection.mode=best_val`, which checkpoint the fit keeps."""
    rec.module.to(compute_device(cfg))  # Lightning's teardown moves the model back to the CPU after a fit
    valid = visible_validation(protocol, stage) if protocol is not None else None
    # Retrain: stage 0's schedule; classic models stop early on `valid` when there is one
    optim, batch_size = rec.schedule(method.schedule_index(stage), validated=valid is not None)
    optim = method.update_optim(optim, stage)
    seed = _stage_seed(cfg.seed, stage.index)
    before = {n: p.detach().clone() for n, p in rec.tracked_parameters().items()}
    method.report, method.extra_trainable = {}, 0
    method.train_fn = lambda extra, extra_optim, tag: train(cfg, rec, extra, extra_optim, batch_size, seed, out,
                                                            f"stage{stage.index}_{tag}")
    trainable = 0
    with UpdateMeter() as meter:
        samples = training_subsample(cfg, stage.index, method.training_samples(stage, rec))
        if samples:
            method.before_update(stage, rec, samples)
            # parameters the method added now (SumLoRA's new adapter): changed = moved by the fit from their start
            before.update({n: p.detach().clone() for n, p in rec.tracked_parameters().items() if n not in before})
            trainable = sum(p.numel() for p in rec.module.parameters() if p.requires_grad) + method.extra_trainable
            selection = cfg.trainer.get("checkpoint_selection") or {}
            chooser = None
            if valid is not None and selection.get("mode", "last") == "best_val":
                chooser = BestOnValidation(method, rec, valid, selection.get("metric", "NDCG@10"),
                                           selection.get("every_n_steps"), cfg.eval.batch_size)
            train(cfg, rec, samples, optim, batch_size, seed, out, f"stage{stage.index}",
                  val_samples=valid.all_samples() if valid is not None else None,
                  callbacks=[chooser] if chooser else None)
            if chooser:
                method.report.update(chooser.summary())
            method.after_update(stage, rec)
    if samples and stage.index > 0 and protocol is not None:
        kl = _kl_on_inactive_users(cfg, protocol, stage, rec, method, before)
        if kl is not None:
            method.report["kl_UI_after_update"] = kl
    if not samples:
        return {"train_samples": 0, "trainable_params": 0, "changed_params": 0, "update_seconds": 0.0}
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in rec.tracked_parameters().items() if n in before)
    # offline_seconds: work inside the meter that needs no new data (EvoRec's filter pre-training on pre-T
    # samples, which the paper runs alongside the previous training): reported, not counted as the update's
    offline = float(method.report.get("offline_seconds", 0.0))
    return {"train_samples": len(samples), "trainable_params": trainable, "changed_params": changed,
            "update_seconds": meter.seconds - offline, "wall_seconds": meter.seconds, "peak_mem_mb": meter.peak_mb,
            "memory_kind": meter.memory_kind, **method.report}


PAPER_GROUPS = ("U_A", "U_I")  # the paper's U = U_A ∪ U_I; `new` users are reported on their own


def _pooled(by_group: dict[str, np.ndarray], groups=PAPER_GROUPS) -> np.ndarray:
    """The "all" row: U_A ∪ U_I (never `new`), or the protocol's only group (leave-one-out's "all"); a protocol
    whose description names `pooled_groups` pools those (peso_blocks: every user of the block, U_A and new).
    Held-out users (`holdout`, non-members) are never pooled."""
    by_group = {g: r for g, r in by_group.items() if g != HOLDOUT}
    if "all" in by_group:
        return by_group["all"]
    keys = [g for g in groups if g in by_group] or list(by_group)
    return np.concatenate([by_group[g] for g in keys])


def visible_validation(protocol, stage) -> EvalSplit | None:
    """The stage's validation split, restricted to targets the stage's data already holds.

    Stage 0 of two_period is validated on U_I only (U_A's validation targets lie after T, in the future
    of stage 0's data); an update on everything of its round. Never a test target."""
    split = protocol.valid_splits.get(stage.eval_split)
    if split is None:
        return None
    samples, cands = {}, {}
    for group, rows in split.samples.items():
        keep = [i for i, s in enumerate(rows) if s.user in stage.sequences and s.position < len(stage.sequences[s.user])]
        if keep:
            samples[group] = [rows[i] for i in keep]
            cands[group] = split.candidates[group][keep]
    return EvalSplit(split.name, samples, cands, role="valid") if samples else None


def _kl_on_inactive_users(cfg, protocol, stage, rec, method, before: dict) -> float | None:
    """KL(p_before ‖ p_after) per answer token on the U_I test prompts of the stage's split: how far the
    update moved the predictions of users it should leave alone (EvoRec's λ curve). Only for an LLM whose
    inference is its default adapter (LSAT scores an ensemble, so the figure would not describe it)."""
    from recsim.methods.base import ContinualMethod
    from recsim.methods.kl import kl_after_update

    if rec.kind != "llm" or not cfg.eval.get("kl_after_update", True):
        return None
    if type(method).score_candidates is not ContinualMethod.score_candidates:
        return None
    samples = protocol.splits[stage.eval_split].samples.get("U_I", [])[: cfg.eval.get("kl_samples", 256)]
    if not samples:
        return None
    anchor = {n: v for n, v in before.items() if "lora_" in n and not n.startswith("module.")}
    with torch.no_grad():
        return kl_after_update(rec.module, anchor, samples, cfg.eval.get("kl_batch_size", 16))


def eval_decoders(cfg) -> list[str]:
    """`eval.decoders`, or `eval.modes` of configs written before decoders existed (the same names), and the decoder
    of a chosen `decoder=` group when they lack it."""
    names = cfg.eval.get("decoders")
    names = list(names if names is not None else cfg.eval.get("modes", ["candidates"]))
    chosen = (cfg.get("decoder") or {}).get("name")
    return names + [chosen] if chosen and chosen not in names else names


DECODER_RECORD = "decoder.json"  # the `decoder` group a stage's rows were decoded with: it is not in the stage-0 key


def _decoder_choice(cfg) -> dict | None:
    chosen = cfg.get("decoder")
    return OmegaConf.to_container(chosen, resolve=True) if chosen is not None else None


def _decoded_with(folder: Path) -> dict | None:
    path = folder / DECODER_RECORD
    return json.loads(path.read_text())["decoder"] if path.is_file() else None  # none: written before the groups


def evaluate_stage(cfg, protocol, rec, method, stage, stage_dir: Path | None = None) -> tuple[list[dict], dict]:
    """Scores every test split (or only the stage's own) and, with `eval.validation`, the stage's own
    validation split, with every decoder of `eval.decoders` (recsim.decoders) and, for models that can, a full
    ranking of the catalogue. Returns result rows and the per-user ranks {(mode, split, group): (users, ranks)}.
    Each decoder is prepared once first (`Decoder.prepare`), with `stage_dir` the folder the stage is written to
    (L2D keeps its memory there; None: nothing is saved)."""
    from recsim.decoders import build_decoder

    splits = [protocol.splits[n] for n in (protocol.splits if cfg.eval.all_splits else [stage.eval_split])]
    if cfg.eval.validation and stage.eval_split in protocol.valid_splits:
        splits.append(protocol.valid_splits[stage.eval_split])
    decoders = [d for d in (build_decoder(n, cfg) for n in eval_decoders(cfg)) if rec.kind == "llm" or not d.llm_only]
    for decoder in decoders:
        decoder.prepare(method, rec, protocol, stage, stage_dir)
    rows, per_user = [], {}
    pooled = tuple(getattr(protocol, "description", {}).get("pooled_groups", PAPER_GROUPS))
    for split in splits:
        name = split.name
        users = {g: np.array([s.user for s in samples], dtype=np.int64) for g, samples in split.samples.items()}
        common = {"stage": stage.index, "stage_name": stage.name, "split": name}
        for decoder in decoders:
            by_group, counts = {}, Counter()
            for group, samples in split.samples.items():
                if not samples:
                    continue
                progress = lambda it, g=group: tqdm(it, desc=f"{decoder.name} {stage.name} on {name}/{g}", leave=False,
                                                    disable=not cfg.trainer.progress_bar)
                by_group[group], c = decoder.rank(method, rec, samples, split.candidates[group], progress)
                if group != HOLDOUT:  # the "all" count rows pool members only, as the metric rows do
                    counts.update(c)
            head = {"eval_mode": decoder.name, "candidates": decoder.pool_label(), **common}
            if set(by_group) - {HOLDOUT}:
                rows += [{**head, "group": "all", "n_users": counts["users"], "metric": metric, "value": value}
                         for metric, value in decoder.count_rows(counts).items()]
            rows += _metric_rows(head, by_group, users, decoder.name, name, decoder.ks(), cfg, per_user, pooled)
        if rec.can_rank_all and cfg.eval.full_ranking:
            full = {}
            for group, samples in split.samples.items():
                if samples:  # full ranking masks everything the user interacted with before the target, not only the window
                    before = [protocol.data.sequences[s.user][: s.position] for s in samples]
                    full[group] = ranks_full(rec.score_all(samples), np.array([s.target for s in samples]), before)
            head = {"eval_mode": "full", "candidates": "all", **common}
            rows += _metric_rows(head, full, users, "full", name, list(cfg.eval.ks), cfg, per_user, pooled)
    return rows, per_user


def _rescore_shared_stage(cfg, protocol, rec, method, stage, folder: Path, frame: pd.DataFrame,
                          base_cols: dict) -> pd.DataFrame:
    """A shared stage 0 decoded under another `decoder` group than this run's: its weights hold (the group changes
    no training, so it is not in the key), its rows do not. Scores it again in `folder`; its cost rows are kept."""
    before, now = (pd.json_normalize(d).iloc[0].to_dict() if d else {} for d in (_decoded_with(folder),
                                                                               _decoder_choice(cfg)))
    changed = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)}
    log.info("shared stage 0 was decoded with other decoder settings (decoder.<key>: (then, now) %s): scoring it "
             "again", changed)
    method.load_state_dict(load_state(folder))
    rec.load(folder)
    rec.module.to(compute_device(cfg))
    rows, ranks = evaluate_stage(cfg, protocol, rec, method, stage, stage_dir=folder)
    save_ranks(folder / RANKS_FILE, ranks)
    write_json(folder / DECODER_RECORD, {"decoder": _decoder_choice(cfg)})
    quality = pd.DataFrame([{**base_cols, **r} for r in rows])
    return pd.concat([quality, frame[frame.eval_mode == "-"]], ignore_index=True)


def _metric_rows(head: dict, by_group: dict, users: dict, mode: str, split: str, ks: list[int], cfg,
                 per_user: dict, pooled=PAPER_GROUPS) -> list[dict]:
    """Metric rows (with bootstrap CIs) of every group and of the pooled "all"; per-user ranks into `per_user`.
    Rank -1 (not in a decoder's list) scores 0 in every metric."""
    if not by_group:
        return []
    for group, r in by_group.items():
        per_user[(mode, split, group)] = (users[group], r)
    if set(by_group) - {HOLDOUT}:  # non-members alone make no "all" row
        by_group = {**by_group, "all": _pooled(by_group, pooled)}
    return [{**head, "group": group, **m} for group, r in by_group.items()
            for m in summarise(r, ks, cfg.eval.n_boot, cfg.seed)]


def _swept_columns() -> dict:
    """Every command-line override becomes a `cfg.<key>` column, but seed (its own column) and those that change
    nothing a run learns or scores: paths, loggers, and where stage 0 comes from (reuse_base_stage*)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except ValueError:  # not under Hydra (tests calling run() directly)
        return {}
    cols = {}
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key not in ("seed",) and not key.startswith(("hydra.", "paths.", "logger", "reuse_base_stage")):
            cols[f"cfg.{key}"] = value
    return cols


def _shared_base_dir(cfg, method, key: dict | None = None) -> Path | None:
    """Where stage 0 of this config is kept for every method that shares it (None: not shared).

    Stage 0 trains the initial model; it depends on the data, backbone, recipe, protocol, stage-0
    schedule, evaluation settings and seed, never on the update method. Sweeping methods then trains
    and scores it once. The key hashes what determines it (`base_stage_key`): those settings with every
    path key removed (moving the data or the cache changes nothing), the content of the data's source
    files, and the recsim sources themselves (any code or config edit trains a new stage 0, never reuses a
    stale one, unless `reuse_base_stage_across_versions` says otherwise). `key`: `base_stage_key(cfg)` if the
    caller has it already (it hashes the sources and the data).
    """
    if not (cfg.reuse_base_stage and method.shares_base_stage):
        return None
    text = json.dumps(key or base_stage_key(cfg), sort_keys=True, default=str)
    return Path(cfg.paths.cache_dir) / "base_stage" / hashlib.sha1(text.encode()).hexdigest()[:16]


def base_stage_key(cfg) -> dict:
    """The settings stage 0 depends on (see `_shared_base_dir`), as the key's JSON holds them."""
    from recsim.data.cache import drop_path_keys, fingerprint, package_hash
    from recsim.data.load import READERS, default_data_dir

    t = cfg.trainer
    plain = lambda node: OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    keyed = {k: drop_path_keys(plain(cfg[k])) for k in ("dataset", "backbone", "recipe", "stage", "eval", "seed")}
    keyed["stage"] = holdout_stage_key(keyed["stage"])  # no held-out users: the key of before the setting
    keyed["item_id"] = plain(cfg.get("item_id")) or {"name": "title"}  # what the model emits for an item
    keyed["trainer"] = {k: plain(t.get(k)) for k in ("base", "batch_size", "max_train_samples", "precision",
                                                     "gradient_clip_val", "accumulate_grad_batches", "devices",
                                                     "num_nodes", "strategy", "compile", "compile_mode",
                                                     "group_by_length", "pad_to_multiple_of", "static_shapes")}
    dataset = plain(cfg.dataset)
    dataset["data_dir"] = dataset.get("data_dir") or default_data_dir()  # as load_dataset finds it
    reader = READERS.get(dataset.get("reader"))
    keyed["data_sources"] = fingerprint(reader.sources(dataset), cfg.paths.cache_dir) if reader else None
    keyed["recsim_sources"] = package_hash()
    return json.loads(json.dumps(keyed, sort_keys=True, default=str))  # as key.json stores it


ANY = object()
# what a stage 0 is matched without across recsim versions: settings that change neither its weights nor its
# scores beyond float round-off (ANY value: how many users or prompts a pass holds, its padding, whether the
# scoring pass or the training step is compiled or replayed as CUDA graphs, how wide its batches are padded),
# and settings added to the key later, at the value that does what recsim did before them (a key holding it
# compares equal to one written before the setting existed)
IGNORED_ACROSS_VERSIONS = {("eval", "batch_size"): ANY, ("eval", "kl_batch_size"): ANY,
                           ("recipe", "scoring", "pad_to_multiple_of"): ANY, ("recipe", "scoring", "compile"): ANY,
                           ("recipe", "scoring", "fp32"): False, ("recipe", "decoders"): ["candidates"],
                           ("trainer", "compile"): ANY, ("trainer", "compile_mode"): ANY,
                           ("trainer", "static_shapes"): ANY, ("trainer", "pad_to_multiple_of"): ANY}


def _comparable(key: dict) -> dict:
    """A base-stage key without the recsim sources and the IGNORED_ACROSS_VERSIONS settings."""
    key = json.loads(json.dumps(key))
    key.pop("recsim_sources", None)
    # renamed or added since: eval.modes is eval.decoders; no item_id meant titles
    if "modes" in key.get("eval", {}):
        key["eval"]["decoders"] = key["eval"].pop("modes")
    if key.get("item_id", {"name": "title"}) in ({"name": "title"}, {"name": "title", "dedup": "none"}):
        key.pop("item_id", None)
    for path, default in IGNORED_ACROSS_VERSIONS.items():
        node = key
        for part in path[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and path[-1] in node and (default is ANY or node[path[-1]] == default):
            node.pop(path[-1])
    return key


def _reuse_other_version(shared: Path, key: dict) -> bool:
    """`reuse_base_stage_across_versions`: fill `shared` from a finished stage 0 of the same settings written by
    another recsim version (its key.json equal to `key` but for the sources and IGNORED_ACROSS_VERSIONS),
    recorded in reused_from.json. False when there is none."""
    wanted = _comparable(key)
    for found in sorted(shared.parent.glob("*/key.json")):
        other = found.parent
        if other == shared or not (other / "DONE").exists():
            continue
        theirs = json.loads(found.read_text())
        if _comparable(theirs) != wanted:
            continue
        log.warning("stage 0: reusing %s, trained by recsim sources %s (these are %s): same settings "
                    "(reuse_base_stage_across_versions=true)", other, theirs.get("recsim_sources"),
                    key["recsim_sources"])
        staging = shared.with_name(shared.name + f".tmp{os.getpid()}")
        shutil.copytree(other, staging)
        write_json(staging / "reused_from.json", {"folder": other.name, "recsim_sources": theirs.get("recsim_sources")})
        write_json(staging / "key.json", key)
        try:  # atomic, and refused when another run of this seed published it first (runs start together)
            os.rename(staging, shared)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not (shared / "DONE").exists():
                raise
        return True
    return False


def run(cfg: DictConfig) -> Path:
    from recsim.schema import validate

    validate(cfg)  # every value's type and range, before any file is written or data read
    if cfg.trainer.get("reuse_freed_memory", True):
        reuse_freed_memory()
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "DONE").exists():
        log.info("%s is complete (DONE present); nothing to do", out)
        print((out / "results.md").read_text())
        return out
    write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)

    # the whole dataset, the protocol for the sampled users, candidates for test and validation splits
    prepared = prepare_protocol(cfg)
    enc, protocol = prepared.data, prepared.protocol
    log.info("dataset %s: %s", enc.name, prepared.stats)
    save_prepared(prepared, out)  # dataset_stats.json, candidates.npz, protocol.json

    rec = build_recommender(cfg, enc)
    method = build_method(cfg.method)
    method.setup(rec, protocol)
    base_cols = {"dataset": cfg.dataset.name, "method": cfg.method.name, "backbone": cfg.backbone.name,
                 "recipe": cfg.recipe.name, "protocol": cfg.stage.name, "seed": cfg.seed, **_swept_columns()}

    # what stage 0 depends on, hashed once per run (the sources and the data): its cache folder, its key.json
    base_key = base_stage_key(cfg) if cfg.reuse_base_stage and method.shares_base_stage else None
    all_rows = []
    last_quality = None  # the latest stage's quality rows: reused when a stage leaves the model untouched
    last_ranks: dict = {}  # ... and its per-user ranks
    for stage in protocol.stages:
        stage_dir = out / "stages" / f"{stage.index:02d}_{stage.name}"
        shared = _shared_base_dir(cfg, method, base_key) if stage.index == 0 else None
        if (shared and cfg.get("reuse_base_stage_across_versions", False) and not (stage_dir / "DONE").exists()
                and not (shared / "DONE").exists()):
            _reuse_other_version(shared, base_key)
        if not (stage_dir / "DONE").exists() and shared and (shared / "DONE").exists():
            log.info("stage 0 is shared by every method of this config: reusing %s", shared)
            tmp = stage_dir.with_name(stage_dir.name + f".tmp{os.getpid()}")
            shutil.copytree(shared, tmp, dirs_exist_ok=True)
            frame = pd.read_csv(tmp / "results.csv")
            frame = frame.drop(columns=[c for c in frame.columns if c.startswith("cfg.")]).assign(**base_cols)
            if _decoded_with(tmp) != _decoder_choice(cfg):
                frame = _rescore_shared_stage(cfg, protocol, rec, method, stage, tmp, frame, base_cols)
            write_csv(tmp / "results.csv", frame)
            publish_dir(tmp, stage_dir)
        if (stage_dir / "DONE").exists():
            log.info("stage %s already finished: loading it", stage.name)
            method.load_state_dict(load_state(stage_dir))  # tensors + JSON: nothing is unpickled; adapters it adds
            rec.load(stage_dir)  # ... exist before the stage's weights are loaded into them
            frame = pd.read_csv(stage_dir / "results.csv")
            all_rows.append(frame)
            last_quality = frame[frame.eval_mode != "-"]
            last_ranks = load_ranks(stage_dir / RANKS_FILE)
            continue
        L.seed_everything(_stage_seed(cfg.seed, stage.index), workers=True)
        eff = fit_stage(cfg, stage, rec, method, out, protocol)
        tmp = stage_dir.with_name(stage_dir.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        if eff["train_samples"] == 0 and last_quality is not None:
            # no update ran, so the model is bit-for-bit the previous stage's: its scores are too
            quality = last_quality.assign(stage=stage.index, stage_name=stage.name)
        else:
            rec.module.to(compute_device(cfg))
            rows, last_ranks = evaluate_stage(cfg, protocol, rec, method, stage, stage_dir=tmp)
            quality = pd.DataFrame([{**base_cols, **r} for r in rows])
        cost = [{**base_cols, "eval_mode": "-", "candidates": "-", "stage": stage.index, "stage_name": stage.name,
                 "split": "-", "group": "-", "metric": key, "value": float(eff[key])}
                for key in ("train_samples", "trainable_params", "changed_params", "update_seconds", "peak_mem_mb",
                            "kl_UI_after_update", "adapter_bytes")
                if key in eff]
        frame = pd.concat([quality, pd.DataFrame(cost)], ignore_index=True)
        last_quality = quality
        rec.save(tmp)
        save_state(tmp, method.state_dict())
        save_ranks(tmp / RANKS_FILE, last_ranks)  # per-user ranks: paired comparisons between methods
        write_json(tmp / DECODER_RECORD, {"decoder": _decoder_choice(cfg)})
        write_csv(tmp / "results.csv", frame)
        write_json(tmp / "efficiency.json", eff)
        write_text(tmp / "DONE", "")
        if shared:
            shared.parent.mkdir(parents=True, exist_ok=True)
            staging = shared.with_name(shared.name + f".tmp{os.getpid()}")
            shutil.copytree(tmp, staging)
            write_json(staging / "key.json", base_key)  # what it was trained on, for later versions
            publish_dir(staging, shared)
        publish_dir(tmp, stage_dir)
        all_rows.append(frame)

    results = pd.concat(all_rows, ignore_index=True)
    ordered = [c for c in RESULT_COLUMNS if c in results.columns] + [c for c in results.columns if c not in RESULT_COLUMNS]
    results = results[ordered]
    summary, continual_rows = continual_report(results, protocol, cfg, base_cols)
    results = pd.concat([results, pd.DataFrame(continual_rows)], ignore_index=True) if continual_rows else results
    write_csv(out / "results.csv", results)
    split_of = {s.index: s.eval_split for s in protocol.stages}
    markdown = render_run_markdown(results, cfg, split_of) + "\n" + summary
    write_text(out / "results.md", markdown)
    if cfg.logger.get("wandb"):
        from recsim.utils.wandb_logger import finish

        finish(results)  # the same final numbers as results.csv, then close this job's W&B run
    write_text(out / "DONE", "")
    print(markdown)
    return out


def _r_metric(cfg, mode: str) -> str:
    """eval.r_metric, cut to the decoder's longest list (a 3-title list has no NDCG@10)."""
    from recsim.decoders import DECODERS

    metric = cfg.eval.r_metric
    if mode in DECODERS and "@" in metric:
        name, k = metric.split("@")
        supported = DECODERS[mode](cfg).ks()
        if supported and int(k) > max(supported):
            return f"{name}@{max(supported)}"
    return metric


def continual_report(results: pd.DataFrame, protocol, cfg, base_cols: dict) -> tuple[str, list[dict]]:
    """R[i, j] for the configured metric on all users, with forgetting and transfer figures.

    The figures also come back as result rows (group "all", split "R", stage = last) so that
    `recsim.tables` averages them over seeds like any metric.
    """
    split_of = [s.eval_split for s in protocol.stages]
    lines, rows = [], []
    matrices = {}
    for mode in [m for m in results["eval_mode"].unique() if m != "-"]:
        metric = _r_metric(cfg, mode)
        sel = results[(results.metric == metric) & (results.group == "all") & (results.eval_mode == mode)]
        S = len(protocol.stages)
        R = np.full((S, S), np.nan)
        for i in range(S):
            for j in range(S):
                hit = sel[(sel.stage == i) & (sel.split == split_of[j])]
                if len(hit):
                    R[i, j] = hit.value.iloc[0]
        labels = [s.name for s in protocol.stages]
        cols = [f"{s.name}:{s.eval_split}" for s in protocol.stages]
        summary = continual_summary(R)
        matrices[mode] = {"metric": metric, "R": R.tolist(), "rows": labels, "cols": cols, **summary}
        last = protocol.stages[-1]
        rows += [{**base_cols, "eval_mode": mode, "candidates": sel.candidates.iloc[0] if len(sel) else "-",
                  "stage": last.index, "stage_name": last.name, "split": "R", "group": "all",
                  "metric": f"{name}({metric})", "value": value}
                 for name, value in summary.items() if isinstance(value, float)]
        lines += [f"### R[i, j] ({metric}, all users, {mode}): model after stage i on stage j's split", "",
                  matrix_markdown(R, labels, cols), "",
                  ", ".join(f"{k} = {v:.4f}" for k, v in summary.items() if isinstance(v, float)), ""]
    write_json(Path(cfg.paths.output_dir) / "r_matrix.json", matrices)
    return "\n".join(lines), rows
