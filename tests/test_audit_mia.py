"""`python -m recsim.audit mia`: the membership-inference audit (recsim/audit/).

Hand-computed: AUC of known score vectors (ties averaged), TPR at 1% FPR, the user bootstrap; the logistic
regression on a separable toy; the reference's two-phase loss on tiny tensors; the hidden projection fitted on
the attacker's rows only; the pools and the attacker's known users. Members and non-members on a protocol with
held-out users (never mixed). The CLI's refusals before any model. With tiny_llama on synthetic data: every attack
is at chance when members and non-members only differ by a label (an untrained model), the loss attack clearly
above chance on a model overfitted to its members; end to end (slow): a `python -m recsim.run` with
stage.holdout_users=0.2, then `python -m recsim.audit mia` on it (subprocesses), its files checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import REPO, compose
from recsim.audit.__main__ import AuditError, audit, changed_settings, main, output_name
from recsim.audit.attacks import LogisticRegression
from recsim.audit.features import HiddenProjection
from recsim.audit.membership import MembershipError, audit_set, member_samples, nonmember_samples
from recsim.audit.metrics import attack_metrics, roc_auc, tpr_at_fpr, user_bootstrap
from recsim.audit.reference import distillation_loss, phase_weights
from recsim.protocols.base import Sample
from recsim.schema import ConfigError

TINY = ["backbone=tiny_llama", "debug=smoke", "dataset.simulator.num_users=40", "eval.negatives=9",
        "eval.n_boot=20", "trainer.progress_bar=false"]
QUICK = ["audit.n_boot=100", "audit.reference.max_steps=3", "audit.shadow.max_steps=3", "audit.hidden_dim=4"]


def compose_audit(overrides: list[str]):
    """The config `python -m recsim.audit mia <overrides>` sees."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="recsim.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="audit", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


# ---- metrics ------------------------------------------------------------------------------------------------
def test_auc_of_known_scores():
    # members 0.35 and 0.8 against non-members 0.1 and 0.4: 3 of 4 pairs ordered
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert roc_auc([1, 1, 2, 2], [0, 1, 0, 1]) == 0.5  # pairs: tie ½, 0, 1, tie ½
    assert roc_auc([3, 2, 1], [1, 0, 0]) == 1.0 and roc_auc([1, 2, 3], [1, 0, 0]) == 0.0
    assert np.isnan(roc_auc([1, 2], [1, 1]))


def test_tpr_at_1_percent_fpr_on_a_hand_case():
    negatives = np.arange(100.0)  # one non-member above a threshold in (98, 99] is FPR 1%
    members = np.array([50.5, 98.5, 99.5, 120.0])
    scores, labels = np.concatenate([negatives, members]), np.r_[np.zeros(100), np.ones(4)]
    assert tpr_at_fpr(scores, labels, 0.01) == 0.75  # threshold 98.5: 98.5, 99.5, 120 above; only 99 of the others
    assert tpr_at_fpr(scores, labels, 0.0) == 0.5  # above every non-member: 99.5 and 120
    # with 10 non-members the smallest FPR above 0 is 10%: only thresholds above all of them qualify
    assert tpr_at_fpr([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 8.5, 9.5, 10], [0] * 10 + [1] * 3, 0.01) == pytest.approx(2 / 3)
    assert tpr_at_fpr([5, 1, 2], [1, 0, 0], 0.01) == 1.0 and tpr_at_fpr([0, 1, 2], [1, 0, 0], 0.01) == 0.0


