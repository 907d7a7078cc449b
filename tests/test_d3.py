"""D3's preprocessing (dataset=cds_d3 / games_d3, reader amazon2018_d3) and its global 8:1:1 split (stage=global_split),
on the raw-format fixture of tests/fixtures/d3 (its make_fixtures.py says what each row is there for).

Hand-computed from the fixture, k = 5:
- window 2017-10 .. 2018-11 (no widening): P1..P6 x X1..X6 = 6 users, 6 items, 36 reviews (R1 has 4 reviews; W has 4
  users and goes first, then R2 is left with 4; D1..D8 are untitled; P2's repeat of X1 is dropped).
- widened to 2016-10 (min_items 10 > 6): + P1's Y1..Y6 and Q1..Q6 x Y1..Y11 = 12 users, 17 items, 108 reviews.
- samples = 108 - 12 = 96, ordered by target day, ties by first appearance (P6, P1, P2, ..., P5, Q1, ..., Q6):
  S2..S6 7 each, S7..S11 6 each (indices 0-64), T1 P1's X1 (65), T2..T6 6 each (66-95). int(96 * 0.8) = 76,
  int(96 * 0.9) = 86: train 0-75 (up to P3's X3), valid 76-85, test 86-95.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose
from recsim.data.d3 import d3_title, read_amazon2018_d3
from recsim.data.load import load_dataset
from recsim.data.schema import DataFileError
from recsim.protocols import build_protocol
from recsim.protocols.base import EncodedData
from recsim.protocols.global_split import part_ends
from recsim.schema import config_errors

FIXTURE = REPO / "tests" / "fixtures" / "d3"
CATEGORY = "CDs_and_Vinyl"
TWENTY = " ".join(f"w{i}" for i in range(1, 21))
P = ["P6", "P1", "P2", "P3", "P4", "P5"]  # the file's first-appearance order
Q = [f"Q{i}" for i in range(1, 7)]
X = [f"X{j}" for j in range(1, 7)]
Y = [f"Y{j}" for j in range(1, 12)]
SPLIT = OmegaConf.create({"name": "global_split", "shares": [0.8, 0.1, 0.1], "history_window": 10})


def utc(year: int, month: int, day: int = 1) -> int:
    return int(datetime(year, month, day, tzinfo=timezone.utc).timestamp())


def dataset_cfg(*overrides: str, data_dir: Path = FIXTURE):
    return compose(["dataset=cds_d3", f"dataset.data_dir={data_dir}", *overrides]).dataset


def encoded(*overrides: str) -> EncodedData:
    return EncodedData.from_data(load_dataset(dataset_cfg(*overrides), cache_dir=None))


@pytest.mark.parametrize("raw,expected", [
    ("Rock &amp; Roll Live", "Rock & Roll Live"),
    ("Don&#39;t Stop &quot;Believin&quot; Now", 'Don&#39;t Stop "Believin" Now'),  # D3 replaces only &quot; &amp;
    ('"Greatest Hits"', "Greatest Hits"),  # double quotes stripped from the ends
    (" Kind  of   Blue ", "Kind  of   Blue"),  # 6 words by D3's single-space count, <= 20
    (TWENTY, TWENTY),
    (TWENTY + " w21", None),
    (TWENTY.replace("w10 ", "w10  "), None),  # 20 words, but 21 pieces split on single spaces
    ("A", None), ("", None), (None, None), ('<span id="productTitle">Lost Album</span>', None),
])
def test_d3_title_rule(raw, expected):
    assert d3_title(raw, 20) == expected


def test_d3_title_without_a_word_limit():
    assert d3_title(TWENTY + " w21", None) == TWENTY + " w21"


def test_fixture_widened_once_by_hand():
    data = load_dataset(dataset_cfg("dataset.d3.min_items=10"), cache_dir=None)
    inter = data.interactions
    assert data.stats() == {"dataset": "cds_d3", "users": 12, "items": 17, "interactions": 108,
                            "timestamp_min": utc(2016, 10), "timestamp_max": utc(2018, 11)}
    assert pd.unique(inter["user_id"]).tolist() == P + Q  # users in order of their first kept review
    assert set(inter["item_id"]) == set(X + Y)  # D1..D8 (no usable title) and W (k-core) are gone
    assert not inter.duplicated(["user_id", "item_id"]).any()
    p2 = inter[inter.user_id == "P2"]
    assert p2.item_id.tolist() == X and p2.timestamp.tolist()[:3] == [utc(2018, 1), utc(2018, 2), utc(2018, 3)]
    p3 = inter[inter.user_id == "P3"]
    assert p3.item_id.tolist() == X  # its Y2 after the window's end and Y1 of 2015 are outside
    assert inter[inter.user_id == "Q1"].timestamp.iloc[0] == utc(2016, 10)  # the inclusive start
    titles = dict(zip(data.items.item_id, data.items.title))
    assert [titles[x] for x in X] == [
        "Rock & Roll Live",
        "One Two Three Four Five Six Seven Eight Nine Ten Eleven Twelve Thirteen Fourteen Fifteen Sixteen "
        "Seventeen Eighteen Nineteen Twenty",
        "Don't Stop \"Believin\" Now",  # the entity D3 leaves is unescaped by the common preprocessing
        "Blue Train (Remastered)",  # the last of its two metadata lines
        "Greatest Hits",
        "Kind of Blue",  # whitespace collapsed
    ]
    assert titles["Y11"] == "Quiet Album 11"
    window = data.meta["window"]
    assert (window["start"], window["end"], window["years_widened"], window["items"]) == ("2016-10", "2018-11", 1, 17)
    assert data.meta["reviewed_items_without_usable_title"] == 8


def test_no_widening_when_the_window_has_enough_items():
    data = read_amazon2018_d3(FIXTURE, CATEGORY, min_items=6)
    assert data.meta["window"]["start"] == "2017-10" and data.meta["window"]["years_widened"] == 0
    assert data.stats()["users"] == 6 and data.stats()["items"] == 6 and data.stats()["interactions"] == 36
    proto = build_protocol(SPLIT, EncodedData.from_data(data))
    assert proto.description["whole_data"]["samples"] == {"train": 24, "valid": 3, "test": 3}  # 30 samples
    names = lambda split: [(proto.data.user_ids[s.user], proto.data.item_ids[s.target]) for s in split.samples["all"]]
    assert names(proto.valid_splits["test"]) == [("P6", "X6"), ("P1", "X6"), ("P2", "X6")]
    assert names(proto.splits["test"]) == [("P3", "X6"), ("P4", "X6"), ("P5", "X6")]


def test_widening_stops_at_the_earliest_year(caplog):
    caplog.set_level(logging.INFO, logger="recsim.data.d3")
    data = read_amazon2018_d3(FIXTURE, CATEGORY, min_items=18, earliest_year=2015)
    window = data.meta["window"]
    assert (window["start"], window["years_widened"], window["items"]) == ("2015-10", 2, 17)  # Z1 (3 reviews) goes
    assert any(r.levelno == logging.WARNING and "earliest_year=2015" in r.message for r in caplog.records)
    kept = read_amazon2018_d3(FIXTURE, CATEGORY, min_items=18, earliest_year=2017)
    assert kept.meta["window"]["start"] == "2017-10" and kept.stats()["items"] == 6


def test_window_end_is_inclusive_and_configurable():
    assert read_amazon2018_d3(FIXTURE, CATEGORY, min_items=6).stats()["timestamp_max"] == utc(2018, 11)
    earlier = read_amazon2018_d3(FIXTURE, CATEGORY, min_items=5, window_end="2018-10")  # X6 (2018-11-01) is out
    assert earlier.stats() == {"dataset": "amazon2018_d3-CDs_and_Vinyl", "users": 6, "items": 5, "interactions": 30,
                               "timestamp_min": utc(2018, 1), "timestamp_max": utc(2018, 5)}


def test_global_split_by_hand():
    data = encoded("dataset.d3.min_items=10")
    proto = build_protocol(SPLIT, data)
    user = {u: i for i, u in enumerate(data.user_ids)}
    item = {iid: i for i, iid in enumerate(data.item_ids)}
    assert proto.description["whole_data"]["samples"] == {"train": 76, "valid": 10, "test": 10}
    assert proto.description["whole_data"]["target_dates"] == {
        "train": ["2016-12-01", "2018-03-01"], "valid": ["2018-03-01", "2018-05-01"],
        "test": ["2018-05-01", "2018-11-01"]}
    (stage,) = proto.stages
    assert (stage.index, stage.name, stage.eval_split, proto.window) == (0, "train", "test", 10)
    by_name = {data.user_ids[u]: ps for u, ps in stage.new_targets.items()}
    assert by_name == {"P6": [1, 2], "P1": list(range(1, 9)), "P2": [1, 2], "P3": [1, 2], "P4": [1], "P5": [1],
                       **{q: list(range(1, 11)) for q in Q}}
    assert stage.cumulative_targets == stage.new_targets and stage.cumulative_targets is not stage.new_targets
    assert sorted(stage.sequences) == sorted(user.values()) and stage.inactive_users == []
    test, valid = proto.splits["test"], proto.valid_splits["test"]
    assert list(test.samples) == ["all"] and (valid.name, valid.role) == ("test_valid", "valid")
    named = lambda split: [(data.user_ids[s.user], data.item_ids[s.target], s.position) for s in split.samples["all"]]
    assert named(test) == [("P2", "X5", 4), ("P3", "X5", 4), ("P4", "X5", 4), ("P5", "X5", 4), ("P6", "X6", 5),
                           ("P1", "X6", 11), ("P2", "X6", 5), ("P3", "X6", 5), ("P4", "X6", 5), ("P5", "X6", 5)]
    assert named(valid) == [("P4", "X3", 2), ("P5", "X3", 2), ("P6", "X4", 3), ("P1", "X4", 9), ("P2", "X4", 3),
                            ("P3", "X4", 3), ("P4", "X4", 3), ("P5", "X4", 3), ("P6", "X5", 4), ("P1", "X5", 10)]
    p1_last = test.samples["all"][5]
    # history capped at 10: P1 has 11 items before X6, Y1 (the oldest) is dropped
    assert p1_last.history == tuple(item[i] for i in Y[1:6] + X[:5])
    trained = {(u, p) for u, ps in stage.new_targets.items() for p in ps}
    assert not trained & {(s.user, s.position) for s in test.all_samples() + valid.all_samples()}


def test_a_user_sample_keeps_the_whole_datas_parts():
    data = encoded("dataset.d3.min_items=10")
    p1, q1 = data.user_ids.index("P1"), data.user_ids.index("Q1")
    proto = build_protocol(SPLIT, data, users=[q1, p1])
    assert [(s.user, data.item_ids[s.target]) for s in proto.splits["test"].samples["all"]] == [(p1, "X6")]
    assert [(s.user, data.item_ids[s.target]) for s in proto.valid_splits["test"].samples["all"]] == \
        [(p1, "X4"), (p1, "X5")]
    assert proto.stages[0].new_targets == {p1: list(range(1, 9)), q1: list(range(1, 11))}
    assert proto.description["whole_data"]["samples"] == {"train": 76, "valid": 10, "test": 10}


# 185,858 = L2D's CDs total: D3's cuts give train 148,686 / valid 18,586 / test 18,586, where the paper prints
# 148,685 / 18,586 / 18,587 (Games likewise: one sample moved from train to test)
@pytest.mark.parametrize("n,ends", [(96, (76, 86)), (30, (24, 27)), (10, (8, 9)), (185_858, (148_686, 167_272))])
def test_part_ends_are_d3s_int_cuts(n, ends):
    assert part_ends(n, [0.8, 0.1, 0.1]) == ends


def test_bad_shares_are_refused():
    with pytest.raises(ValueError, match=r"stage.shares=\[0.8, 0.1\]"):
        part_ends(10, [0.8, 0.1])
    with pytest.raises(ValueError, match="summing to 1"):
        part_ends(10, [0.8, 0.1, 0.2])


def test_same_input_same_tables_and_splits(tmp_path):
    cfg = dataset_cfg("dataset.d3.min_items=10")
    first = load_dataset(cfg, cache_dir=tmp_path)
    again = load_dataset(cfg, cache_dir=tmp_path)
    fresh = load_dataset(cfg, cache_dir=None)
    assert again.meta["cache_hit"] and not first.meta["cache_hit"]
    for other in (again, fresh):
        pd.testing.assert_frame_equal(first.interactions, other.interactions)
        pd.testing.assert_frame_equal(first.items, other.items)
    protos = [build_protocol(SPLIT, EncodedData.from_data(d)) for d in (first, again)]
    assert protos[0].splits["test"].samples == protos[1].splits["test"].samples
    assert protos[0].valid_splits["test"].samples == protos[1].valid_splits["test"].samples
    assert protos[0].stages[0].new_targets == protos[1].stages[0].new_targets


def test_the_5core_file_is_read_with_reviews_5core(tmp_path):
    shutil.copy(FIXTURE / f"{CATEGORY}.json.gz", tmp_path / f"{CATEGORY}_5.json.gz")
    shutil.copy(FIXTURE / f"meta_{CATEGORY}.json.gz", tmp_path)
    data = read_amazon2018_d3(tmp_path, CATEGORY, reviews="5core", min_items=10)
    assert data.meta["reviews_file"] == f"{CATEGORY}_5.json.gz" and data.stats()["interactions"] == 108


@pytest.mark.parametrize("dataset,reviews,missing", [
    ("cds_d3", "full", "CDs_and_Vinyl.json.gz"),
    ("cds_d3", "5core", "CDs_and_Vinyl_5.json.gz"),
    ("games_d3", "full", "Video_Games.json.gz"),
])
def test_a_missing_review_file_says_what_to_get_and_where(tmp_path, dataset, reviews, missing):
    cfg = compose([f"dataset={dataset}", f"dataset.data_dir={tmp_path}", f"dataset.d3.reviews={reviews}"]).dataset
    with pytest.raises(DataFileError) as err:
        load_dataset(cfg, cache_dir=None)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / missing}: file not found")
    assert f"expected this file in {tmp_path}" in message and "https://nijianmo.github.io/amazon/index.html" in message
    assert f"meta_{cfg.category}.json.gz" in message  # both files are named
    assert f"dataset.d3.reviews={'5core' if reviews == 'full' else 'full'}" in message  # and the other review file


def test_a_missing_metadata_file_is_named_before_reading_reviews(tmp_path):
    shutil.copy(FIXTURE / f"{CATEGORY}.json.gz", tmp_path)
    with pytest.raises(DataFileError, match=rf"meta_{CATEGORY}\.json\.gz: file not found"):
        read_amazon2018_d3(tmp_path, CATEGORY)


def test_bad_months_are_refused_by_the_reader():
    with pytest.raises(ValueError, match=r"dataset.d3.window_start='2017-13': expected a month written YYYY-MM"):
        read_amazon2018_d3(FIXTURE, CATEGORY, window_start="2017-13")
    with pytest.raises(ValueError, match="is not before dataset.d3.window_end"):
        read_amazon2018_d3(FIXTURE, CATEGORY, window_start="2018-11")


def test_configs_compose_and_validate():
    cfg = compose(["dataset=cds_d3", "stage=global_split"])
    assert config_errors(cfg) == []
    assert (cfg.dataset.reader, cfg.dataset.category, cfg.dataset.k_core) == ("amazon2018_d3", "CDs_and_Vinyl", 5)
    assert OmegaConf.to_container(cfg.dataset.d3) == {"reviews": "full", "window_start": "2017-10", "window_end": "2018-11",
                                                      "min_items": 10000, "earliest_year": 1996, "max_title_words": 20}
    assert (list(cfg.stage.shares), cfg.stage.history_window) == ([0.8, 0.1, 0.1], 10)
    assert compose(["dataset=games_d3"]).dataset.category == "Video_Games"


@pytest.mark.parametrize("overrides,message", [
    (["dataset.d3.window_start=2017-13"], "dataset.d3.window_start='2017-13': expected a month written YYYY-MM"),
    (["dataset.d3.window_start=2019-01"], "dataset.d3.window_start='2019-01': expected a month before "
                                          "dataset.d3.window_end='2018-11'"),
    (["dataset.d3.reviews=all"], "dataset.d3.reviews='all': expected one of full, 5core"),
    (["dataset.d3.min_items=0"], "dataset.d3.min_items=0: expected an integer >= 1"),
    (["stage.shares=[0.8,0.2]"], "stage.shares=[0.8, 0.2]: expected three shares (train, valid, test) summing to 1"),
    (["stage.shares=[0.8,0.1,0.2]"], "stage.shares=[0.8, 0.1, 0.2]: expected three shares"),
    (["stage.history_window=0"], "stage.history_window=0: expected an integer >= 1"),
])
def test_bad_config_values_are_named(overrides, message):
    errors = config_errors(compose(["dataset=cds_d3", "stage=global_split", *overrides]))
    assert any(e.startswith(message) for e in errors), errors


@pytest.mark.slow
def test_end_to_end_run_on_the_fixture(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "recsim.run", "dataset=cds_d3", f"dataset.data_dir={FIXTURE}",
           "dataset.d3.min_items=10", "stage=global_split", "backbone=tiny_llama", "debug=smoke", "method=base",
           "eval.negatives=5",  # P1 has touched 12 of the 17 items
           f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(out / "results.csv")
    assert (df.dataset == "cds_d3").all() and set(df.split) >= {"test", "test_valid"}
    rows = df[(df.eval_mode == "candidates") & (df.metric == "HR@1")].set_index("split")
    assert rows.loc["test", "n_users"] == 10 and rows.loc["test_valid", "n_users"] == 10  # samples, not users
    assert (out / "DONE").is_file()
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["protocol"] == "global_split" and protocol["splits"] == {"test": {"all": 10}}
    assert protocol["whole_data"]["samples"] == {"train": 76, "valid": 10, "test": 10}
