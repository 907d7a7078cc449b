"""RecBole atomic files (dataset.reader=recbole): exact counts on a 13-row fixture, and every error.

Fixture tests/fixtures/recbole/tiny (hand-counted):
  raw: 5 users (u1..u5), 5 items (i1..i5), 13 rows; i4 has an empty title, i5 no .item row, i9 is
  listed but never bought; u1 buys i1 twice; u4 has one row; an extra `review` field is ignored.
  k_core=2, drop_untitled: drop i4 and i5 (2 rows) -> 11; drop u1's second i1 -> 10; k-core drops u4
  -> 4 users (u1, u2, u3, u5), 3 items (i1, i2, i3), 9 interactions.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from recsim.data.load import READERS, load_dataset
from recsim.data.readers import read_recbole, recbole_files
from recsim.data.schema import DataFileError

FIXTURES = Path(__file__).parent / "fixtures" / "recbole"
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def counts(data) -> tuple[int, int, int]:
    stats = data.stats()
    return stats["users"], stats["items"], stats["interactions"]


def test_reads_the_raw_tables_as_written():
    data = read_recbole(FIXTURES, "tiny")
    assert counts(data) == (5, 5, 13)
    inter = data.interactions
    assert inter["user_id"].tolist()[:4] == ["u1"] * 4 and inter["item_id"].tolist()[:3] == ["i1", "i3", "i2"]
    assert inter["timestamp"].tolist()[:3] == [100, 300, 200] and str(inter["timestamp"].dtype) == "int64"
    assert inter["rating"].tolist()[:3] == [5.0, 4.0, 3.0]
    assert list(inter.columns) == ["user_id", "item_id", "timestamp", "rating"]  # `review` ignored
    titles = dict(zip(data.items["item_id"], data.items["title"]))
    assert titles == {"i1": 'Lip "Gloss", red', "i3": "Nail &amp; polish", "i2": "Shampoo 250 ml", "i4": "", "i5": ""}
    assert list(data.items["item_id"]) == ["i1", "i3", "i2", "i4", "i5"]  # first occurrence in .inter
    assert data.meta["items_without_meta"] == 1  # i5


def test_load_dataset_preprocesses_it_like_any_reader(tmp_path):
    cfg = {"name": "tiny", "reader": "recbole", "data_dir": str(FIXTURES), "folder": "tiny", "k_core": 2}
    data = load_dataset(cfg, cache_dir=tmp_path / "cache")
    assert counts(data) == (4, 3, 9)
    u1 = data.interactions[data.interactions.user_id == "u1"]
    assert u1["item_id"].tolist() == ["i1", "i2", "i3"]  # chronological, the 400 repeat of i1 dropped
    titles = dict(zip(data.items["item_id"], data.items["title"]))
    assert titles["i3"] == "Nail & polish"  # preprocessing's HTML unescape
    assert counts(load_dataset(cfg, cache_dir=tmp_path / "cache")) == (4, 3, 9)  # from the cache
    assert READERS["recbole"].sources(cfg) == recbole_files(FIXTURES, "tiny")


def test_no_rating_field_gives_nan_and_the_title_field_is_configurable(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "shop.inter").write_text("item_id:token\tuser_id:token\ttimestamp:float\nA\tu\t5\nB\tu\t7\n")
    (folder / "shop.item").write_text("item_id:token\tname:token\nA\tAlpha\nB\tBeta\n")
    data = read_recbole(tmp_path, "d", "shop", title_field="name")
    assert data.interactions["rating"].map(math.isnan).all() and data.interactions["user_id"].tolist() == ["u", "u"]
    assert data.items["title"].tolist() == ["Alpha", "Beta"]
    with pytest.raises(DataFileError, match=r"shop.item: header lacks a field \(has \['item_id', 'name'\]\).*'title'"):
        read_recbole(tmp_path, "d", "shop")


def copy_fixture(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURES / "tiny", tmp_path / "tiny")
    return tmp_path / "tiny" / "tiny.inter"


def test_missing_file_says_what_to_put_where(tmp_path):
    hint = r"nothere\.inter: file not found.*write RecBole atomic files <data_dir>/<folder>/<name>\.inter"
    with pytest.raises(DataFileError, match=hint):
        read_recbole(tmp_path, "nothere")
    inter = copy_fixture(tmp_path)
    (inter.parent / "tiny.item").unlink()
    with pytest.raises(DataFileError, match=r"tiny\.item: file not found"):
        read_recbole(tmp_path, "tiny")


def test_header_without_a_required_field_lists_the_header(tmp_path):
    inter = copy_fixture(tmp_path)
    inter.write_text("user_id:token\titem_id:token\trating:float\n" "u1\ti1\t5\n")
    with pytest.raises(DataFileError, match=r"header lacks a field \(has \['user_id', 'item_id', 'rating'\]\) "
                                            r"at line 1 \(field 'timestamp'\)"):
        read_recbole(tmp_path, "tiny")


def test_row_with_the_wrong_cell_count_names_the_line(tmp_path):
    inter = copy_fixture(tmp_path)
    inter.write_text(INTER_HEADER + "u1\ti1\t5\t100\n" "u1\ti2\t200\n")
    with pytest.raises(DataFileError, match=r"3 tab-separated cells, the header has 4 at line 3"):
        read_recbole(tmp_path, "tiny")


def test_timestamp_that_is_not_a_number_names_line_and_field(tmp_path):
    inter = copy_fixture(tmp_path)
    inter.write_text(INTER_HEADER + "u1\ti1\t5\t100\n" "u1\ti2\t4\t2014-05-01\n")
    with pytest.raises(DataFileError, match=r"'2014-05-01' is not a number at line 3 \(field 'timestamp'\)"):
        read_recbole(tmp_path, "tiny")
    inter.write_text(INTER_HEADER + "u1\ti1\tgood\t100\n")
    with pytest.raises(DataFileError, match=r"'good' is not a number at line 2 \(field 'rating'\)"):
        read_recbole(tmp_path, "tiny")
    inter.write_text(INTER_HEADER + "\ti1\t5\t100\n")
    with pytest.raises(DataFileError, match=r"empty value at line 2 \(field 'user_id'\)"):
        read_recbole(tmp_path, "tiny")


def test_dataset_config_composes():
    from tests.conftest import compose

    cfg = compose(["dataset=recbole", "dataset.folder=tiny", f"dataset.data_dir={FIXTURES}", "dataset.k_core=2"])
    assert cfg.dataset.reader == "recbole" and cfg.dataset.name == "recbole" and cfg.dataset.title_field == "title"
    assert compose(["dataset=recbole", "dataset.folder=tiny", "dataset.name=tiny"]).dataset.name == "tiny"
    assert counts(load_dataset(cfg.dataset, cache_dir=None)) == (4, 3, 9)