def test_bootstrap_over_users_contains_the_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(40), 3)  # 40 users, 3 samples each; the first 20 members
    labels = (users < 20).astype(int)
    scores = rng.normal(size=len(users)) + 0.8 * labels
    m = attack_metrics(scores, labels, users, n_boot=300, seed=4)
    assert m["auc_lo"] <= m["auc"] <= m["auc_hi"] and m["auc_hi"] - m["auc_lo"] > 0.05
    assert m["tpr_lo"] <= m["tpr_at_1fpr"] <= m["tpr_hi"]
    assert attack_metrics(scores, labels, users, n_boot=300, seed=4) == m
    # perfectly separated classes: every resample separates them too
    ci = user_bootstrap({"auc": roc_auc}, labels.astype(float), labels, users, n_boot=50, seed=0)
    assert ci["auc"] == (1.0, 1.0)
    # resampling users, not samples: a class of one user is always that user, so its samples move together
    one = user_bootstrap({"mean": lambda s, y: s[y == 1].mean()}, [1.0, 2.0, 3.0, 0.0], [1, 1, 1, 0],
                         [7, 7, 7, 8], n_boot=30, seed=1)
    assert one["mean"] == (2.0, 2.0)


# ---- the attacker -------------------------------------------------------------------------------------------
def test_logistic_regression_separates_a_separable_toy():
    rng = np.random.default_rng(1)
    x = np.r_[rng.normal(-2, 0.5, (30, 2)), rng.normal(2, 0.5, (30, 2))]
    y = np.r_[np.zeros(30), np.ones(30)]
    lr = LogisticRegression(l2=1e-2).fit(x[::2], y[::2])
    assert ((lr.decision(x) > 0) == y.astype(bool)).all()  # the other half too
    assert roc_auc(lr.decision(x[1::2]), y[1::2]) == 1.0
    strong = LogisticRegression(l2=100.0).fit(x, y)
    assert strong.weight.norm() < lr.weight.norm()  # λ shrinks the weights
    with pytest.raises(ValueError, match="known members and known non-members"):
        LogisticRegression().fit(x[:5], y[:5])


# ---- the reference model's loss -----------------------------------------------------------------------------
def test_reference_loss_mixes_hard_and_soft_by_alpha():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]])
    targets = torch.tensor([0, 2])
    s_lp, t_lp = student.log_softmax(-1), teacher.log_softmax(-1)
    hard = -(s_lp[0, 0] + s_lp[1, 2]) / 2  # CE to the answer tokens, token mean
    soft = (t_lp.exp() * (t_lp - s_lp)).sum(-1).mean()  # KL(teacher ‖ student), token mean
    assert phase_weights(0.7, members=False) == pytest.approx((0.3, 0.7))  # non-members: (1−α)·hard + α·soft
    assert phase_weights(0.7, members=True) == pytest.approx((0.7, 0.3))  # members: α·hard + (1−α)·soft
    for members in (False, True):
        h, s = phase_weights(0.7, members)
        terms = distillation_loss(student, teacher, targets, h, s)
        assert terms["hard"] == pytest.approx(float(hard)) and terms["soft"] == pytest.approx(float(soft))
        assert terms["loss"] == pytest.approx(h * float(hard) + s * float(soft))
    assert distillation_loss(student, teacher, targets, *phase_weights(1.0, False))["loss"] == pytest.approx(float(soft))
    assert distillation_loss(student, student, targets, 0.0, 1.0)["loss"] == pytest.approx(0.0, abs=1e-7)
    # temperature T: KL of the T-softened distributions, times T²
    t2 = distillation_loss(student, teacher, targets, 0.0, 1.0, temperature=2.0)["soft"]
    kl2 = F.kl_div((student / 2).log_softmax(-1), (teacher / 2).log_softmax(-1), log_target=True,
                   reduction="none").sum(-1).mean() * 4
    assert float(t2) == pytest.approx(float(kl2))


