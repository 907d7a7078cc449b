"""The continual loop: stages are an outer loop inside one job (a fresh Trainer per stage).

After every stage each evaluation split is scored, filling R[i, j] (model after stage i, split of
stage j). Each finished stage is published atomically (adapter, method state, results, DONE); rerunning
the same command on the same output dir resumes after the last finished stage. Stage-local seeds
(seed, stage index) make a resumed run replay exactly what an uninterrupted one does.
"""

from __future__ import annotations

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

from recsim import __version__
from recsim.data.load import load_dataset
from recsim.eval.continual import continual_summary, matrix_to_markdown
from recsim.eval.metrics import ranks_from_scores, ranks_full, summarise
from recsim.methods import build_method
from recsim.protocols import build_protocol
from recsim.protocols.base import EncodedData
from recsim.protocols.candidates import draw_candidates, save_candidates
from recsim.utils.io import frame_to_markdown, publish_dir, write_csv, write_json, write_text
from recsim.utils.resources import UpdateMeter

log = logging.getLogger(__name__)

RESULT_COLUMNS = ["dataset", "method", "backbone", "recipe", "protocol", "eval_mode", "candidates", "seed", "stage",
                  "stage_name", "split", "group", "metric", "value", "ci_low", "ci_high", "n_users"]


def build_recommender(cfg: DictConfig, data: EncodedData):
    kind = cfg.backbone.kind
    if kind == "llm":
        from recsim.models.recommender import LLMRecommender

        return LLMRecommender(cfg, data, cfg.paths.cache_dir, cfg.seed)
    if kind == "sequential":
        from recsim.models.recommender import SequentialRecommender

        return SequentialRecommender(cfg, data, cfg.seed)
    raise ValueError(f"backbone.kind={kind!r}: expected 'llm' or 'sequential'")


def _stage_seed(seed: int, stage: int) -> int:
    return seed * 1000 + stage


def _loggers(cfg, out: Path, version: str):
    from lightning.pytorch.loggers import CSVLogger

    loggers = [CSVLogger(str(out), name="logs", version=version)]
    if cfg.logger.get("wandb"):
        from recsim.utils.wandb_logger import wandb_logger

        loggers.append(wandb_logger(cfg, out))
    return loggers


def train(cfg, rec, samples, optim, batch_size: int, seed: int, out: Path, log_version: str) -> None:
    """Fit `rec.module` on `samples` with a fresh Lightning Trainer (whatever is trainable now trains)."""
    rec.set_optim(optim)
    loader = DataLoader(samples, batch_size=batch_size, shuffle=True, collate_fn=rec.collate,
                        generator=torch.Generator().manual_seed(seed))
    trainer = L.Trainer(
        max_epochs=optim.epochs, max_steps=optim.get("max_steps") or -1, accelerator=cfg.trainer.accelerator,
        devices=1, precision=cfg.trainer.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true"),
        deterministic=cfg.trainer.deterministic, gradient_clip_val=cfg.trainer.gradient_clip_val,
        logger=_loggers(cfg, out, log_version), enable_checkpointing=False, num_sanity_val_steps=0,
        enable_progress_bar=cfg.trainer.progress_bar, enable_model_summary=False, log_every_n_steps=1,
    )
    trainer.fit(rec.module, loader)
    rec.module.to(compute_device(cfg))  # Lightning's teardown moved the model back to the CPU


def compute_device(cfg) -> torch.device:
    gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if gpu else "cpu")


