"""EvoRec's Forget step: which old positions are scored lowest, how they are dropped, the filter's training."""

import copy
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from recsim.methods.forget import (
    MODEL_KEYS,
    drop_positions,
    model_args,
    outdated_positions,
    train_filter,
)
from recsim.models.sequential import BPRMF
from recsim.models.sequential_module import MODELS, build_sequential
from recsim.protocols.base import StageData, make_samples

from conftest import compose


# 2-d item embeddings chosen by hand. BPR-MF's user vector is the mean embedding of its history.
EMB = {1: [1.0, 0.0], 2: [-1.0, 0.0], 3: [0.0, 1.0], 4: [0.0, -1.0], 5: [3.0, 1.0], 6: [-30.0, 0.0]}


def hand_filter() -> BPRMF:
    model = BPRMF(num_items=6, hidden=2)
    with torch.no_grad():
        for item, vec in EMB.items():
            model.item_emb.weight[item] = torch.tensor(vec)
    return model.eval()


def hand_stage() -> StageData:
    # S^A- = sequence[:boundary]. Scores s_p = <h_u, e_item> with h_u = mean of the visible S^A:
    # u0: visible [1,2,3,4,5,5] (position 6, item 6, is evaluated: not a target, never fed in)
    #     h = ([1,0]+[-1,0]+[0,1]+[0,-1]+2*[3,1]) / 6 = [1, 1/3]
    #     S^A- scores: p0 (1) 1, p1 (2) -1, p2 (3) 1/3, p3 (4) -1/3 -> K=2 lowest: p1, p3
    #     (had item 6 leaked in, h = [-24/7, 2/7] and the lowest would be p0, p3)
    # u1: visible [2,4,1,3,1,5], h = [4,1]/6 = [2/3, 1/6]
    #     p0 (2) -2/3, p1 (4) -1/6, p2 (1) 2/3, p3 (3) 1/6, p4 (1) 2/3
    #     scope=all: p0, p1. scope=window (window 3: p2..p4): p3, then the tie p2 = p4 -> p2 (older first)
    # u2: one old item -> kept.  u3: h = [3,1]/3, p0 (2) -1, p1 (1) 1; K=2 but one must stay -> p0.
    # u4: a new user (empty S^A-). u5: active with only an evaluated position (no new target).
    # u6: inactive.
    sequences = {
        0: [1, 2, 3, 4, 5, 5, 6],
        1: [2, 4, 1, 3, 1, 5],
        2: [3, 5],
        3: [2, 1, 5],
        4: [5, 3],
        5: [2, 4, 5],
        6: [2, 4, 1],
    }
    return StageData(
        index=1,
        name="stage1",
        sequences={u: np.array(s, dtype=np.int64) for u, s in sequences.items()},
        new_targets={0: [4, 5], 1: [5], 2: [1], 3: [2], 4: [1], 5: []},
        cumulative_targets={},
        boundary={0: 4, 1: 5, 2: 1, 3: 2, 4: 0, 5: 2, 6: 3},
        active_users=[0, 1, 2, 3, 4, 5],
        inactive_users=[6],
        eval_split="test1",
    )


def test_lowest_scored_positions_window_scope():
    removed = outdated_positions(hand_filter(), hand_stage(), None, k=2, window=3)
    # u0's window is p1..p3, whose two lowest are the same as over all of S^A-
    assert removed == {0: [1, 3], 1: [2, 3], 3: [0]}


def test_scope_all_differs_on_long_old_sequence():
    stage = hand_stage()
    removed = outdated_positions(hand_filter(), stage, stage.active_users, k=2, window=3, scope="all")
    assert removed == {0: [1, 3], 1: [0, 1], 3: [0]}


def test_k_one_zero_and_skipped_users():
    model, stage = hand_filter(), hand_stage()
    assert outdated_positions(model, stage, None, k=1, window=3, scope="all") == {0: [1], 1: [0], 3: [0]}
    assert outdated_positions(model, stage, None, k=0, window=3) == {}
    # the inactive user has no new targets: never filtered even when asked for
    assert outdated_positions(model, stage, [4, 5, 6], k=2, window=3, scope="all") == {}


