"""`python -m recsim.audit mia run_dir=<run> [stages=-1|all|i] [tag=…] [audit.<key>=…]`: a membership-inference
audit of a finished run, after the fact (recsim/conf/audit.yaml; `-m` sweeps over runs or settings).

For each chosen stage i:
    checks    every setting, the run folder, its held-out users, the stages, before any data or model
    model     `recsim.runs.load_stage` (the run's config.yaml, its protocol rebuilt and checked against
              protocol.json, stage i's weights and method state)
    audit     recsim.audit.membership (who is a member, which samples), recsim.audit.mia (features, reference
              model, shadow model, attacks, metrics)
    write     <run_dir>/audit/mia[_<suffix>]/stage_NN/: results.csv (one row per attack: auc, auc_lo, auc_hi,
              tpr_at_1fpr, tpr_lo, tpr_hi, counts, and the run's identity and cfg.* columns, as its stage's
              results.csv has them), audit.json (settings, counts, choices, timings), scores.npz (every sample's
              user, label, known flag and score per attack), logs/ (the reference's and shadow's fits), DONE;
              built in a temporary folder and renamed into place

Choices:
- The suffix: `tag=` if given, else a hash of the audit settings that differ from audit.yaml's (none: no suffix),
  so an audit with other settings never replaces another's. A complete folder is not audited again unless
  force=true. Nothing the run wrote is changed.
- Only LLM runs (backbone.kind=llm): the features are token distributions and hidden states.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import recsim  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
import hydra
from omegaconf import DictConfig, OmegaConf

from recsim.schema import ConfigError, boolean, integer, number, one_of, validate

AUDIT_CONF = Path(__file__).resolve().parents[1] / "conf" / "audit.yaml"
RUN_SECTIONS = ("trainer", "dataset", "paths")  # audit.yaml's run settings
SHARE = number(0, 1, lo_open=True, hi_open=True)
CHECKS = {
    "audit.seed": integer(0, null=True), "audit.max_samples_per_class": integer(1, null=True),
    "audit.balance": boolean(), "audit.known_member_share": SHARE,
    "audit.known_nonmember_share": number(0, 1, lo_open=True, hi_open=True, null=True),
    "audit.batch_size": integer(1, null=True), "audit.candidates": boolean(), "audit.negatives": integer(1, null=True),
    "audit.hidden_dim": integer(0), "audit.hidden_reduce": one_of("pca", "random"),
    "audit.attacker.l2": number(0), "audit.attacker.max_iter": integer(1),
    "audit.reference.enabled": boolean(), "audit.reference.alpha": number(0, 1),
    "audit.reference.epochs": integer(1), "audit.reference.max_steps": integer(1, null=True),
    "audit.reference.lr": number(0, lo_open=True, null=True), "audit.reference.temperature": number(0, lo_open=True),
    "audit.shadow.enabled": boolean(), "audit.shadow.epochs": integer(1, null=True),
    "audit.shadow.max_steps": integer(1, null=True), "audit.n_boot": integer(1),
}
AUDITS = {"mia": "membership inference: loss threshold, fused features, the distilled reference, a shadow model"}
USAGE = "\n".join(["usage: python -m recsim.audit {" + ",".join(AUDITS) + "} run_dir=<run> [stages=-1|all|i] "
                   "[tag=…] [audit.<key>=…]", "", "audits:", *(f"  {k:<5} {v}" for k, v in AUDITS.items()),
                   "", "settings and defaults: recsim/conf/audit.yaml"])


class AuditError(ValueError):
    """A bad run_dir, stage or setting for this run; raised before any model is built."""


def _leaves(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


# ---- checks before any work ---------------------------------------------------------------------------------
def check_settings(cfg: DictConfig) -> None:
    errors = [f"{key}={OmegaConf.select(cfg, key)!r}: expected {check.expected}"
              for key, check in CHECKS.items() if not check.ok(OmegaConf.select(cfg, key))]
    if errors:
        raise ConfigError(f"{len(errors)} bad setting(s) of recsim.audit:\n  " + "\n  ".join(errors))


def run_overrides(cfg: DictConfig) -> dict:
    """{dotted key: value} of audit.yaml's run settings given a value (null: the run's own)."""
    given = _leaves({s: OmegaConf.to_container(cfg[s], resolve=True) for s in RUN_SECTIONS if s in cfg})
    return {k: v for k, v in given.items() if v is not None}


def check_run(run_dir: Path, run_cfg: DictConfig) -> None:
    """An LLM run that holds users out, with at least two of them (one known to the attacker, one evaluated)."""
    if run_cfg.backbone.get("kind") != "llm":
        raise AuditError(f"run_dir={run_dir}: its recommender ({run_cfg.backbone.name}, backbone.kind="
                         f"{run_cfg.backbone.get('kind')}) is not an LLM; the audit reads token distributions and "
                         "hidden states")
    share = run_cfg.stage.get("holdout_users", 0) or 0
    if not share:
        raise AuditError(f"run_dir={run_dir} was made without held-out users (stage.holdout_users={share}): there are "
                         "no non-members to audit against; rerun it with stage.holdout_users=<share>, e.g. "
                         "stage.holdout_users=0.2")
    saved = run_dir / "protocol.json"
    held = json.loads(saved.read_text()).get("holdout", {}).get("users") if saved.is_file() else None
    if held is not None and held < 2:
        raise AuditError(f"run_dir={run_dir}: {held} held-out user(s) (protocol.json); the audit needs at least 2, "
                         "one known to the attacker and one to evaluate: raise stage.holdout_users")


def finished(run_dir: Path, stages) -> tuple[dict[int, Path], list[int]]:
    from recsim.decode import DecodeError, chosen_stages, finished_stages

    try:
        done = finished_stages(run_dir)
        return done, chosen_stages(stages, done)
    except DecodeError as exc:
        raise AuditError(str(exc)) from None


def changed_settings(cfg: DictConfig) -> dict:
    """The audit settings that differ from audit.yaml's."""
    shipped = _leaves(OmegaConf.to_container(OmegaConf.load(AUDIT_CONF).audit))
    given = _leaves(OmegaConf.to_container(cfg.audit, resolve=True))
    return {f"audit.{k}": v for k, v in given.items() if shipped.get(k, object()) != v}


