"""The attacks of one audit, on an audit set already drawn (recsim.audit.membership: member and non-member samples,
the attacker's known users), and their metrics on the evaluated samples.

    target      recsim.audit.features of every sample under the target (the run's model after stage i)
    reference   distilled from the target on the known samples (recsim.audit.reference), its features
    shadow      trained like the target on half the known users (recsim.audit.shadow), its features of the known
                samples
    attacks     recsim.audit.attacks: loss_threshold, target_features, reference, shadow
    metrics     on the evaluated (unknown) samples only: recsim.audit.metrics

Seeds: one integer per stage (`audit.seed`, default the run's seed, × 1000 + the stage index; the audit set is
drawn with it too) seeds the candidates, the hidden projection, the fresh LoRAs and their fits (+2: reference,
+1: shadow), the shadow split and the bootstrap.
"""

from __future__ import annotations

import gc
import time

import numpy as np

from recsim.audit.attacks import LogisticRegression, design, feature_names, logistic_attack, loss_threshold
from recsim.audit.features import HiddenProjection, draw_audit_candidates, model_features
from recsim.audit.membership import AuditSet
from recsim.audit.metrics import attack_metrics
from recsim.audit.reference import distill_reference
from recsim.audit.shadow import split_shadow_users, train_shadow


def plain_method():
    """The inference hooks of a single-adapter model (the reference, the shadow)."""
    from recsim.methods.base import ContinualMethod

    return ContinualMethod(None)


def run_attacks(cfg, data, rec, method, chosen: AuditSet, settings, seed: int, log_dir) -> tuple[dict, dict]:
    """({attack: scores of every sample}, a record of what was done: features, the models' training, timings)."""
    samples, label, known = chosen.samples, chosen.label, chosen.known
    batch_size = int(settings.batch_size or cfg.eval.batch_size)
    negatives = int(settings.negatives or cfg.eval.negatives)
    timings, record = {}, {}
    start = time.perf_counter()
    candidates = draw_audit_candidates(data, samples, negatives, seed) if settings.candidates else None
    target = model_features(rec, method, samples, candidates, batch_size)
    timings["target_features_seconds"] = time.perf_counter() - start
    projection = HiddenProjection.fit(target.hidden[known], int(settings.hidden_dim), settings.hidden_reduce, seed)
    lr = lambda x: logistic_attack(x, label, known, float(settings.attacker.l2), int(settings.attacker.max_iter))
    scores = {"loss_threshold": loss_threshold(target), "target_features": lr(design(target, projection))}
    record["features"] = {"target_features": feature_names(target, projection.matrix.shape[1], False)}

    if settings.reference.enabled:
        start = time.perf_counter()
        pick = lambda member: [s for s, k, y in zip(samples, known, label) if k and y == member]
        reference, record["reference"] = distill_reference(cfg, data, rec, method, pick(1), pick(0),
                                                           settings.reference, seed + 2, log_dir)
        timings["reference_training_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        ref = model_features(reference, plain_method(), samples, candidates, batch_size)
        del reference  # one extra model in memory at a time
        gc.collect()
        timings["reference_features_seconds"] = time.perf_counter() - start
        scores["reference"] = lr(design(target, projection, ref))
        record["features"]["reference"] = feature_names(target, projection.matrix.shape[1], True)

    if settings.shadow.enabled:
        start = time.perf_counter()
        rows = np.flatnonzero(known)
        shadow_in, shadow_out = split_shadow_users(sorted({samples[r].user for r in rows}), seed)
        in_samples = [samples[r] for r in rows if samples[r].user in shadow_in]
        shadow = train_shadow(cfg, data, in_samples, settings.shadow, seed + 1, log_dir)
        timings["shadow_training_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        own = model_features(shadow, plain_method(), [samples[r] for r in rows],
                             None if candidates is None else candidates[rows], batch_size)
        del shadow
        gc.collect()
        timings["shadow_features_seconds"] = time.perf_counter() - start
        shadow_projection = HiddenProjection.fit(own.hidden, int(settings.hidden_dim), settings.hidden_reduce, seed)
        attacker = LogisticRegression(float(settings.attacker.l2), int(settings.attacker.max_iter))
        is_in = np.array([samples[r].user in shadow_in for r in rows], dtype=int)
        attacker.fit(design(own, shadow_projection), is_in)
        scores["shadow"] = attacker.decision(design(target, shadow_projection))
        record["shadow"] = {"in_users": len(shadow_in), "out_users": len(shadow_out), "in_samples": int(is_in.sum()),
                            "out_samples": int(len(is_in) - is_in.sum())}
        record["features"]["shadow"] = feature_names(own, shadow_projection.matrix.shape[1], False)
    record["timings"] = timings
    return scores, record


def evaluate(scores: dict, chosen: AuditSet, n_boot: int, seed: int) -> list[dict]:
    """One row per attack: its metrics on the evaluated samples (never the attacker's known ones)."""
    rows = ~chosen.known
    users, label = chosen.users[rows], chosen.label[rows]
    return [{"attack": name, **attack_metrics(s[rows], label, users, n_boot, seed)} for name, s in scores.items()]
