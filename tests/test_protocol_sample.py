"""A user sample restricts who is trained and evaluated, never the cut times or the candidate pool."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import compose
from recsim.data.schema import InteractionData
from recsim.protocols.base import EncodedData, EvalSplit, Sample
from recsim.protocols.candidates import draw_candidates
from recsim.protocols.prepare import prepare_protocol, save_prepared
from recsim.protocols.stages import build_stages
from recsim.protocols.two_period import build_two_period


def encode(days: dict[str, list[int]]) -> EncodedData:
    rows = [(u, f"{u}{k}", d) for u, ds in days.items() for k, d in enumerate(ds)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(rating=np.nan)
    items = pd.DataFrame({"item_id": inter["item_id"], "title": inter["item_id"]})
    return EncodedData.from_data(InteractionData("hand", inter, items))


def test_cut_time_of_a_sample_is_the_full_data_cut_time():
    data = encode({"a": [1, 2, 3, 4], "b": [5, 6, 7, 8]})
    b = data.user_ids.index("b")
    # all stamps 1..8: lower median index floor(3.5) = 3 -> day 4; b's own stamps alone would give day 6
    full, sample = build_two_period(data, [0.5], 20), build_two_period(data, [0.5], 20, users=[b])
    assert full.description["cut_times"] == sample.description["cut_times"] == [4]
    assert {g: [s.user for s in v] for g, v in sample.splits["round1"].samples.items()} == \
        {"U_A": [], "U_I": [], "new": [b]}  # with T = 4, b arrives after T
    assert list(sample.stages[1].sequences) == [b] and sample.data is data  # only b; the data stays whole
    assert build_stages(data, 0.5, [0.5], 20, users=[b]).description["bounds"] == [None, 4, None]
    with pytest.raises(ValueError, match=r"users \[7\] are not user indices of dataset 'hand'"):
        build_two_period(data, [0.5], 20, users=[7])


def test_candidates_of_a_user_do_not_depend_on_the_other_sampled_users():
    rng = np.random.default_rng(0)
    data = encode({f"u{i}": sorted(rng.integers(0, 100, 6).tolist()) for i in range(30)})  # 180 items
    one, two = [0, 3, 4, 9, 20], [3, 11, 12, 25]
    drawn = []
    for users in (one, two):
        split = build_two_period(data, [0.6], 20, users=users).splits["round1"]
        draw_candidates(split, data, negatives=29, seed=5)
        drawn.append({s.user: row for g, ss in split.samples.items() for s, row in zip(ss, split.candidates[g])})
    assert 3 in drawn[0] and 3 in drawn[1]
    np.testing.assert_array_equal(drawn[0][3], drawn[1][3])
    own_items = set(np.concatenate([data.sequences[u] for u in two]).tolist())
    negatives = {int(i) for row in drawn[1].values() for i in row[1:]}
    assert negatives - own_items  # drawn from the whole catalogue, not only the sample's own items
    for u, row in drawn[1].items():
        assert not set(row[1:].tolist()) & set(data.sequences[u].tolist()) and len(set(row.tolist())) == 30


def test_candidates_error_when_the_catalogue_is_too_small():
    data = encode({"a": [1, 2, 3, 4], "b": [5, 6]})  # 6 items; a touched 4 of them
    a = data.user_ids.index("a")
    split = EvalSplit("round1", {"U_A": [Sample(a, (1, 2, 3), 4, 3)]})
    with pytest.raises(ValueError, match=r"user 'a' has touched 4 of 6 items, so eval.negatives=3"):
        draw_candidates(split, data, negatives=3, seed=0)


@pytest.fixture(scope="module")
def prepared_pair(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    base = ["dataset.simulator.num_users=60", f"paths.cache_dir={cache}", "eval.negatives=9"]
    return prepare_protocol(compose(base)), prepare_protocol(compose(base + ["dataset.sample_users=20",
                                                                             "dataset.sample_seed=3"]))


def test_prepare_protocol_samples_users_but_keeps_the_whole_data(prepared_pair):
    full, sample = prepared_pair
    assert sample.protocol.description["cut_times"] == full.protocol.description["cut_times"]
    assert sample.data.num_items == full.data.num_items == full.stats["full"]["items"]
    assert sample.stats["full"] == full.stats["full"] and full.stats["sample"] is None
    assert sample.stats["sample"]["users"] == 20 and full.stats["full"]["users"] == 60
    users = {s.user for sp in sample.protocol.all_splits() for s in sp.all_samples()}
    assert len(users) <= 20 and users <= set(sample.protocol.stages[1].sequences)
    # a sampled user's test candidates are those of the full run (same seed, same user, same split)
    rows = lambda p: {s.user: tuple(r) for sp in p.protocol.all_splits() for g, ss in sp.samples.items()
                      for s, r in zip(ss, sp.candidates[g]) if sp.name == "round1_valid"}
    full_rows, sample_rows = rows(full), rows(sample)
    assert sample_rows and all(full_rows[u] == r for u, r in sample_rows.items())
    d = sample.description
    assert d["sample"] == {"requested": 20, "seed": 3, "users": 20}
    assert d["cut_dates"][0].count("-") == 2 and d["masked_from_training"].startswith("every test and validation")
    assert set(d["valid_splits"]) == {"round1_valid"}
    assert set(d["valid_splits"]["round1_valid"]) == {"U_A", "U_I", "new"}


def test_save_prepared_writes_valid_candidates(prepared_pair, tmp_path):
    _, sample = prepared_pair
    save_prepared(sample, tmp_path)
    with np.load(tmp_path / "candidates.npz") as npz:
        keys = set(npz.files)
        assert {"round1/U_A", "round1_valid/U_A", "round1_valid/U_I"} <= keys
        assert npz["round1_valid/U_I"].shape[1] == 10
    stats = json.loads((tmp_path / "dataset_stats.json").read_text())
    assert stats["sample"]["users"] == 20 and stats["full"]["users"] == 60
    assert json.loads((tmp_path / "protocol.json").read_text())["stages"][1]["eval_split"] == "round1"