def fit_stage(cfg, stage, rec, method, out: Path) -> dict:
    """One update, timed as a whole: the method's data choice (e.g. training a filter), its preparation
    (locating layers, Fisher, extra fits) and the fit. Returns the efficiency figures."""
    rec.module.to(compute_device(cfg))  # Lightning's teardown moves the model back to the CPU after a fit
    optim, batch_size = rec.schedule(stage.index)
    seed = _stage_seed(cfg.seed, stage.index)
    before = {n: p.detach().clone() for n, p in rec.tracked_parameters().items()}
    method.report, method.extra_trainable = {}, 0
    method.train_fn = lambda extra, extra_optim, tag: train(cfg, rec, extra, extra_optim, batch_size, seed, out,
                                                            f"stage{stage.index}_{tag}")
    trainable = 0
    with UpdateMeter() as meter:
        samples = method.training_samples(stage, rec)
        cap = cfg.trainer.get("max_train_samples")
        if samples and cap and len(samples) > cap:  # a seeded subsample keeps CPU runs affordable
            keep = np.random.default_rng(seed).choice(len(samples), cap, replace=False)
            samples = [samples[i] for i in sorted(keep)]
        if samples:
            method.before_update(stage, rec, samples)
            trainable = sum(p.numel() for p in rec.module.parameters() if p.requires_grad) + method.extra_trainable
            train(cfg, rec, samples, optim, batch_size, seed, out, f"stage{stage.index}")
            method.after_update(stage, rec)
    if not samples:
        return {"train_samples": 0, "trainable_params": 0, "changed_params": 0, "update_seconds": 0.0}
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in rec.tracked_parameters().items() if n in before)
    return {"train_samples": len(samples), "trainable_params": trainable, "changed_params": changed,
            "update_seconds": meter.seconds, "peak_mem_mb": meter.peak_mb, "memory_kind": meter.memory_kind,
            **method.report}


def evaluate_stage(cfg, protocol, rec, method, stage) -> list[dict]:
    names = list(protocol.splits) if cfg.eval.all_splits else [stage.eval_split]
    rows = []
    ks = list(cfg.eval.ks)
    for name in names:
        split = protocol.splits[name]
        ranks = {"candidates": {}, "full": {}}
        for group, samples in split.samples.items():
            if not samples:
                continue
            cands = split.candidates[group]
            scores = []
            for start in tqdm(range(0, len(samples), 64), desc=f"eval {stage.name} on {name}/{group}", leave=False,
                              disable=not cfg.trainer.progress_bar):
                scores.append(method.score_candidates(rec, samples[start : start + 64], cands[start : start + 64],
                                                      cfg.eval.batch_size))
            ranks["candidates"][group] = ranks_from_scores(np.concatenate(scores))
            if rec.can_rank_all and cfg.eval.full_ranking:
                full = rec.score_all(samples)
                # full ranking masks everything the user interacted with before the target, not only the window
                before = [protocol.data.sequences[s.user][: s.position] for s in samples]
                ranks["full"][group] = ranks_full(full, np.array([s.target for s in samples]), before)
        if "generation" in cfg.eval.modes and rec.kind == "llm":
            ranks["generation"], counts = _generation_ranks(cfg, rec, split)
            common = {"eval_mode": "generation", "candidates": f"1+{cfg.eval.negatives}", "stage": stage.index,
                      "stage_name": stage.name, "split": name, "group": "all", "n_users": counts["users"]}
            rows += [{**common, "metric": "invalid_share", "value": counts["invalid"] / max(1, counts["generated"])},
                     {**common, "metric": "no_valid_item_share", "value": counts["empty_lists"] / max(1, counts["users"])}]
        for mode, by_group in ranks.items():
            if not by_group:
                continue
            by_group["all"] = np.concatenate(list(by_group.values()))
            for group, r in by_group.items():
                for m in summarise(r, ks, cfg.eval.n_boot, cfg.seed):
                    rows.append({"eval_mode": mode, "candidates": "all" if mode == "full" else f"1+{cfg.eval.negatives}",
                                 "stage": stage.index, "stage_name": stage.name, "split": name, "group": group, **m})
    return rows


def _generation_ranks(cfg, rec, split) -> tuple[dict, Counter]:
    """The authors' evaluation: ranked title lists generated per group, with counts of invalid titles."""
    ranks, counts = {}, Counter()
    for group, samples in split.samples.items():
        if samples:
            ranks[group], stats = rec.module.generate_rankings(samples, split.candidates[group],
                                                               cfg.recipe.generation, cfg.seed, cfg.eval.batch_size)
            counts.update(stats)
            counts["users"] += len(samples)
    return ranks, counts