def output_name(changed: dict, tag: str | None) -> str:
    if tag:
        return f"mia_{tag}"
    if not changed:
        return "mia"
    return f"mia_{hashlib.sha1(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:8]}"


# ---- one stage ----------------------------------------------------------------------------------------------
def audit_stage(run_dir: Path, index: int, done: dict[int, Path], settings: DictConfig, overrides: dict, out: Path,
                columns: dict) -> "pd.DataFrame":
    """Audit stage `index` of the run into `out` (atomically); returns its rows."""
    import numpy as np
    import pandas as pd

    from recsim.audit.membership import audit_set, held_out_users, member_samples, nonmember_samples
    from recsim.audit.mia import evaluate, run_attacks
    from recsim.decode import dotlist
    from recsim.runs import load_stage
    from recsim.utils.io import publish_dir, write_csv, write_json, write_text

    start = time.perf_counter()
    try:
        loaded = load_stage(run_dir, index, dotlist(overrides))
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # the data or protocol moved on since the run
        raise AuditError(f"run_dir={run_dir}, stage {index}: {exc}") from None
    cfg = loaded.cfg
    seed = (int(cfg.seed) if settings.seed is None else int(settings.seed)) * 1000 + index
    held = held_out_users(loaded.protocol)
    members, per_stage = member_samples(cfg, loaded, index, done)
    nonmembers = nonmember_samples(cfg, loaded, index, held)
    chosen = audit_set(members, nonmembers, settings, seed)
    load_seconds = time.perf_counter() - start
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        scores, record = run_attacks(cfg, loaded.protocol.data, loaded.rec, loaded.method, chosen, settings, seed, tmp)
        rows = evaluate(scores, chosen, int(settings.n_boot), seed)
        head = {**columns, "stage": loaded.stage.index, "stage_name": loaded.stage.name}
        frame = pd.DataFrame([{**head, **r, **chosen.counts} for r in rows])
        write_csv(tmp / "results.csv", frame)
        np.savez_compressed(tmp / "scores.npz", user=chosen.users, label=chosen.label, known=chosen.known,
                            **{f"score/{k}": v for k, v in scores.items()})
        record["timings"] = {"load_and_samples_seconds": load_seconds, **record["timings"],
                             "total_seconds": time.perf_counter() - start}
        write_json(tmp / "audit.json", {
            "run_dir": str(run_dir), "stage": loaded.stage.index, "stage_name": loaded.stage.name,
            "folder": out.parent.name, "seed": seed, "settings": OmegaConf.to_container(settings, resolve=True),
            "run_overrides": overrides, "trained_samples_per_stage": per_stage, "held_out_users": len(held),
            "counts": chosen.counts, **record,
            "members": "users whose samples the method trained on at stages <= this one (the replayed "
                       "method.training_samples with the run's trainer.max_train_samples cap)",
            "nonmembers": "the held-out users (stage.holdout_users); their samples: method.training_samples on the "
                          "protocol rebuilt with stage.holdout_users=0",
            "tpr_at_1fpr": "the largest TPR of a threshold with FPR <= 0.01 (no interpolation)",
            "intervals": "95% percentile bootstrap over users within each class",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        write_text(tmp / "DONE", "")
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        raise
    return frame


def summary(frame, title: str) -> str:
    """Attacks × (AUC, TPR at 1% FPR) with their intervals, and what was evaluated."""
    import pandas as pd

    from recsim.results import frame_markdown

    table = frame.set_index("attack")
    shown = {"AUC [95% CI]": [f"{v:.4f} [{lo:.4f}, {hi:.4f}]" for v, lo, hi in zip(table.auc, table.auc_lo,
                                                                                  table.auc_hi)],
             "TPR@1%FPR [95% CI]": [f"{v:.4f} [{lo:.4f}, {hi:.4f}]" for v, lo, hi in
                                    zip(table.tpr_at_1fpr, table.tpr_lo, table.tpr_hi)]}
    counts = frame.iloc[0]
    return "\n".join([f"## {title}", "", frame_markdown(pd.DataFrame(shown, index=table.index)), "",
                      f"evaluated: {counts.n_members} member and {counts.n_nonmembers} non-member samples; known to "
                      f"the attacker: {counts.known_member_samples} and {counts.known_nonmember_samples} "
                      f"({counts.known_member_users} and {counts.known_nonmember_users} users)", ""])


# ---- the command --------------------------------------------------------------------------------------------
def audit(cfg: DictConfig) -> list[Path]:
    """Every check first (run_dir, held-out users, stages, settings), then each chosen stage; the output folders."""
    import pandas as pd

    from recsim.decode import dotlist, identity_columns

    if OmegaConf.is_missing(cfg, "run_dir"):
        raise AuditError("run_dir=<a finished run's folder> is required")
    run_dir = Path(str(cfg.run_dir))
    done, stages = finished(run_dir, OmegaConf.to_container(cfg.stages) if OmegaConf.is_config(cfg.stages)
                            else cfg.stages)
    check_settings(cfg)
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    check_run(run_dir, run_cfg)
    overrides = run_overrides(cfg)
    validate(OmegaConf.merge(run_cfg, OmegaConf.from_dotlist(dotlist(overrides))))  # names a bad key, before any data
    changed = changed_settings(cfg)
    folder = run_dir / "audit" / output_name(changed, cfg.tag)
    columns = {"cfg.audit": folder.name, **{f"cfg.{k}": v for k, v in changed.items()}}
    outs = []
    for index in stages:
        out = folder / f"stage_{index:02d}"
        title = f"membership inference on stage {index} ({done[index].name[3:]}) of {run_dir}"
        if (out / "DONE").is_file() and not cfg.force:
            print(f"{out} is complete (force=true audits it again)")
            frame = pd.read_csv(out / "results.csv")
        else:
            frame = audit_stage(run_dir, index, done, cfg.audit, overrides, out,
                                {**identity_columns(done[index], run_cfg), **columns})
        print(summary(frame, title))
        print(f"wrote {out}\n")
        outs.append(out)
    return outs


@hydra.main(version_base="1.3", config_path="../conf", config_name="audit")
def hydra_main(cfg: DictConfig) -> None:
    from recsim.audit.membership import MembershipError

    try:
        audit(cfg)
    except (ConfigError, AuditError, MembershipError) as exc:
        raise SystemExit(f"recsim.audit: {exc}") from None  # the message, without a traceback through Hydra


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if not argv or argv[0] not in AUDITS:
        problem = "no audit given" if not argv else f"unknown audit {argv[0]!r}"
        print(f"recsim.audit: {problem}\n{USAGE}", file=sys.stderr)
        return 2
    sys.argv = [sys.argv[0], *argv[1:]]  # Hydra reads the overrides from sys.argv
    hydra_main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