# ---- features -----------------------------------------------------------------------------------------------
def test_hidden_projection_is_fitted_on_the_attackers_rows_only():
    rng = np.random.default_rng(2)
    states = rng.normal(size=(12, 6))
    pca = HiddenProjection.fit(states[:5], dim=3, how="pca", seed=0)
    other = states.copy()
    other[5:] += 100  # rows the attacker does not know move: the projection does not
    assert np.allclose(HiddenProjection.fit(other[:5], 3, "pca", 0)(other[:5]), pca(states[:5]))
    assert pca(states).shape == (12, 3) and np.allclose(pca(states[:5]).mean(0), 0)
    assert HiddenProjection.fit(states[:3], 8, "pca", 0)(states).shape == (12, 2)  # rank of 3 centred rows
    assert HiddenProjection.fit(states, 0, "pca", 0)(states).shape == (12, 0)
    rand = HiddenProjection.fit(states[:5], 4, "random", 7)
    assert rand(states).shape == (12, 4) and np.allclose(rand(states), HiddenProjection.fit(states[:5], 4, "random", 7)(states))
    with pytest.raises(ValueError, match="audit.hidden_reduce='svd'"):
        HiddenProjection.fit(states, 2, "svd", 0)


# ---- members, non-members, what the attacker knows -----------------------------------------------------------
def _samples(users, per_user):
    return [Sample(u, (1, 2), 3 + k, 2 + k) for u in users for k in range(per_user)]


def _settings(**kw):
    base = OmegaConf.load(REPO / "recsim/conf/audit.yaml").audit
    return OmegaConf.merge(base, kw)


def test_pools_are_capped_balanced_and_known_by_user():
    members, nonmembers = _samples(range(40), 3), _samples(range(100, 110), 4)
    chosen = audit_set(members, nonmembers, _settings(known_member_share=0.1), seed=3)
    c = chosen.counts
    assert (chosen.label == 1).sum() == (chosen.label == 0).sum() == 40  # balanced to the 40 non-member samples
    assert c["known_member_users"] == max(1, int(0.1 * c["member_users"] + 0.5))
    assert c["known_nonmember_users"] == c["known_member_users"]  # as many, by default
    users = chosen.users
    assert not set(users[chosen.known]) & set(users[~chosen.known])  # a user is known or evaluated, never both
    assert set(users[chosen.label == 0]) <= set(range(100, 110)) and set(users[chosen.label == 1]) <= set(range(40))
    assert c["n_members"] + c["known_member_samples"] == 40
    again = audit_set(members, nonmembers, _settings(known_member_share=0.1), seed=3)
    assert again.samples == chosen.samples and (again.known == chosen.known).all()
    capped = audit_set(members, nonmembers, _settings(max_samples_per_class=10, balance=False), seed=0)
    assert (capped.label == 1).sum() == (capped.label == 0).sum() == 10
    share = audit_set(members, nonmembers, _settings(known_nonmember_share=0.5, balance=False), seed=0)
    assert share.counts["known_nonmember_users"] == 5 and (share.label == 1).sum() == 120
    with pytest.raises(MembershipError, match="1 of 1 non-member users would be known"):
        audit_set(members, _samples([100], 5), _settings(), seed=0)
    with pytest.raises(MembershipError, match="0 member and"):
        audit_set([], nonmembers, _settings(), seed=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_members_never_include_held_out_users_and_nonmembers_are_exactly_them(cache):
    from recsim.audit.membership import without_holdout
    from recsim.methods.base import Base, Finetune
    from recsim.protocols.base import make_samples
    from recsim.protocols.prepare import prepare_protocol

    cfg = compose(TINY + [f"paths.cache_dir={cache}", "stage.holdout_users=0.25", "trainer.max_train_samples=null"])
    protocol = prepare_protocol(cfg).protocol
    plain = without_holdout(cfg)
    held = sorted(protocol.description["holdout"]["user_indices"])
    assert held and not set(held) & set(protocol.stages[0].sequences)
    samples = lambda stage, kind, users=None: make_samples(stage.sequences, getattr(stage, kind), protocol.window, users)
    s0, s1 = samples(protocol.stages[0], "cumulative_targets"), samples(protocol.stages[1], "new_targets")
    h0 = samples(plain.stages[0], "cumulative_targets", held)
    h1 = samples(plain.stages[1], "new_targets", [u for u in held if u in plain.stages[1].new_targets])
    for method_cls, after_update in ((Finetune, s0 + s1), (Base, s0)):  # base never updates
        method = method_cls(cfg.method)
        method.setup(None, protocol)
        loaded = SimpleNamespace(method=method, protocol=protocol, rec=None)
        assert member_samples(cfg, loaded, 0, {}) == (s0, {0: len(s0)})
        members, counts = member_samples(cfg, loaded, 1, {})
        assert members == list(dict.fromkeys(after_update)) and counts[0] == len(s0)
        assert nonmember_samples(cfg, loaded, 0, held) == h0
        expected = h0 + h1 if method_cls is Finetune else h0
        assert nonmember_samples(cfg, loaded, 1, held) == list(dict.fromkeys(expected))
        assert method.protocol is protocol  # asked on the rebuilt protocol, then restored
    assert h0 and h1 and not set(held) & {s.user for s in s0 + s1}


def test_a_replay_that_disagrees_with_the_run_is_refused(cache, tmp_path):
    from recsim.methods.base import Finetune
    from recsim.protocols.prepare import prepare_protocol

    cfg = compose(TINY + [f"paths.cache_dir={cache}", "stage.holdout_users=0.25"])  # debug=smoke caps at 64
    protocol = prepare_protocol(cfg).protocol
    method = Finetune(cfg.method)
    method.setup(None, protocol)
    loaded = SimpleNamespace(method=method, protocol=protocol, rec=None)
    members, counts = member_samples(cfg, loaded, 0, {})
    assert counts == {0: 64} and len(members) == 64  # the runner's seeded cap
    (tmp_path / "efficiency.json").write_text(json.dumps({"train_samples": 63}))
    with pytest.raises(RuntimeError, match="64 training samples replayed, the run trained on 63"):
        member_samples(cfg, loaded, 0, {0: tmp_path})


# ---- the command's checks, before any model ------------------------------------------------------------------
@pytest.fixture()
def fake_run(tmp_path, monkeypatch):
    """A run folder as the runner leaves it, without weights (two finished stages); building a model fails."""
    import recsim.runs

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(recsim.runs, "load_stage", no_model)
    run = tmp_path / "run"
    cfg = compose(TINY + ["stage.holdout_users=0.2"], run)
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run / "protocol.json").write_text(json.dumps({"holdout": {"users": 8}}))
    for name in ("00_base", "01_update1"):
        (run / "stages" / name).mkdir(parents=True)
        (run / "stages" / name / "DONE").write_text("")
    return run


