"""The simulator: seeded, readable, and its ground truth agrees with the interactions it produced."""

from __future__ import annotations

import pandas as pd
import pytest

from recsim.data.preprocess import preprocess
from recsim.data.synthetic import category_names, simulate

ARGS = dict(
    num_users=200,
    num_items=120,
    num_categories=6,
    interests_per_user=2,
    drift_share=0.5,
    drift_time=0.7,
    active_share_after=0.6,
    min_len=8,
    max_len=20,
)


@pytest.fixture(scope="module")
def data():
    return simulate(**ARGS, seed=0)


def test_same_seed_same_tables_other_seed_differs(data):
    again = simulate(**ARGS, seed=0)
    for table in ("interactions", "items", "ground_truth"):
        pd.testing.assert_frame_equal(getattr(data, table), getattr(again, table))
    assert data.meta == again.meta
    other = simulate(**ARGS, seed=1)
    assert not data.interactions.equals(other.interactions)
    assert not data.ground_truth["drifted"].equals(other.ground_truth["drifted"])


def test_tables_follow_the_schema(data):
    data.validate()
    assert data.interactions.columns.tolist() == ["user_id", "item_id", "timestamp", "rating"]
    assert data.interactions["timestamp"].dtype == "int64"
    assert data.items.columns.tolist() == ["item_id", "title", "category"]
    assert data.ground_truth.columns.tolist() == ["user_id", "drifted", "active_after", "old_interests", "new_interests"]
    assert data.ground_truth["drifted"].dtype == bool and data.ground_truth["active_after"].dtype == bool
    # rows grouped by user, chronological within a user
    inter = data.interactions
    assert inter.groupby("user_id")["timestamp"].apply(lambda t: t.is_monotonic_increasing).all()
    assert (inter["user_id"] != inter["user_id"].shift()).sum() == ARGS["num_users"]


def test_items_have_readable_distinct_titles(data):
    items = data.items
    assert items["title"].is_unique
    assert set(items["category"]) == set(category_names(6)) == set(data.meta["categories"])
    assert (items.groupby("category").size() == 20).all()  # 120 items round-robin over 6 categories
    for title, category in items[["title", "category"]].itertuples(index=False):
        assert title.endswith(" " + category) and len(title.split()) >= 3, title
    assert "Lipstick" in data.meta["categories"] and "Hiking Boots" in data.meta["categories"]


def test_lengths_and_activity_after_drift(data):
    sizes = data.interactions.groupby("user_id").size()
    assert sizes.between(ARGS["min_len"], ARGS["max_len"]).all()
    assert not data.interactions.duplicated(["user_id", "item_id"]).any()
    t = data.meta["drift_timestamp"]
    assert t == 1_600_000_000 + 22_075_200  # 0.7 * 365 days
    last = data.interactions.groupby("user_id")["timestamp"].max()
    truth = data.ground_truth.set_index("user_id")
    assert (last[truth.index[truth["active_after"]]] >= t).all()  # active users interact after T
    assert (last[truth.index[~truth["active_after"]]] < t).all()  # the others stop before T
    assert 0.45 < truth["active_after"].mean() < 0.75 and 0.35 < truth["drifted"].mean() < 0.65


def test_drifted_users_follow_new_interests_after_t(data):
    t = data.meta["drift_timestamp"]
    category = data.items.set_index("item_id")["category"]
    inter = data.interactions.assign(category=data.interactions["item_id"].map(category))
    truth = data.ground_truth.set_index("user_id")
    drifted = truth[truth["drifted"]]
    for user, row in drifted.iterrows():
        assert not set(row["old_interests"]) & set(row["new_interests"])  # disjoint
    steady = truth[~truth["drifted"]]
    assert (steady["old_interests"] == steady["new_interests"]).all()

    def share(frame, column):
        hits = [c in truth.at[u, column] for u, c in frame[["user_id", "category"]].itertuples(index=False)]
        return sum(hits) / len(hits)

    after = inter[(inter["timestamp"] >= t) & inter["user_id"].isin(drifted.index)]
    before = inter[(inter["timestamp"] < t) & inter["user_id"].isin(drifted.index)]
    assert len(after) > 100
    assert share(after, "new_interests") > 0.8
    assert share(after, "old_interests") < 0.1
    assert share(before, "old_interests") > 0.8


def test_five_core_keeps_every_user(data):
    processed = preprocess(data, k_core=5)
    assert processed.interactions["user_id"].nunique() == ARGS["num_users"]
    assert len(processed.ground_truth) == ARGS["num_users"]


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="disjoint"):
        simulate(**{**ARGS, "interests_per_user": 4}, seed=0)
    with pytest.raises(ValueError, match="min_len"):
        simulate(**{**ARGS, "min_len": 30}, seed=0)
    assert len(set(category_names(30))) == 30  # beyond the 12 nouns, prefixed lines ("Deluxe Lipstick")