def _swept_columns() -> dict:
    """Every command-line override (but seed, which has its own column) becomes a `cfg.<key>` column."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except ValueError:  # not under Hydra (tests calling run() directly)
        return {}
    cols = {}
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key not in ("seed",) and not key.startswith(("hydra.", "paths.", "logger")):
            cols[f"cfg.{key}"] = value
    return cols


def _shared_base_dir(cfg, method) -> Path | None:
    """Where stage 0 of this config is kept for every method that shares it (None: not shared).

    Stage 0 trains the initial model; it depends on the data, backbone, recipe, protocol, stage-0
    schedule, evaluation settings and seed, never on the update method. Sweeping methods then trains
    and scores it once. The key is a hash of exactly those settings.
    """
    if not (cfg.reuse_base_stage and method.shares_base_stage):
        return None
    t = cfg.trainer
    plain = lambda node: OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    keyed = {k: plain(cfg[k]) for k in ("dataset", "backbone", "recipe", "stage", "eval", "seed")}
    keyed["trainer"] = {k: plain(t[k]) for k in ("base", "batch_size", "max_train_samples", "precision", "gradient_clip_val")}
    keyed["recsim"] = __version__
    text = json.dumps(keyed, sort_keys=True)
    return Path(cfg.paths.cache_dir) / "base_stage" / hashlib.sha1(text.encode()).hexdigest()[:16]


def run(cfg: DictConfig) -> Path:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "DONE").exists():
        log.info("%s is complete (DONE present); nothing to do", out)
        print((out / "results.md").read_text())
        return out
    write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)

    data = load_dataset(cfg.dataset, cache_dir=cfg.paths.cache_dir)
    stats = data.stats()
    write_json(out / "dataset_stats.json", stats)
    log.info("dataset %s: %s", data.name, stats)
    enc = EncodedData.from_data(data)
    protocol = build_protocol(cfg.stage, enc)
    for split in protocol.splits.values():
        draw_candidates(split, enc, cfg.eval.negatives, cfg.seed)
    save_candidates(protocol.splits, out / "candidates.npz")
    write_json(out / "protocol.json", {**protocol.description, "window": protocol.window, "stages": [
        {"index": s.index, "name": s.name, "active_users": len(s.active_users), "inactive_users": len(s.inactive_users),
         "new_targets": sum(map(len, s.new_targets.values())), "eval_split": s.eval_split} for s in protocol.stages],
        "splits": {n: {g: len(v) for g, v in sp.samples.items()} for n, sp in protocol.splits.items()}})

    rec = build_recommender(cfg, enc)
    method = build_method(cfg.method)
    method.setup(rec, protocol)
    base_cols = {"dataset": cfg.dataset.name, "method": cfg.method.name, "backbone": cfg.backbone.name,
                 "recipe": cfg.recipe.name, "protocol": cfg.stage.name, "seed": cfg.seed, **_swept_columns()}

    all_rows = []
    last_quality = None  # the latest stage's quality rows: reused when a stage leaves the model untouched
    for stage in protocol.stages:
        stage_dir = out / "stages" / f"{stage.index:02d}_{stage.name}"
        shared = _shared_base_dir(cfg, method) if stage.index == 0 else None
        if not (stage_dir / "DONE").exists() and shared and (shared / "DONE").exists():
            log.info("stage 0 is shared by every method of this config: reusing %s", shared)
            tmp = stage_dir.with_name(stage_dir.name + f".tmp{os.getpid()}")
            shutil.copytree(shared, tmp, dirs_exist_ok=True)
            frame = pd.read_csv(tmp / "results.csv")
            frame = frame.drop(columns=[c for c in frame.columns if c.startswith("cfg.")]).assign(**base_cols)
            write_csv(tmp / "results.csv", frame)
            publish_dir(tmp, stage_dir)
        if (stage_dir / "DONE").exists():
            log.info("stage %s already finished: loading it", stage.name)
            rec.load(stage_dir)
            method.load_state_dict(torch.load(stage_dir / "method.pt", weights_only=False))
            frame = pd.read_csv(stage_dir / "results.csv")
            all_rows.append(frame)
            last_quality = frame[frame.eval_mode != "-"]
            continue
        L.seed_everything(_stage_seed(cfg.seed, stage.index), workers=True)
        eff = fit_stage(cfg, stage, rec, method, out)
        if eff["train_samples"] == 0 and last_quality is not None:
            # no update ran, so the model is bit-for-bit the previous stage's: its scores are too
            quality = last_quality.assign(stage=stage.index, stage_name=stage.name)
        else:
            rec.module.to(compute_device(cfg))
            quality = pd.DataFrame([{**base_cols, **r} for r in evaluate_stage(cfg, protocol, rec, method, stage)])
        cost = [{**base_cols, "eval_mode": "-", "candidates": "-", "stage": stage.index, "stage_name": stage.name,
                 "split": "-", "group": "-", "metric": key, "value": float(eff[key])}
                for key in ("train_samples", "trainable_params", "changed_params", "update_seconds", "peak_mem_mb")
                if key in eff]
        frame = pd.concat([quality, pd.DataFrame(cost)], ignore_index=True)
        last_quality = quality
        tmp = stage_dir.with_name(stage_dir.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        rec.save(tmp)
        torch.save(method.state_dict(), tmp / "method.pt")
        write_csv(tmp / "results.csv", frame)
        write_json(tmp / "efficiency.json", eff)
        write_text(tmp / "DONE", "")
        if shared:
            shared.parent.mkdir(parents=True, exist_ok=True)
            staging = shared.with_name(shared.name + f".tmp{os.getpid()}")
            shutil.copytree(tmp, staging)
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


def continual_report(results: pd.DataFrame, protocol, cfg, base_cols: dict) -> tuple[str, list[dict]]:
    """R[i, j] for the configured metric on all users, with forgetting and transfer figures.

    The figures also come back as result rows (group "all", split "R", stage = last) so that
    `recsim.tables` averages them over seeds like any metric.
    """
    metric = cfg.eval.r_metric
    split_of = [s.eval_split for s in protocol.stages]
    lines, rows = [], []
    matrices = {}
    for mode in [m for m in results["eval_mode"].unique() if m != "-"]:
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
                  matrix_to_markdown(R, labels, cols), "",
                  ", ".join(f"{k} = {v:.4f}" for k, v in summary.items() if isinstance(v, float)), ""]
    write_json(Path(cfg.paths.output_dir) / "r_matrix.json", matrices)
    return "\n".join(lines), rows


def render_run_markdown(results: pd.DataFrame, cfg, split_of: dict[int, str]) -> str:
    """Per stage, its own split (the diagonal of R) for every group; the full matrix follows below."""
    quality = results[results.eval_mode != "-"]
    metrics = [m for m in cfg.eval.table_metrics if m in set(quality.metric)]
    lines = [f"## {cfg.method.name} on {cfg.dataset.name} ({cfg.backbone.name}, {cfg.stage.name}, seed {cfg.seed})", ""]
    for mode in quality.eval_mode.unique():
        sel = quality[(quality.eval_mode == mode) & quality.metric.isin(metrics)]
        sel = sel[sel.split == sel.stage.map(split_of)]
        cell = sel.assign(text=[f"{v:.4f} [{lo:.4f}, {hi:.4f}]" for v, lo, hi in zip(sel.value, sel.ci_low, sel.ci_high)])
        table = cell.pivot_table(index=["stage", "stage_name", "split"], columns=["group", "metric"], values="text", aggfunc="first")
        lines += [f"### {mode} ranking ({sel.candidates.iloc[0] if len(sel) else ''} candidates; mean [95% bootstrap CI over users])",
                  "", frame_to_markdown(table) if len(table) else "(no rows)", ""]
    eff = results[results.eval_mode == "-"].pivot_table(index=["stage", "stage_name"], columns="metric", values="value")
    lines += ["### update cost", "", frame_to_markdown(eff.map(lambda v: f"{v:.6g}")), ""]
    return "\n".join(lines)