def _rewrite(run: Path, overrides: list[str]) -> None:
    (run / "config.yaml").write_text(OmegaConf.to_yaml(compose(TINY + overrides, run), resolve=True))


def test_bad_input_is_refused_before_any_model(fake_run, tmp_path):
    with pytest.raises(AuditError, match="run_dir=<a finished run's folder> is required"):
        audit(compose_audit([]))
    with pytest.raises(AuditError, match="no such directory"):
        audit(compose_audit([f"run_dir={tmp_path / 'nowhere'}"]))
    with pytest.raises(AuditError, match=r"stages=5: \[5\] not a finished stage of this run \(finished: \[0, 1\]\)"):
        audit(compose_audit([f"run_dir={fake_run}", "stages=5"]))
    with pytest.raises(ConfigError, match=r"audit.known_member_share=1.5: expected a number in \(0, 1\)"):
        audit(compose_audit([f"run_dir={fake_run}", "audit.known_member_share=1.5"]))
    with pytest.raises(ConfigError, match="audit.hidden_reduce='svd'"):
        audit(compose_audit([f"run_dir={fake_run}", "audit.hidden_reduce=svd"]))
    (fake_run / "protocol.json").write_text(json.dumps({"holdout": {"users": 1}}))
    with pytest.raises(AuditError, match="1 held-out user.*at least 2"):
        audit(compose_audit([f"run_dir={fake_run}"]))
    _rewrite(fake_run, [])  # stage.holdout_users=0
    with pytest.raises(AuditError, match=r"made without held-out users \(stage.holdout_users=0\).*"
                                         r"stage.holdout_users=0.2"):
        audit(compose_audit([f"run_dir={fake_run}"]))
    _rewrite(fake_run, ["backbone=sasrec", "stage.holdout_users=0.2"])
    with pytest.raises(AuditError, match="backbone.kind=sequential.*not an LLM"):
        audit(compose_audit([f"run_dir={fake_run}"]))


