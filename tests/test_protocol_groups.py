"""Groups as EvoRec defines them (U_A / U_I / new), validation splits, and masking over later rounds."""

import numpy as np
import pandas as pd
import pytest

from recsim.data.schema import InteractionData
from recsim.protocols import build_protocol
from recsim.protocols.base import EncodedData
from recsim.protocols.stages import build_stages
from recsim.protocols.two_period import build_two_period
from omegaconf import OmegaConf


def encode(days: dict[str, list[int]]) -> EncodedData:
    """One row per (user, day); every interaction gets its own item so positions are easy to read."""
    rows = [(u, f"{u}{k}", d) for u, ds in days.items() for k, d in enumerate(ds)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(rating=np.nan)
    items = pd.DataFrame({"item_id": inter["item_id"], "title": inter["item_id"]})
    return EncodedData.from_data(InteractionData("hand", inter, items))


def by_user(data, split) -> dict[str, dict[str, int]]:
    """group -> {original user id: target position}"""
    return {g: {data.user_ids[s.user]: s.position for s in samples} for g, samples in split.samples.items()}


def trained(stage, data) -> dict[str, list[int]]:
    return {data.user_ids[u]: ps for u, ps in stage.cumulative_targets.items()}


def test_two_period_groups_validation_and_masking_by_hand():
    data = encode({
        "a": [1, 2, 3, 4, 5, 6],  # history <= T and window items: U_A, test day 6, valid day 5
        "b": [1, 2, 3],           # nothing after T: U_I, test day 3, valid day 2
        "c": [4, 5, 5, 6],        # first interaction after T: new, test pos 3, valid pos 2
        "d": [2, 6],              # U_A, test day 6; pos 0 has no history: no valid sample
        "e": [5],                 # new with a single item: nothing to predict it from
        "f": [1, 3, 5],           # U_A, test day 5; day 3 is <= T (another period): no valid sample
    })
    # 19 stamps sorted: 1 1 1 2 2 2 3 3 3 4 4 5 5 5 5 5 6 6 6; lower quantile 0.4 -> index 7 -> 3
    proto = build_two_period(data, [0.4], window=20)
    assert proto.description["cut_times"] == [3]
    test, valid = proto.splits["round1"], proto.valid_splits["round1"]
    assert by_user(data, test) == {"U_A": {"a": 5, "d": 1, "f": 2}, "U_I": {"b": 2}, "new": {"c": 3}}
    assert valid.name == "round1_valid" and valid.role == "valid" and test.role == "test"
    assert by_user(data, valid) == {"U_A": {"a": 4}, "U_I": {"b": 1}, "new": {"c": 2}}
    base, upd = proto.stages
    assert trained(base, data) == {"a": [1, 2], "b": [], "d": [], "f": [1]}  # c, e arrive after T
    assert trained(upd, data) == {"a": [1, 2, 3], "b": [], "c": [1], "d": [], "e": [], "f": [1]}
    assert {data.user_ids[u]: ps for u, ps in upd.new_targets.items()} == \
        {"a": [3], "b": [], "c": [1], "d": [], "e": [], "f": []}
    assert [data.user_ids[u] for u in upd.inactive_users] == ["b"]


def test_two_period_three_rounds_never_train_on_an_earlier_round():
    data = encode({"a": list(range(1, 13)),  # days 1..12 at positions 0..11: U_A in every round
                   "b": [1, 2, 4, 7]})       # U_A in rounds 1 and 2 (days 4, 7), U_I in round 3
    # 16 stamps 1 1 2 2 3 4 4 5 6 7 7 8 9 10 11 12, lower quantile index floor(15 q): 0.3 -> 3, 0.55 -> 6, 0.82 -> 9
    proto = build_two_period(data, [0.3, 0.55, 0.82], window=20)
    assert proto.description["cut_times"] == [3, 6, 9]
    a, b = (data.user_ids.index(x) for x in "ab")
    positions = lambda splits, u: [[s.position for s in sp.all_samples() if s.user == u] for sp in splits.values()]
    assert positions(proto.splits, a) == [[5], [8], [11]] and positions(proto.valid_splits, a) == [[4], [7], [10]]
    assert [by_user(data, sp)["U_I"] for sp in proto.splits.values()] == [{}, {}, {"b": 3}]
    # b's round-3 (U_I) p-1 = day 4 is round 1's test target, and days 2 / 4 lie outside rounds 1 / 2's windows
    assert positions(proto.splits, b) == [[2], [3], [3]] and positions(proto.valid_splits, b) == [[], [], []]
    assert [st.cumulative_targets[a] for st in proto.stages] == [[1, 2], [1, 2, 3], [1, 2, 3, 6], [1, 2, 3, 6, 9]]
    assert [st.new_targets[a] for st in proto.stages] == [[1, 2], [3], [6], [9]]
    assert [st.cumulative_targets[b] for st in proto.stages] == [[1], [1], [1], [1]]
    assert proto.description["masked_from_training"] == \
        "every test and validation target of every round, at every stage"


def test_stages_groups_and_validation_by_hand():
    data = encode({
        "a": [1, 2, 5, 6, 7, 8],  # windows 0, 0, 1, 1, 2, 2
        "b": [1, 2, 3, 7, 8],     # windows 0, 0, 0, 2, 2: skips window 1 -> U_I in window 2
        "c": [7, 8, 8],           # only window 2: new
        "d": [3, 5],              # windows 0, 1
    })
    # 16 stamps, lower quantile index floor(15 q): 0.3 -> 4 -> day 3; 0.55 -> 8 -> day 6
    proto = build_stages(data, 0.3, [0.25, 0.45], window=20)
    assert proto.description["bounds"] == [None, 3, 6, None]
    assert by_user(data, proto.splits["window1"]) == {"U_A": {"a": 3, "d": 1}, "U_I": {}, "new": {}}
    assert by_user(data, proto.valid_splits["window1"]) == {"U_A": {"a": 2}, "U_I": {}, "new": {}}
    assert by_user(data, proto.splits["window2"]) == {"U_A": {"a": 5}, "U_I": {"b": 4}, "new": {"c": 2}}
    assert by_user(data, proto.valid_splits["window2"]) == {"U_A": {"a": 4}, "U_I": {"b": 3}, "new": {"c": 1}}
    s0, s1 = proto.stages
    assert trained(s0, data) == {"a": [1], "b": [1, 2], "d": []}
    assert trained(s1, data) == {"a": [1], "b": [1, 2], "d": []}  # a's 2, 3 are window 1's valid and test


def random_data(seed=0, users=60, items=80) -> EncodedData:
    rng = np.random.default_rng(seed)
    days = {}
    for u in range(users):
        n = int(rng.integers(2, 15))
        days[f"u{u}"] = np.sort(rng.integers(0, 1000, n)).tolist()
    return encode(days)


STAGES = {
    "two_period": {"name": "two_period", "t_quantiles": [0.5, 0.65, 0.8], "history_window": 5},
    "stages": {"name": "stages", "first_share": 0.6, "window_shares": [0.1, 0.1, 0.1, 0.1], "history_window": 5},
    "leave_one_out": {"name": "leave_one_out", "history_window": 5},
}


@pytest.mark.parametrize("name", list(STAGES))
def test_every_protocol_has_a_validation_split_that_is_never_a_test_or_training_target(name):
    data = random_data()
    proto = build_protocol(OmegaConf.create(STAGES[name]), data)
    assert set(proto.valid_splits) == set(proto.splits)
    tests = {(s.user, s.position) for sp in proto.splits.values() for s in sp.all_samples()}
    valids = {(s.user, s.position) for sp in proto.valid_splits.values() for s in sp.all_samples()}
    assert valids and not valids & tests
    for name_, test in proto.splits.items():
        valid = proto.valid_splits[name_]
        assert valid.name == f"{name_}_valid" and valid.role == "valid" and set(valid.samples) == set(test.samples)
        for group, samples in valid.samples.items():
            test_pos = {s.user: s.position for s in test.samples[group]}
            assert all(test_pos[s.user] == s.position + 1 for s in samples)  # the step right before the test
    for stage in proto.stages:
        for targets in (stage.new_targets, stage.cumulative_targets):
            assert not {(u, p) for u, ps in targets.items() for p in ps} & (tests | valids)
    assert "masked_from_training" in proto.description
