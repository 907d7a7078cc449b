"""Preprocessing on the tiny raw fixtures, whose expected counts are worked out by hand in
tests/fixtures/raw/make_fixtures.py (RecBole-style: a few rows per behaviour, exact numbers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsim.data.preprocess import clean_title, filter_k_core, preprocess, sample_users
from recsim.data.readers import read_amazon2018, read_mcauley2014
from recsim.data.schema import InteractionData
from recsim.data.synthetic import simulate

RAW = Path(__file__).parent / "fixtures" / "raw"
D = "0439893577"


@pytest.fixture(params=["mcauley2014", "amazon2018"])
def tiny(request) -> InteractionData:
    read = {"mcauley2014": read_mcauley2014, "amazon2018": read_amazon2018}[request.param]
    return read(RAW / request.param, "Tiny")


def counts(data) -> tuple[int, int, int]:
    stats = data.stats()
    return stats["users"], stats["items"], stats["interactions"]


def per_user(data) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for user, item, stamp in data.interactions[["user_id", "item_id", "timestamp"]].itertuples(index=False):
        out.setdefault(user, []).append((item, int(stamp)))
    return out


@pytest.mark.parametrize(
    "settings, expected",
    [
        # untitled C, F, G dropped, dup U1-A dropped; pass 1: U4, U5, H; pass 2: U7 (E only once H left)
        ({"k_core": 2}, (4, 4, 10)),
        # untitled kept; pass 1: F, G, H (one user each); pass 2: U4, U7
        ({"k_core": 2, "drop_untitled": False}, (5, 5, 13)),
        # only U2, U3 have 3 titled items; then no item keeps 3 users: everything goes
        ({"k_core": 3}, (0, 0, 0)),
        # k-core off: titles and duplicates only -> U1 {A,B}, U2 {A,B,D}, U3 {B,D,E}, U4 {E}, U5 {D}, U6 {E,A}, U7 {E,H}
        ({"k_core": 1}, (7, 5, 14)),
        # additionally titles of more than 3 words go: A ("Rose & Honey Lip Balm") and its 3 rows
        ({"k_core": 1, "max_title_words": 3}, (7, 4, 11)),
    ],
)
def test_fixture_counts(tiny, settings, expected):
    assert counts(preprocess(tiny, **settings)) == expected


def test_fixture_sequences_are_chronological_with_stable_ties(tiny):
    data = preprocess(tiny, k_core=2)
    assert per_user(data) == {
        # U1's file order is A@400, B@200, C@300, A@100: the chronologically first A survives
        "U1": [("ITEM_A", 100), ("ITEM_B", 200)],
        # A and B tie at 150: source order (A first) is kept
        "U2": [("ITEM_A", 150), ("ITEM_B", 150), (D, 500)],
        # D comes first in the file but B is older
        "U3": [("ITEM_B", 120), (D, 130), ("ITEM_E", 140)],
        "U6": [("ITEM_E", 90), ("ITEM_A", 95)],
    }
    assert list(pd.unique(data.interactions["user_id"])) == ["U1", "U2", "U3", "U6"]  # first-seen user order
    assert data.items["item_id"].tolist() == ["ITEM_A", "ITEM_B", D, "ITEM_E"]
    data.validate()


def test_titles_are_cleaned(tiny):
    titles = dict(preprocess(tiny, k_core=1, drop_untitled=False).items[["item_id", "title"]].itertuples(index=False))
    assert titles["ITEM_A"] == "Rose & Honey Lip Balm"  # &amp;
    assert titles["ITEM_E"] == "Wool Hat 'Classic'"  # &#39;
    assert titles["ITEM_B"] == "Trail Runner Boots"  # runs of spaces and a tab collapsed, ends stripped
    assert titles["ITEM_C"] == ""


def test_clean_title_edge_cases():
    assert clean_title(np.nan) == "" and clean_title(None) == ""
    assert clean_title(" \t\n ") == ""
    assert clean_title("Tom &amp;amp; Jerry") == "Tom &amp; Jerry"  # unescaped once, on purpose
    assert clean_title("A&nbsp;B") == "A B"  # a non-breaking space is whitespace too


def test_untitled_items_in_memory():
    inter = pd.DataFrame(
        {"user_id": ["u"] * 4, "item_id": list("abcd"), "timestamp": [1, 2, 3, 4], "rating": [np.nan] * 4}
    )
    items = pd.DataFrame({"item_id": list("abcd"), "title": ["Good", None, "   ", np.nan]})
    data = preprocess(InteractionData("t", inter, items), k_core=1)
    assert data.interactions["item_id"].tolist() == ["a"]
    assert data.items["title"].tolist() == ["Good"]


def test_preprocess_leaves_its_input_alone(tiny):
    before = tiny.interactions.copy(), tiny.items.copy()
    preprocess(tiny, k_core=2)
    pd.testing.assert_frame_equal(tiny.interactions, before[0])
    pd.testing.assert_frame_equal(tiny.items, before[1])


def test_k_core_iterates_to_a_fixed_point():
    # a chain: x has 2 users only while u3 stays; u3 has 2 items only while y stays; y has 1 user.
    inter = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u2", "u3", "u3"],
            "item_id": ["a", "b", "a", "b", "x", "y"],
            "timestamp": [1, 2, 1, 2, 1, 2],
        }
    )
    inter.loc[len(inter)] = ["u1", "x", 3]
    out = filter_k_core(inter, 2)
    # pass 1 drops y; pass 2 drops u3 (x only); pass 3 drops x (u1 only); then u1 {a,b}, u2 {a,b}
    assert sorted(map(tuple, out[["user_id", "item_id"]].to_numpy().tolist())) == [
        ("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b")
    ]
    assert filter_k_core(inter, 1) is inter  # k <= 1 disables


def test_k_core_property_on_synthetic():
    data = preprocess(simulate(150, 90, 6, 2, 0.5, 0.7, 0.6, 3, 12, seed=4), k_core=5)
    assert data.interactions.groupby("user_id").size().min() >= 5
    assert data.interactions.groupby("item_id").size().min() >= 5
    assert not data.interactions.duplicated(["user_id", "item_id"]).any()
    assert len(data.ground_truth) == data.interactions["user_id"].nunique()


def test_sample_users():
    data = preprocess(simulate(200, 120, 6, 2, 0.5, 0.7, 0.6, 8, 20, seed=0))
    assert sample_users(data, None, 0) is data
    assert sample_users(data, 200, 0) is data and sample_users(data, 10_000, 0) is data
    sample = sample_users(data, 20, seed=1)
    users = set(sample.interactions["user_id"])
    assert len(users) == 20
    full = data.interactions[data.interactions["user_id"].isin(users)].reset_index(drop=True)
    pd.testing.assert_frame_equal(sample.interactions, full)  # all their rows, original order
    assert set(sample.items["item_id"]) == set(sample.interactions["item_id"])  # only touched items
    assert set(sample.ground_truth["user_id"]) == users
    assert users == set(sample_users(data, 20, seed=1).interactions["user_id"])  # seeded
    assert users != set(sample_users(data, 20, seed=2).interactions["user_id"])
    sample.validate()