def test_usage_and_unknown_audits(capsys):
    assert main([]) == 2 and "no audit given" in capsys.readouterr().err
    assert main(["leak"]) == 2 and "unknown audit 'leak'" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "python -m recsim.audit {mia}" in capsys.readouterr().out


def test_the_output_folder_is_named_by_the_settings_that_differ():
    assert changed_settings(compose_audit(["run_dir=x"])) == {} and output_name({}, None) == "mia"
    changed = changed_settings(compose_audit(["run_dir=x", "audit.reference.alpha=0.9", "audit.hidden_dim=4"]))
    assert changed == {"audit.reference.alpha": 0.9, "audit.hidden_dim": 4}
    name = output_name(changed, None)
    assert name.startswith("mia_") and len(name) == 12 and output_name(changed, "a9") == "mia_a9"


def _stub_audit(monkeypatch, run_attacks):
    """load_stage, the membership replay and the attacks replaced: the command's own bookkeeping, no model."""
    import recsim.audit.membership as membership
    import recsim.audit.mia as mia
    import recsim.runs

    def load_stage(run_dir, index, overrides=None):
        stage = SimpleNamespace(index=index, name=["base", "update1"][index])
        return SimpleNamespace(cfg=OmegaConf.load(Path(run_dir) / "config.yaml"), rec=None, method=None,
                               protocol=SimpleNamespace(data=None), stage=stage)

    members, nonmembers = _samples(range(8), 3), _samples(range(100, 104), 3)
    monkeypatch.setattr(recsim.runs, "load_stage", load_stage)
    monkeypatch.setattr(membership, "held_out_users", lambda protocol: list(range(100, 104)))
    monkeypatch.setattr(membership, "member_samples", lambda cfg, loaded, upto, dirs: (members, {0: 24}))
    monkeypatch.setattr(membership, "nonmember_samples", lambda cfg, loaded, upto, held: nonmembers)
    monkeypatch.setattr(mia, "run_attacks", run_attacks)


def test_an_audit_is_written_atomically_and_not_redone(fake_run, monkeypatch, capsys):
    calls = []

    def run_attacks(cfg, data, rec, method, chosen, settings, seed, log_dir):
        calls.append(seed)
        (log_dir / "logs").mkdir()
        return {"loss_threshold": chosen.label * 2.0 - 1, "shadow": np.zeros(len(chosen.label))}, {"timings": {}}

    _stub_audit(monkeypatch, run_attacks)
    [out] = audit(compose_audit([f"run_dir={fake_run}", "audit.known_member_share=0.25", "audit.n_boot=20"]))
    assert calls == [1001]  # the run's seed * 1000 + the stage
    assert out == fake_run / "audit" / output_name({"audit.known_member_share": 0.25, "audit.n_boot": 20}, None) / "stage_01"
    assert sorted(p.name for p in out.iterdir()) == ["DONE", "audit.json", "logs", "results.csv", "scores.npz"]
    frame = pd.read_csv(out / "results.csv").set_index("attack")
    assert frame.loc["loss_threshold", "auc"] == 1.0 and frame.loc["shadow", "auc"] == 0.5  # all tied: ½
    assert frame.loc["loss_threshold", "tpr_at_1fpr"] == 1.0 and frame.loc["shadow", "tpr_at_1fpr"] == 0.0
    assert (frame.method == "finetune").all() and (frame["cfg.audit"] == out.parent.name).all()
    assert (frame["cfg.audit.n_boot"] == 20).all() and (frame.stage == 1).all()
    assert frame.n_members.iloc[0] + frame.known_member_samples.iloc[0] == 12  # balanced to the 12 non-member ones
    record = json.loads((out / "audit.json").read_text())
    assert record["seed"] == 1001 and record["settings"]["n_boot"] == 20 and record["trained_samples_per_stage"]
    assert "membership inference on stage 1" in capsys.readouterr().out
    audit(compose_audit([f"run_dir={fake_run}", "audit.known_member_share=0.25", "audit.n_boot=20"]))
    assert len(calls) == 1 and "is complete" in capsys.readouterr().out

    def failing(cfg, data, rec, method, chosen, settings, seed, log_dir):
        (log_dir / "half.csv").write_text("half")  # written into the temporary folder, then the audit fails
        raise RuntimeError("attack broke")

    _stub_audit(monkeypatch, failing)
    with pytest.raises(RuntimeError, match="attack broke"):
        audit(compose_audit([f"run_dir={fake_run}", "stages=0", "tag=t"]))
    assert list((fake_run / "audit" / "mia_t").iterdir()) == []  # no stage folder, no temporary one


