"""Protocols: no evaluated interaction is ever trained on; groups partition; windows are ordered."""

import numpy as np
import pandas as pd
import pytest

from recsim.data.schema import InteractionData
from recsim.protocols.base import EncodedData, make_samples
from recsim.protocols.candidates import draw_candidates
from recsim.protocols.stages import build_stages
from recsim.protocols.two_period import build_two_period


def tiny_data() -> EncodedData:
    # user a: days 1..6 ; user b: days 1..3 (inactive after T) ; user c: days 2, 5, 6
    rows = [("a", f"i{d}", d) for d in range(1, 7)] + [("b", "i1", 1), ("b", "i2", 2), ("b", "i3", 3)] + \
           [("c", "i4", 2), ("c", "i5", 5), ("c", "i6", 6)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(rating=np.nan)
    items = pd.DataFrame({"item_id": [f"i{d}" for d in range(1, 9)], "title": [f"title {d}" for d in range(1, 9)]})
    return EncodedData.from_data(InteractionData("tiny", inter, items))


def random_data(seed=0, users=60, items=80) -> EncodedData:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        n = rng.integers(4, 15)
        for i, t in zip(rng.choice(items, n, replace=False), np.sort(rng.integers(0, 1000, n))):
            rows.append((f"u{u}", f"it{i}", int(t)))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(rating=np.nan)
    items_t = pd.DataFrame({"item_id": [f"it{i}" for i in range(items)], "title": [f"t{i}" for i in range(items)]})
    return EncodedData.from_data(InteractionData("rand", inter, items_t))


def eval_positions(protocol):
    """(user, position) of every evaluated target, recovered from the samples' history lengths."""
    out = set()
    for split in protocol.splits.values():
        for s in split.all_samples():
            seq = protocol.data.sequences[s.user]
            # the target sits right after its history; histories are windows of the prefix
            for p in range(1, len(seq)):
                if seq[p] == s.target and tuple(seq[max(0, p - protocol.window):p]) == s.history:
                    out.add((s.user, p))
    return out


def test_two_period_hand_example():
    data = tiny_data()
    proto = build_two_period(data, [0.5], window=20)
    # all 12 stamps sorted: 1,1,2,2,2,3,3,4,5,5,6,6 -> lower 0.5 quantile = 3
    assert proto.description["cut_times"] == [3]
    a, b, c = (data.user_ids.index(x) for x in "abc")
    split = proto.splits["round1"]
    assert {s.user for s in split.samples["U_A"]} == {a, c}
    assert {s.user for s in split.samples["U_I"]} == {b}
    # a's target is its last item (day 6); b's is its last (day 3); c's is day 6
    assert [s.target for s in split.samples["U_I"]] == [data.sequences[b][2]]
    base, upd = proto.stages
    assert base.cumulative_targets[a] == [1, 2]  # positions 1,2 (days 2,3); day 1 has no history
    assert base.cumulative_targets[b] == []  # day 3 is b's test target, day 2 its validation target
    assert upd.new_targets[a] == [3]  # day 4; day 5 is a's validation target, day 6 its test target
    assert upd.boundary[a] == 3 and upd.active_users == sorted([a, c]) and upd.inactive_users == [b]


@pytest.mark.parametrize("quantiles", [[0.8], [0.6, 0.7, 0.8]])
def test_two_period_never_trains_on_evaluated(quantiles):
    proto = build_two_period(random_data(), quantiles, window=5)
    held = eval_positions(proto)
    assert held, "the protocol produced no evaluation targets"
    for stage in proto.stages:
        for targets in (stage.new_targets, stage.cumulative_targets):
            trained = {(u, p) for u, ps in targets.items() for p in ps}
            assert not trained & held
    for r, split in proto.splits.items():
        ua = {s.user for s in split.samples["U_A"]}
        ui = {s.user for s in split.samples["U_I"]}
        assert not ua & ui  # U_A and U_I partition the evaluated users
    assert len(proto.stages) == len(quantiles) + 1


def test_two_period_groups_partition_users():
    data = random_data(1)
    proto = build_two_period(data, [0.7], window=20)
    stage = proto.stages[1]
    assert set(stage.active_users) | set(stage.inactive_users) == set(stage.sequences)
    assert not set(stage.active_users) & set(stage.inactive_users)
    cut = proto.description["cut_times"][0]
    for u in stage.active_users:
        assert data.timestamps[u].max() > cut
    for u in stage.inactive_users:
        assert data.timestamps[u].max() <= cut


def test_stages_windows_disjoint_ordered_and_cover():
    data = random_data(2)
    proto = build_stages(data, 0.6, [0.1, 0.1, 0.1, 0.1], window=20)
    bounds = proto.description["bounds"]
    inner = [b for b in bounds if b is not None]
    assert inner == sorted(inner) and len(set(inner)) == len(inner)
    assert len(proto.stages) == 4 and list(proto.splits) == ["window1", "window2", "window3", "window4"]
    # every interaction lies in exactly one window
    edges = [-np.inf] + inner + [np.inf]
    for ts in data.timestamps.values():
        which = np.searchsorted(edges, ts, side="left") - 1
        assert ((which >= 0) & (which < len(edges) - 1)).all()
    held = eval_positions(proto)
    for stage in proto.stages:
        trained = {(u, p) for u, ps in stage.cumulative_targets.items() for p in ps}
        assert not trained & held
        # new targets are inside the stage's window, cumulative ones up to it
        for u, ps in stage.new_targets.items():
            assert all(p >= stage.boundary[u] for p in ps)


def test_make_samples_window():
    seqs = {0: np.array([5, 6, 7, 8])}
    out = make_samples(seqs, {0: [0, 1, 3]}, window=2)
    assert [(s.history, s.target) for s in out] == [((5,), 6), ((6, 7), 8)]


def test_candidates_contain_positive_once_and_no_history():
    data = random_data(3)
    proto = build_two_period(data, [0.7], window=20)
    split = proto.splits["round1"]
    draw_candidates(split, data, negatives=29, seed=7)
    for group, samples in split.samples.items():
        cands = split.candidates[group]
        assert cands.shape == (len(samples), 30)
        for s, row in zip(samples, cands):
            assert row[0] == s.target and (row == s.target).sum() == 1
            assert not set(row[1:].tolist()) & set(data.sequences[s.user].tolist())
            assert len(set(row.tolist())) == 30
    again = build_two_period(data, [0.7], window=20).splits["round1"]
    draw_candidates(again, data, negatives=29, seed=7)
    assert all((again.candidates[g] == split.candidates[g]).all() for g in split.candidates)