def test_at_least_one_old_item_kept():
    model, stage = hand_filter(), hand_stage()
    # window 1: every user has a single candidate, which is kept
    assert outdated_positions(model, stage, None, k=2, window=1) == {}
    # K larger than any S^A-: all but one candidate go, the highest-scored one stays
    removed = outdated_positions(model, stage, None, k=10, window=10, scope="all")
    # kept: u0 p0 (score 1); u1 p4 (the newer of the tied p2 = p4 = 2/3, since older items go first)
    assert removed == {0: [1, 2, 3], 1: [0, 1, 2, 3], 3: [0]}
    for u, positions in removed.items():
        assert len(positions) == stage.boundary[u] - 1


def test_bad_scope_rejected():
    with pytest.raises(ValueError, match="scope"):
        outdated_positions(hand_filter(), hand_stage(), None, k=2, window=3, scope="recent")


@pytest.mark.parametrize("kind", ["sasrec", "gru4rec", "bpr_mf"])
def test_batched_equals_one_user_at_a_time(kind):
    # users of different lengths share a left-padded batch: the result must not depend on batching
    torch.manual_seed(1)
    model = build_sequential(kind, 6, hidden=8).eval()
    stage = hand_stage()
    batched = outdated_positions(model, stage, None, k=2, window=10, scope="all")
    single = outdated_positions(model, stage, None, k=2, window=10, scope="all", batch_size=1)
    assert batched == single and set(batched) == {0, 1, 3}
    assert not model.training


def test_drop_positions_reindexes_targets_and_cleans_histories():
    stage = hand_stage()
    before = copy.deepcopy(stage)
    removed = {0: [1, 3], 1: [0, 1], 3: [0]}
    sequences, targets = drop_positions(stage, removed)

    assert sequences[0].tolist() == [1, 3, 5, 5, 6] and targets[0] == [2, 3]
    assert sequences[1].tolist() == [1, 3, 1, 5] and targets[1] == [3]
    assert sequences[3].tolist() == [1, 5] and targets[3] == [1]
    assert sequences[2].tolist() == [3, 5] and targets[2] == [1]  # untouched users unchanged
    assert targets[5] == []
    # the StageData is not mutated
    for u in before.sequences:
        assert np.array_equal(stage.sequences[u], before.sequences[u])
    assert stage.new_targets == before.new_targets and stage.boundary == before.boundary

    old = make_samples(stage.sequences, stage.new_targets, window=3)
    new = make_samples(sequences, targets, window=3)
    assert [(s.user, s.target) for s in new] == [(s.user, s.target) for s in old]  # same targets, same items
    by_user = {}
    for s in new:
        by_user.setdefault(s.user, []).append(s.history)
    assert by_user[0] == [(1, 3), (1, 3, 5)]  # was (2, 3, 4), (3, 4, 5)
    # u1's removed p0, p1 lie outside the window of its only sample: its history is unchanged,
    # which is why scope="window" only considers the last `window` old positions
    assert by_user[1] == [(1, 3, 1)]
    assert by_user[3] == [(1,)]  # was (2, 1)


def test_drop_positions_only_from_old_part():
    with pytest.raises(ValueError, match="outside"):
        drop_positions(hand_stage(), {0: [4]})  # position 4 is a new target of user 0


# ---- the filter's training ------------------------------------------------------------------------

N = 10
TINY = {"hidden": 16, "layers": 1, "heads": 1, "dropout": 0.2, "max_len": 8, "lr": 1e-2, "loss": "ce",
        "epochs": 2, "finetune_epochs": 1, "batch_size": 16}