# ---- the attacks on a tiny model ----------------------------------------------------------------------------
def _tiny(cache, extra=()):
    """A tiny_llama recommender (untrained: a fresh LoRA is the identity) and stage 0's samples by user."""
    from recsim.protocols.base import make_samples
    from recsim.protocols.prepare import prepare_protocol
    from recsim.runner import build_recommender

    cfg = compose(TINY + [f"paths.cache_dir={cache}", "trainer.progress_bar=false", *extra])
    prepared = prepare_protocol(cfg)
    stage = prepared.protocol.stages[0]
    samples = make_samples(stage.sequences, stage.cumulative_targets, prepared.protocol.window)
    return cfg, prepared.data, build_recommender(cfg, prepared.data), samples


def _split(samples, seed, per_user=4):
    """Users split at random into two halves, at most `per_user` samples each."""
    users = sorted({s.user for s in samples})
    first = set(np.random.default_rng(seed).permutation(users)[: len(users) // 2].tolist())
    kept = [s for s in samples if sum(1 for t in samples[: samples.index(s)] if t.user == s.user) < per_user]
    return [s for s in kept if s.user in first], [s for s in kept if s.user not in first]


def _attack(cfg, data, rec, members, nonmembers, tmp_path, extra=()):
    from recsim.audit.mia import evaluate, plain_method, run_attacks

    settings = compose_audit(["run_dir=x", *QUICK, "audit.known_member_share=0.25", *extra]).audit
    chosen = audit_set(members, nonmembers, settings, seed=5)
    scores, record = run_attacks(cfg, data, rec, plain_method(), chosen, settings, 5, tmp_path)
    return {r["attack"]: r for r in evaluate(scores, chosen, 200, 5)}, record


def test_untrained_model_is_at_chance(cache, tmp_path):
    """Members and non-members differ only by a label: every attack's interval holds 0.5 (one seeded split), and
    over 40 random splits the loss attack's does in most of them, around a mean AUC of 0.5 (so the one split is no
    lucky draw; a single split is one draw of a 95% interval: the split of seed 0 gives 0.40 [0.30, 0.49])."""
    from recsim.audit.features import token_features
    from recsim.audit.mia import plain_method

    cfg, data, rec, samples = _tiny(cache)
    members, nonmembers = _split(samples, seed=1, per_user=3)
    rows, record = _attack(cfg, data, rec, members, nonmembers, tmp_path)
    assert set(rows) == {"loss_threshold", "target_features", "reference", "shadow"}
    for name, r in rows.items():
        assert r["auc_lo"] <= 0.5 <= r["auc_hi"], (name, r)
    assert record["reference"]["phase2_members"]["steps"] == 3 and record["shadow"]["in_users"] >= 1
    assert "target-reference.loss" in record["features"]["reference"]

    loss = token_features(rec, plain_method(), samples, 8)[0]["loss"]
    users = np.array([s.user for s in samples])
    covered, aucs = 0, []
    for seed in range(40):
        first = set(np.random.default_rng(seed).permutation(sorted(set(users)))[: len(set(users)) // 2].tolist())
        labels = np.isin(users, list(first)).astype(int)
        m = attack_metrics(-loss, labels, users, n_boot=200, seed=seed)
        covered, aucs = covered + (m["auc_lo"] <= 0.5 <= m["auc_hi"]), aucs + [m["auc"]]
    assert covered >= 34 and abs(np.mean(aucs) - 0.5) < 0.03, (covered, np.mean(aucs))


@pytest.mark.slow
def test_a_model_overfitted_to_its_members_leaks(cache, tmp_path):
    import lightning as L

    from recsim.runner import train

    cfg, data, rec, samples = _tiny(cache)
    members, nonmembers = _split(samples, seed=0)
    rec.set_trainable()
    L.seed_everything(0)
    optim = OmegaConf.create({"lr": 1e-2, "weight_decay": 0.0, "scheduler": "constant", "epochs": 40,
                              "max_steps": None})
    train(cfg, rec, members, optim, 8, 0, tmp_path, "overfit")
    rows, _ = _attack(cfg, data, rec, members, nonmembers, tmp_path)
    # measured: loss 0.694 [0.622, 0.757], fused 0.697, reference 0.704, shadow 0.681
    assert rows["loss_threshold"]["auc"] > 0.65 and rows["loss_threshold"]["auc_lo"] > 0.55, rows["loss_threshold"]
    for name in ("target_features", "reference", "shadow"):
        assert rows[name]["auc_lo"] > 0.5, rows[name]


# ---- end to end ---------------------------------------------------------------------------------------------
def _cli(module: str, args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_run_then_audit_end_to_end(tmp_path):
    run = tmp_path / "run"
    _cli("recsim.run", TINY + ["stage.holdout_users=0.2", "method=finetune", "reuse_base_stage=false",
                               "dataset.simulator.num_users=60", f"hydra.run.dir={run}"])
    proc = _cli("recsim.audit", ["mia", f"run_dir={run}", "stages=all", *QUICK, "tag=e2e"])
    assert "membership inference on stage 0" in proc.stdout and "membership inference on stage 1" in proc.stdout
    held = set(json.loads((run / "protocol.json").read_text())["holdout"]["user_indices"])
    for index in (0, 1):
        out = run / "audit" / "mia_e2e" / f"stage_{index:02d}"
        assert sorted(p.name for p in out.iterdir()) == ["DONE", "audit.json", "logs", "results.csv", "scores.npz"]
        frame = pd.read_csv(out / "results.csv")
        assert frame.attack.tolist() == ["loss_threshold", "target_features", "reference", "shadow"]
        assert (frame.stage == index).all() and (frame.method == "finetune").all() and (frame.seed == 1).all()
        assert (frame["cfg.audit"] == "mia_e2e").all() and (frame["dataset"] == "synthetic").all()
        for col in ("auc", "auc_lo", "auc_hi", "tpr_at_1fpr", "tpr_lo", "tpr_hi"):
            assert frame[col].between(0, 1).all(), col
        assert (frame.n_members > 0).all() and (frame.n_nonmembers > 0).all()
        scores = np.load(out / "scores.npz")
        assert not held & set(scores["user"][scores["label"] == 1].tolist())  # members are never held out
        assert set(scores["user"][scores["label"] == 0].tolist()) <= held
        record = json.loads((out / "audit.json").read_text())
        efficiency = [json.loads(p.read_text())["train_samples"] for p in sorted((run / "stages").glob("*/efficiency.json"))]
        assert list(record["trained_samples_per_stage"].values()) == efficiency[: index + 1]
        assert record["held_out_users"] == len(held) and record["settings"]["reference"]["max_steps"] == 3
    assert not list((run / "audit" / "mia_e2e").glob("*.tmp*"))
    again = _cli("recsim.audit", ["mia", f"run_dir={run}", "stages=0", *QUICK, "tag=e2e"])
    assert "is complete" in again.stdout
