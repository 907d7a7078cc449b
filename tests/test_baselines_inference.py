"""Every inference path goes through the method; Retrain's schedule; generation-mode metrics by hand."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from recsim import runner
from recsim.eval.metrics import per_user_metrics, ranks_from_lists, summarise
from recsim.methods.base import ContinualMethod, Finetune, Retrain
from recsim.models.prompts import distinct_titles
from recsim.protocols.base import EvalSplit, Sample


def test_retrain_fits_with_stage_zeros_schedule_and_others_with_the_update_one():
    stage = SimpleNamespace(index=2)
    assert Retrain(None).schedule_index(stage) == 0
    assert Finetune(None).schedule_index(stage) == 2 and ContinualMethod(None).schedule_index(stage) == 2


def test_fit_stage_asks_the_method_whose_schedule_to_use():
    asked = []
    rec = SimpleNamespace(module=torch.nn.Linear(1, 1), tracked_parameters=dict,
                          schedule=lambda i, validated=True: asked.append(i) or (OmegaConf.create({"epochs": 1}), 8))
    method = Retrain(None)
    method.training_samples = lambda stage, rec: []  # no update: fit_stage stops after choosing the schedule
    cfg = OmegaConf.create({"seed": 0, "trainer": {"accelerator": "cpu", "max_train_samples": None}})
    runner.fit_stage(cfg, SimpleNamespace(index=3), rec, method, out=None)
    assert asked == [0]


def test_offline_work_is_timed_but_not_counted_as_the_update(monkeypatch):
    """EvoRec's filter pre-training (pre-T data, run alongside the previous training in the paper) is reported as
    offline_seconds and wall_seconds keeps it; update_seconds is the rest."""
    import time

    monkeypatch.setattr(runner, "train", lambda *a, **k: time.sleep(0.05))
    rec = SimpleNamespace(module=torch.nn.Linear(1, 1), tracked_parameters=dict,
                          schedule=lambda i, validated=True: (OmegaConf.create({"epochs": 1}), 8))
    method = ContinualMethod(None)

    def samples(stage, rec):
        time.sleep(0.3)
        method.report["offline_seconds"] = 0.3
        return [Sample(1, (1,), 2, 1)]

    method.training_samples, method.before_update, method.after_update = samples, lambda *a: None, lambda *a: None
    cfg = OmegaConf.create({"seed": 0, "trainer": {"accelerator": "cpu", "max_train_samples": None}})
    eff = runner.fit_stage(cfg, SimpleNamespace(index=1), rec, method, out=None)
    assert eff["wall_seconds"] >= 0.35 and eff["offline_seconds"] == 0.3
    assert eff["update_seconds"] == pytest.approx(eff["wall_seconds"] - 0.3)
    assert 0.04 <= eff["update_seconds"] < 0.3


def test_ranks_from_lists_by_hand():
    ranks = ranks_from_lists([[3, 1, 7], [2], [], [5, 5, 9]], [1, 5, 4, 9])
    assert ranks.tolist() == [1, -1, -1, 2] and ranks.dtype == np.int64
    with pytest.raises(ValueError, match="2 lists for 1 positives"):
        ranks_from_lists([[1], [2]], [1])


def test_a_miss_scores_zero_in_every_metric():
    m = per_user_metrics(np.array([-1, 0, 2]), ks=(1, 3))
    assert m["HR@1"].tolist() == [0, 1, 0] and m["HR@3"].tolist() == [0, 1, 1]
    assert m["NDCG@3"].tolist() == pytest.approx([0, 1, 0.5])  # 1/log2(2 + 2)
    assert m["MRR"].tolist() == pytest.approx([0, 1, 1 / 3])  # not 1/(C + 1) for the miss
    assert m["Recall@3"].tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="-1 for a target"):
        per_user_metrics(np.array([0, -2]))
    rows = {r["metric"]: r["value"] for r in summarise(np.array([-1, 0, 2]), ks=(3,), n_boot=10, seed=0)}
    assert rows["MRR"] == pytest.approx(4 / 9) and rows["NDCG@3"] == pytest.approx(0.5)


def test_distinct_titles_extends_clashing_titles_then_suffixes():
    titles = ["Red Lipstick Matte Long", "Red Lipstick Matte Short", "Blue Pen", "Blue Pen", "Red Lipstick",
              "Green Ink Bottle"]
    assert distinct_titles(titles, 2) == ["Red Lipstick Matte Long", "Red Lipstick Matte Short", "Blue Pen",
                                          "Blue Pen (2)", "Red Lipstick", "Green Ink"]
    assert distinct_titles(["A b", "A c"], None) == ["A b", "A c"]


class StubMethod(ContinualMethod):
    def __init__(self):
        super().__init__(None)
        self.calls = []

    def score_candidates(self, rec, samples, candidates, batch_size):
        return np.tile([1.0, 0.0, 0.0], (len(samples), 1))

    def generate_rankings(self, rec, samples, candidates, gen_cfg, seed, batch_size):
        self.calls.append(len(samples))
        ranks = {1: np.array([2]), 2: np.array([0, -1])}[len(samples)]
        return ranks, {"generated": 6, "invalid": 1, "empty_lists": int((ranks < 0).sum())}


def test_generation_mode_goes_through_the_method_and_reports_only_k_up_to_the_list_length():
    samples = {"U_A": [Sample(0, (1,), 2, 1), Sample(1, (1,), 3, 1)], "U_I": [Sample(2, (1,), 4, 1)]}
    cands = {g: np.zeros((len(s), 3), dtype=np.int64) for g, s in samples.items()}
    protocol = SimpleNamespace(splits={"s0": EvalSplit("s0", samples, cands)}, valid_splits={})
    cfg = OmegaConf.create({"eval": {"modes": ["candidates", "generation"], "ks": [1, 3, 5, 10], "all_splits": False,
                                     "batch_size": 8, "n_boot": 20, "negatives": 2, "full_ranking": False,
                                     "validation": False},
                            "recipe": {"generation": {"list_length": 3}}, "seed": 0,
                            "trainer": {"progress_bar": False}})
    module = SimpleNamespace(generate_rankings=lambda *a, **k: pytest.fail("generation bypassed the method"))
    rec = SimpleNamespace(kind="llm", can_rank_all=False, module=module)
    method = StubMethod()
    rows, per_user = runner.evaluate_stage(cfg, protocol, rec, method, SimpleNamespace(index=0, name="base", eval_split="s0"))
    assert method.calls == [2, 1]
    gen = {(r["group"], r["metric"]): r["value"] for r in rows if r["eval_mode"] == "generation"}
    assert {m for g, m in gen if g == "all"} == {"HR@1", "HR@3", "NDCG@1", "NDCG@3", "Recall@1", "Recall@3", "MRR",
                                                   "invalid_share", "no_valid_item_share"}
    # all users: ranks [0, -1, 2] -> HR@3 2/3, NDCG@3 (1 + 0 + 1/2)/3, MRR (1 + 0 + 1/3)/3
    assert gen[("all", "HR@3")] == pytest.approx(2 / 3) and gen[("all", "NDCG@3")] == pytest.approx(0.5)
    assert gen[("all", "MRR")] == pytest.approx(4 / 9) and gen[("U_A", "HR@1")] == pytest.approx(0.5)
    assert gen[("all", "invalid_share")] == pytest.approx(2 / 12)
    assert gen[("all", "no_valid_item_share")] == pytest.approx(1 / 3)
    assert per_user[("generation", "s0", "U_A")][1].tolist() == [0, -1]  # per-user ranks kept for paired tables
    # the candidate mode still reports every K
    assert any(r["eval_mode"] == "candidates" and r["metric"] == "HR@10" for r in rows)


def test_scoring_passes_are_as_large_as_eval_batch_size():
    """evaluate_stage hands the method up to eval.batch_size users at a time (steps of 64 when it is smaller),
    so a GPU's packed pass of 256 users is not cut into passes of 64."""
    sizes = []

    class Recording(StubMethod):
        def score_candidates(self, rec, samples, candidates, batch_size):
            sizes.append((len(samples), batch_size))
            return np.tile([1.0, 0.0, 0.0], (len(samples), 1))

    samples = {"U_A": [Sample(u, (1,), 2, 1) for u in range(300)]}
    protocol = SimpleNamespace(splits={"s0": EvalSplit("s0", samples, {"U_A": np.zeros((300, 3), dtype=np.int64)})},
                               valid_splits={})
    rec = SimpleNamespace(kind="llm", can_rank_all=False)
    for batch, expected in ((256, [(256, 256), (44, 256)]), (8, [(64, 8)] * 4 + [(44, 8)])):
        sizes.clear()
        cfg = OmegaConf.create({"eval": {"modes": ["candidates"], "ks": [1], "all_splits": False, "batch_size": batch,
                                         "n_boot": 5, "negatives": 2, "full_ranking": False, "validation": False},
                                "seed": 0, "trainer": {"progress_bar": False}})
        runner.evaluate_stage(cfg, protocol, rec, Recording(), SimpleNamespace(index=0, name="base", eval_split="s0"))
        assert sizes == expected