def tiny_samples(step: int):
    """Item i followed by i + step (mod N): step 1 before T, step 2 after."""
    seqs = {u: np.array([(u + step * j) % N + 1 for j in range(8)]) for u in range(N)}
    return make_samples(seqs, {u: list(range(1, 8)) for u in seqs}, window=5)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_train_filter_deterministic_and_finetune_moves_weights():
    old, new = tiny_samples(1), tiny_samples(2)
    a = train_filter("sasrec", N, old, new, TINY, seed=3)
    b = train_filter("sasrec", N, old, new, TINY, seed=3)
    pre = train_filter("sasrec", N, old, new, {**TINY, "finetune_epochs": 0}, seed=3)
    torch.manual_seed(3)
    init = build_sequential("sasrec", N, **model_args("sasrec", TINY))

    wa, wb, wpre = weights(a.model), weights(b.model), weights(pre.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, same filter
    assert not torch.equal(wpre["item_emb.weight"], init.item_emb.weight)  # pre-training trained
    assert not torch.equal(wa["item_emb.weight"], wpre["item_emb.weight"])  # fine-tuning moved it
    assert not a.model.training
    assert a.pretrain_seconds > 0 and a.finetune_seconds > 0 and pre.finetune_seconds == 0


@pytest.mark.parametrize("kind", ["sasrec", "gru4rec", "bpr_mf"])
def test_filter_configs(kind):
    cfg = compose(["method=evorec", f"method.filter={kind}"]).method
    assert cfg.filter == kind
    cfg = cfg.filters[kind]
    assert cfg.kind == kind
    # every constructor argument is set by the config, so no key is silently left at a code default
    params = set(inspect.signature(MODELS[kind]).parameters) - {"num_items"}
    assert set(MODEL_KEYS[kind]) == params and params <= set(cfg)
    for key in ("lr", "loss", "epochs", "finetune_epochs", "batch_size", "max_len"):
        assert key in cfg
    model = build_sequential(cfg.kind, N, **model_args(kind, cfg))
    assert model.hidden == cfg.hidden == 64


def test_evorec_forgets_only_old_items_its_prompts_show(monkeypatch):
    """With scope=window, EvoRec's candidates are the newest min(window, history shown) old items: at a
    prompt of 2 titles an older item can never be forgotten, because removing it would change nothing."""
    from types import SimpleNamespace

    from recsim.methods import forget
    from recsim.methods.evorec import EvoRec

    monkeypatch.setattr(forget, "train_filter", lambda *a, **k: SimpleNamespace(
        model=hand_filter(), pretrain_seconds=0.0, finetune_seconds=0.0))
    method = EvoRec(compose(["method=evorec", "method.k=1"]).method)
    method.protocol = SimpleNamespace(window=20, data=SimpleNamespace(num_items=6))

    def histories(shown):
        samples = method.training_samples(hand_stage(), SimpleNamespace(history_shown=shown))
        return sorted((s.user, s.history) for s in samples if s.user in (0, 1))

    # scores by hand (hand_stage): u0 S^A- [1,2,3,4] -> 1, -1, 1/3, -1/3; u1 S^A- [2,4,1,3,1] -> -2/3, -1/6, 2/3, 1/6, 2/3
    # the whole window: u0 loses p1 (item 2), u1 loses p0 (item 2)
    assert histories(None) == [(0, (1, 3, 4)), (0, (1, 3, 4, 5)), (1, (4, 1, 3, 1))]
    # 2 titles shown, K = 1: one removal pulls one older item into view, so the newest 2 + 1 are scored:
    # u0 p1..p3 (-1, 1/3, -1/3) -> p1 (item 2); u1 p2..p4 (2/3, 1/6, 2/3) -> p3 (item 3).
    # (Scoring only p2, p3 removed u0's item 4 and showed (2, 3): item 2 at p1 was never scored.)
    assert histories(2) == [(0, (1, 3, 4)), (0, (1, 3, 4, 5)), (1, (2, 4, 1, 1))]


class RecordingFilter(torch.nn.Module):
    """A filter with e_i = [1, 0] for every item but 106 and 108 ([-1, 0]), h_u = mean of the history's
    embeddings; it records every item it is asked to score (the user representation does not count)."""

    def __init__(self, num_items: int = 111):
        super().__init__()
        self.table = torch.nn.Embedding(num_items + 1, 2)
        with torch.no_grad():
            self.table.weight[:] = torch.tensor([1.0, 0.0])
            self.table.weight[0] = 0.0  # padding
            self.table.weight[[106, 108]] = torch.tensor([-1.0, 0.0])
        self.scored: set[int] = set()

    def user_repr(self, history):
        return self.table(history).sum(1) / (history > 0).sum(1, keepdim=True)

    def item_emb(self, items):
        self.scored.update(int(i) for i in items.flatten() if i > 0)
        return self.table(items)


@pytest.mark.parametrize("backfill", [True, False])
def test_forget_never_shows_an_unscored_item(monkeypatch, backfill):
    """The update prompt of the brief: it shows (105..109); the filter removes 106 and 108. Scoring only
    those 5 and back-filling showed (103, 104, 105, 107, 109), 103 and 104 never scored."""
    from types import SimpleNamespace

    from recsim.methods import forget
    from recsim.methods.evorec import EvoRec

    model = RecordingFilter()
    monkeypatch.setattr(forget, "train_filter", lambda *a, **k: SimpleNamespace(
        model=model, pretrain_seconds=0.0, finetune_seconds=0.0))
    overrides = ["method=evorec", "method.k=2", f"method.forget_backfill={str(backfill).lower()}"]
    method = EvoRec(compose(overrides).method)
    method.protocol = SimpleNamespace(window=20, data=SimpleNamespace(num_items=111))
    # S^A- = 101..109 (positions 0..8), new targets 110 and 111. h = ([1, 0] * 9 - 2 * [1, 0]) / 11 = [7/11, 0]:
    # s = -7/11 for 106 and 108, +7/11 for every other item, so 106 and 108 are the 2 lowest in any window.
    stage = StageData(index=1, name="stage1", sequences={0: np.arange(101, 112, dtype=np.int64)},
                      new_targets={0: [9, 10]}, cumulative_targets={}, boundary={0: 9}, active_users=[0],
                      inactive_users=[], eval_split="test1")
    samples = method.training_samples(stage, SimpleNamespace(history_shown=5))
    shown = {s.target: s.history[-5:] for s in samples}
    if backfill:  # the two removals pull 103 and 104 into the first prompt: now they were scored
        assert shown == {110: (103, 104, 105, 107, 109), 111: (104, 105, 107, 109, 110)}
        assert model.scored == set(range(103, 110))
    else:  # no back-fill: the removed titles leave gaps
        assert shown == {110: (105, 107, 109), 111: (107, 109, 110)}
        assert model.scored == set(range(105, 110))
    assert method.report["forgotten_items"] == 2
    for s in samples:  # every old item an update prompt shows was scored
        assert {i for i in s.history[-5:] if i < 110} <= model.scored, s


def test_bad_backfill_setting_is_rejected():
    from types import SimpleNamespace

    from recsim.methods.evorec import EvoRec

    method = EvoRec(compose(["method=evorec", "method.forget_backfill=sometimes"]).method)
    method.protocol = SimpleNamespace(window=20, data=SimpleNamespace(num_items=6))
    with pytest.raises(ValueError, match="method.forget_backfill='sometimes': expected true or false"):
        method.training_samples(hand_stage(), SimpleNamespace(history_shown=2))


@pytest.mark.parametrize("when,offline", [("alongside", 2.5), ("in_update", None)])
def test_filter_pretraining_runs_alongside_unless_asked(monkeypatch, when, offline):
    """The paper: SASRec's pre-training runs alongside the LLM's training (no added latency), its fine-tune is part
    of the update. `alongside` reports the pre-training as offline_seconds (not counted by fit_stage); `in_update`
    does not."""
    from types import SimpleNamespace

    from recsim.methods import forget
    from recsim.methods.evorec import EvoRec

    monkeypatch.setattr(forget, "train_filter", lambda *a, **k: SimpleNamespace(
        model=hand_filter(), pretrain_seconds=2.5, finetune_seconds=0.5))
    method = EvoRec(compose(["method=evorec", "method.k=1", f"method.filter_pretrain={when}"]).method)
    method.protocol = SimpleNamespace(window=20, data=SimpleNamespace(num_items=6))
    method.training_samples(hand_stage(), SimpleNamespace(history_shown=None))
    assert method.report["filter_seconds"] == 3.0 and method.report["filter_pretrain_seconds"] == 2.5
    assert method.report.get("offline_seconds") == offline
