"""Readers: the staged Amazon 2014 copies (exact MANIFEST counts) and the raw 2014/2018 formats on fixtures.

The staged data is found through env RECSIM_DATA, else ../shared/data next to the repository; the
tests that need it are skipped (with the reason) when neither has it. Each staged dataset is read once
per module: the CSVs take about a second each.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recsim.data.load import load_dataset
from recsim.data.preprocess import preprocess
from recsim.data.readers import (
    URL_2014,
    URL_2018,
    read_amazon2014_staged,
    read_amazon2018,
    read_mcauley2014,
)
from recsim.data.schema import DataFileError

RAW = Path(__file__).parent / "fixtures" / "raw"
CONF = Path(__file__).parents[1] / "recsim" / "conf"


def staged_data_dir() -> Path | None:
    candidates = [os.environ.get("RECSIM_DATA"), Path(__file__).parents[2] / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "amazon_beauty" / "interactions.csv.gz").is_file():
            return Path(candidate)
    return None


STAGED = staged_data_dir()
needs_staged = pytest.mark.skipif(
    STAGED is None,
    reason="staged Amazon 2014 data not found: set RECSIM_DATA to a folder with amazon_beauty/ and amazon_toys/ "
    "(see shared/data/MANIFEST.md), or place it at ../shared/data next to the repository",
)


@pytest.fixture(scope="module")
def beauty():
    return read_amazon2014_staged(STAGED, "amazon_beauty")


@pytest.fixture(scope="module")
def toys():
    return read_amazon2014_staged(STAGED, "amazon_toys")


def counts(data) -> tuple[int, int, int]:
    stats = data.stats()
    return stats["users"], stats["items"], stats["interactions"]


# ------------------------------------------------------------------------------------ staged, real data


@needs_staged
def test_staged_beauty_matches_manifest(beauty):
    assert counts(beauty) == (22_363, 12_101, 198_502)
    assert (beauty.stats()["timestamp_min"], beauty.stats()["timestamp_max"]) == (1_023_840_000, 1_406_073_600)
    assert beauty.interactions["rating"].isna().all()
    # file order is kept: the first user's first rows (a same-day tie) in source order
    head = beauty.interactions.head(2)
    assert head["user_id"].tolist() == ["A1YJEY40YUW4SE"] * 2
    assert head["item_id"].tolist() == ["B004756YJA", "B004ZT0SSG"]
    # 5-core as staged: keeping untitled items reproduces the official counts exactly
    assert counts(preprocess(beauty, k_core=5, drop_untitled=False)) == (22_363, 12_101, 198_502)


@needs_staged
def test_staged_beauty_default_filtering(beauty):
    # Beauty has exactly 7 untitled items (MANIFEST) with 131 interactions; dropping them and re-running the
    # 5-core cascade removes 31 users and 8 more items: 12,101 - 7 - 8 = 12,086 items.
    # (Computed once with preprocess and confirmed by an independent drop-then-k-core loop.)
    data = preprocess(beauty)
    assert counts(data) == (22_332, 12_086, 198_215)
    untitled = {"B00B4C35IW", "B000GZES7A", "B001RD37ZO", "B001MP0T2Q", "B00ALHISAQ", "B001S3I57S", "B001DJ2USM"}
    assert set(beauty.items.loc[beauty.items["title"].str.strip() == "", "item_id"]) == untitled
    assert not untitled & set(data.interactions["item_id"])
    assert (data.interactions.groupby("user_id").size() >= 5).all()
    assert (data.interactions.groupby("item_id").size() >= 5).all()
    # raw titles carry HTML entities; processed ones do not
    entity = r"&(?:amp|quot|#39|lt|gt);"
    assert beauty.items["title"].str.contains(entity).sum() > 1000
    assert data.items["title"].str.contains(entity).sum() == 0
    assert set(data.items.columns) >= {"item_id", "title", "brand", "categories", "price"}
    assert data.items.set_index("item_id").at["7806397051", "categories"][:2] == ["Beauty", "Makeup"]


@needs_staged
def test_staged_toys_matches_manifest_and_default_filtering(toys):
    assert counts(toys) == (19_412, 11_924, 167_597)
    assert (toys.interactions["timestamp"].min(), toys.interactions["timestamp"].max()) == (964_742_400, 1_406_073_600)
    assert counts(preprocess(toys, k_core=5, drop_untitled=False)) == (19_412, 11_924, 167_597)
    # Toys has 59 untitled items (840 interactions); after dropping them the 5-core cascade removes 288
    # users and 107 more items: 11,924 - 59 - 107 = 11,758. Computed once, confirmed independently.
    assert (toys.items["title"].str.strip() == "").sum() == 59
    assert counts(preprocess(toys)) == (19_124, 11_758, 165_247)
    # ISBN-like ids keep their leading zero (ids are read as strings)
    assert "0439893577" in set(toys.items["item_id"])


@needs_staged
def test_beauty_config_loads_staged_data(monkeypatch):
    monkeypatch.setenv("RECSIM_DATA", str(STAGED))
    root = OmegaConf.create(
        {"seed": 3, "paths": OmegaConf.load(CONF / "paths" / "default.yaml"), "dataset": OmegaConf.load(CONF / "dataset" / "beauty.yaml")}
    )
    data = load_dataset(root.dataset, cache_dir=None)
    assert data.name == "beauty"
    assert counts(data) == (22_332, 12_086, 198_215)


# ------------------------------------------------------------------------------------ raw formats


def test_mcauley2014_fixture_raw_tables():
    data = read_mcauley2014(RAW / "mcauley2014", "Tiny")
    assert counts(data) == (7, 8, 19)  # raw: nothing filtered
    assert data.interactions.columns.tolist() == ["user_id", "item_id", "timestamp", "rating"]
    assert data.interactions.iloc[0].tolist() == ["U1", "ITEM_A", 400, 5.0]  # file order kept
    items = data.items.set_index("item_id")
    assert "ITEM_Z" not in items.index  # metadata of unreviewed items is not kept
    assert items.at["ITEM_A", "title"] == "Rose &amp; Honey Lip Balm"  # raw: unescaped later
    assert items.at["ITEM_A", "categories"] == ["Beauty", "Lips", "Gifts"]  # list of lists flattened
    assert (items.at["ITEM_A", "sales_rank"], items.at["ITEM_A", "sales_type"]) == (1234.0, "Beauty")
    assert items.at["0439893577", "title"] == "Magnetic Tabletop Easel"  # strict-JSON line via the fallback
    assert math.isnan(items.at["0439893577", "price"])
    assert items.at["ITEM_F", "title"] == ""  # no title field
    assert items.at["ITEM_G", "title"] == ""  # no metadata line at all


def test_amazon2018_fixture_raw_tables():
    data = read_amazon2018(RAW / "amazon2018", "Tiny")
    assert counts(data) == (7, 8, 19)
    items = data.items.set_index("item_id")
    assert items.at["ITEM_A", "title"] == "Rose &amp; Honey Lip Balm"  # first of two meta lines wins
    assert items.at["ITEM_A", "price"] == 4.5
    assert items.at["0439893577", "price"] == 1299.0  # "$1,299.00"
    assert math.isnan(items.at["ITEM_B", "price"])  # a price range is not one number
    assert items.at["ITEM_E", "categories"] == ["Clothing"]
    assert items.at["ITEM_H", "title"] == "Pocket Kite"  # found although its asin is the last key
    assert data.interactions["rating"].tolist()[:3] == [5.0, 4.0, 3.0]


# ------------------------------------------------------------------------------------ broken files


@pytest.mark.parametrize(
    "read, arg, missing, hint",
    [
        (read_mcauley2014, "Beauty", "reviews_Beauty_5.json.gz", URL_2014),
        (read_amazon2018, "Video_Games", "Video_Games_5.json.gz", URL_2018),
        (read_amazon2014_staged, "amazon_beauty", "interactions.csv.gz", "build_amazon2014.py"),
    ],
)
def test_missing_file_names_path_directory_and_source(tmp_path, read, arg, missing, hint):
    with pytest.raises(DataFileError) as err:
        read(tmp_path, arg)
    message = str(err.value)
    assert missing in message and "file not found" in message
    assert str(tmp_path) in message and "RECSIM_DATA" in message
    assert hint in message


def test_missing_meta_file_is_named(tmp_path):
    shutil.copy(RAW / "mcauley2014" / "reviews_Tiny_5.json.gz", tmp_path)
    with pytest.raises(DataFileError, match=r"meta_Tiny\.json\.gz: file not found.*meta_Tiny\.json\.gz from https://cseweb"):
        read_mcauley2014(tmp_path, "Tiny")


def test_malformed_line_names_file_and_line():
    with pytest.raises(DataFileError, match=r"reviews_Broken_5\.json\.gz: unparseable line .* at line 3\b"):
        read_mcauley2014(RAW / "malformed", "Broken")


def test_missing_field_names_file_line_and_field():
    with pytest.raises(DataFileError, match=r"Broken_5\.json\.gz: missing required field at line 2 \(field 'asin'\)"):
        read_amazon2018(RAW / "malformed", "Broken")


def test_staged_bad_timestamp_names_line_and_field():
    with pytest.raises(DataFileError, match=r"interactions\.csv\.gz: timestamp is not an integer at line 4 \(field 'timestamp'\)"):
        read_amazon2014_staged(RAW / "malformed", "staged_broken")


def test_malformed_meta_line(tmp_path):
    shutil.copy(RAW / "mcauley2014" / "reviews_Tiny_5.json.gz", tmp_path)
    with gzip.open(tmp_path / "meta_Tiny.json.gz", "wt") as handle:
        handle.write("{'asin': 'ITEM_A', 'title': 'ok'}\n{'asin': 'ITEM_B', 'title': 'unclosed\n")
    with pytest.raises(DataFileError, match=r"meta_Tiny\.json\.gz: unparseable line .* at line 2"):
        read_mcauley2014(tmp_path, "Tiny")


def test_truncated_gzip_is_reported(tmp_path):
    for name in ("reviews_Tiny_5.json.gz", "meta_Tiny.json.gz"):
        shutil.copy(RAW / "mcauley2014" / name, tmp_path)
    reviews = tmp_path / "reviews_Tiny_5.json.gz"
    reviews.write_bytes(reviews.read_bytes()[:-20])  # cut off the end of the stream
    with pytest.raises(DataFileError, match=r"reviews_Tiny_5\.json\.gz: truncated or corrupt gzip"):
        read_mcauley2014(tmp_path, "Tiny")
    reviews.write_bytes(b"not gzip at all")
    with pytest.raises(DataFileError, match=r"reviews_Tiny_5\.json\.gz: truncated or corrupt gzip"):
        read_mcauley2014(tmp_path, "Tiny")


def test_staged_truncated_and_missing_column(tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(RAW / "malformed" / "staged_broken", folder)
    inter = folder / "interactions.csv.gz"
    inter.write_bytes(inter.read_bytes()[:-10])
    with pytest.raises(DataFileError, match=r"interactions\.csv\.gz: truncated or corrupt gzip"):
        read_amazon2014_staged(tmp_path, "tiny")
    with gzip.open(inter, "wt") as handle:
        handle.write("user_id,item_id\nU1,ITEM_A\n")
    with pytest.raises(DataFileError, match=r"interactions\.csv\.gz: header lacks a column .*\(field 'timestamp'\)"):
        read_amazon2014_staged(tmp_path, "tiny")


def test_staged_reader_on_a_tiny_copy(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    with gzip.open(folder / "interactions.csv.gz", "wt") as handle:
        handle.write("user_id,item_id,timestamp\nU1,0439893577,200\nU1,B1,100\nU2,B1,100\n")
    with gzip.open(folder / "items.csv.gz", "wt") as handle:
        handle.write('item_id,title\n0439893577,"Tool Box &amp; Easel"\nB1,\n')
    data = read_amazon2014_staged(tmp_path, "tiny")
    assert counts(data) == (2, 2, 3)
    assert data.interactions["item_id"].tolist() == ["0439893577", "B1", "B1"]  # file order, leading zero kept
    assert data.items["title"].tolist() == ["Tool Box &amp; Easel", ""]  # empty cell -> "", not NaN
    processed = preprocess(data, k_core=1)
    assert processed.items["title"].tolist() == ["Tool Box & Easel"]
    assert processed.interactions["timestamp"].tolist() == [200]
