"""The parquet cache and load_dataset: hits skip the readers, damaged entries are rebuilt, keys move
with settings and source files; plus the dataset/paths config files."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from recsim.data.cache import (DATA_FORMAT_VERSION, MEMO_FILE, cache_key, content_hash, drop_path_keys, load_or_build,
                               package_hash)
from recsim.data.load import READERS, Reader, default_data_dir, load_dataset
from recsim.data.schema import InteractionData
from recsim.data.synthetic import simulate

RAW = Path(__file__).parent / "fixtures" / "raw"
CONF = Path(__file__).parents[1] / "recsim" / "conf"


def tiny_cfg(data_dir: Path, **overrides) -> dict:
    cfg = {
        "name": "tiny",
        "reader": "mcauley2014",
        "data_dir": str(data_dir),
        "folder": None,
        "category": "Tiny",
        "k_core": 2,
        "drop_untitled": True,
        "max_title_words": None,
        "sample_users": None,
        "sample_seed": 0,
    }
    return {**cfg, **overrides}


@pytest.fixture
def counting(monkeypatch):
    """Wrap the mcauley2014 reader so tests can see whether the sources were read."""
    calls = []
    original = READERS["mcauley2014"]

    def read(cfg):
        calls.append(cfg["category"])
        return original.read(cfg)

    monkeypatch.setitem(READERS, "mcauley2014", Reader(read=read, sources=original.sources, args=original.args))
    return calls


def entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if p.name != MEMO_FILE)


def test_second_load_skips_the_reader(tmp_path, counting):
    cache = tmp_path / "cache"
    first = load_dataset(tiny_cfg(RAW / "mcauley2014"), cache_dir=cache)
    second = load_dataset(tiny_cfg(RAW / "mcauley2014"), cache_dir=cache)
    assert counting == ["Tiny"]  # read once
    assert (first.meta["cache_hit"], second.meta["cache_hit"]) == (False, True)
    for table in ("interactions", "items"):
        pd.testing.assert_frame_equal(getattr(first, table), getattr(second, table))
    assert second.stats() == first.stats()
    assert (first.stats()["users"], first.stats()["items"], first.stats()["interactions"]) == (4, 4, 10)
    (entry,) = entries(cache)  # no temp dirs left behind
    assert entry.name.startswith("tiny-")
    stats = json.loads((entry / "stats.json").read_text())
    assert {k: stats[k] for k in ("users", "items", "interactions", "timestamp_min", "timestamp_max")} == {
        "users": 4, "items": 4, "interactions": 10, "timestamp_min": 90, "timestamp_max": 500
    }
    assert second.items.set_index("item_id").at["ITEM_A", "categories"] == ["Beauty", "Lips", "Gifts"]


def test_settings_and_source_changes_give_new_entries(tmp_path, counting):
    cache, data_dir = tmp_path / "cache", tmp_path / "raw"
    shutil.copytree(RAW / "mcauley2014", data_dir)
    load_dataset(tiny_cfg(data_dir), cache_dir=cache)
    changed = load_dataset(tiny_cfg(data_dir, drop_untitled=False), cache_dir=cache)
    assert changed.stats()["interactions"] == 13
    assert len(entries(cache)) == 2 and len(counting) == 2
    reviews = data_dir / "reviews_Tiny_5.json.gz"
    info = reviews.stat()
    os.utime(reviews, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))  # touched, same bytes
    load_dataset(tiny_cfg(data_dir), cache_dir=cache)
    assert len(entries(cache)) == 2 and len(counting) == 2  # the key is the content, not the mtime
    moved = tmp_path / "elsewhere" / "raw"
    shutil.copytree(data_dir, moved)  # the same bytes in another folder: the same entry
    load_dataset(tiny_cfg(moved), cache_dir=cache)
    assert len(entries(cache)) == 2 and len(counting) == 2
    blob = bytearray(reviews.read_bytes())
    blob[4] ^= 1  # one byte of the gzip header's MTIME field: other bytes, the same decompressed rows
    reviews.write_bytes(bytes(blob))
    load_dataset(tiny_cfg(data_dir), cache_dir=cache)
    assert len(entries(cache)) == 3 and len(counting) == 3
    load_dataset(tiny_cfg(data_dir, sample_users=2, sample_seed=5), cache_dir=cache)  # sampling is after the cache
    assert len(entries(cache)) == 3 and len(counting) == 3


def test_content_hash_is_memoised_by_path_size_mtime(tmp_path, monkeypatch):
    source, memo = tmp_path / "a.csv", tmp_path / "cache"
    source.write_bytes(b"abc")
    # sha256("abc"), the FIPS 180-2 test vector
    assert content_hash(source, memo) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    key = next(iter(json.loads((memo / MEMO_FILE).read_text())))
    assert key.endswith(f"|3|{source.stat().st_mtime_ns}")
    monkeypatch.setattr("recsim.data.cache._MEMO", {})  # a new process: only the memo file is left
    (memo / MEMO_FILE).write_text(json.dumps({key: "from-the-memo"}))
    assert content_hash(source, memo) == "from-the-memo"  # the file was not read again
    source.write_bytes(b"abcd")  # new size: hashed again
    assert content_hash(source, memo) == "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"


def test_package_hash_follows_the_sources(tmp_path):
    pkg = tmp_path / "recsim"
    shutil.copytree(Path(__file__).parents[1] / "recsim", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = package_hash(pkg)
    (pkg / "notes.txt").write_text("not a source")  # neither .py nor .yaml
    assert package_hash(pkg) == before
    runner = pkg / "runner.py"
    runner.write_text(runner.read_text() + "\n# edited\n")
    assert package_hash(pkg) != before
    runner.write_text(runner.read_text().replace("\n# edited\n", ""))
    assert package_hash(pkg) == before
    (pkg / "conf" / "method" / "new.yaml").write_text("name: new\n")
    assert package_hash(pkg) != before


def test_drop_path_keys():
    assert drop_path_keys({"data_dir": "/a", "k": [{"cache_dir": 1, "v": 2}], "tokenizer_path": None, "n": 1}) == \
        {"k": [{"v": 2}], "n": 1}


def _base_key(data_dir: Path, cache: Path, *extra):
    from conftest import compose
    from recsim.runner import _shared_base_dir

    class Method:
        shares_base_stage = True

    cfg = compose(["dataset=beauty", f"dataset.data_dir={data_dir}", "dataset.folder=staged",
                   f"paths.cache_dir={cache}", *extra])
    return _shared_base_dir(cfg, Method()).name


def test_shared_stage0_key_follows_data_content_and_code_not_paths(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "staged").mkdir(parents=True)
    (data / "staged" / "interactions.csv.gz").write_bytes(b"user_id,item_id,timestamp\n1,2,3\n")
    (data / "staged" / "items.csv.gz").write_bytes(b"item_id,title\n2,A\n")
    key = _base_key(data, tmp_path / "cache")
    moved = tmp_path / "copy" / "data"
    shutil.copytree(data, moved)
    assert _base_key(moved, tmp_path / "cache2") == key  # the same bytes elsewhere, another cache root
    assert _base_key(data, tmp_path / "cache", "seed=2") != key
    (moved / "staged" / "items.csv.gz").write_bytes(b"item_id,title\n2,B\n")  # one byte differs
    assert _base_key(moved, tmp_path / "cache") != key
    monkeypatch.setattr("recsim.data.cache.package_hash", lambda: "edited sources")
    assert _base_key(data, tmp_path / "cache") != key


def test_shared_stage0_key_follows_the_batching_that_shapes_stage_0(tmp_path):
    """Length-grouped batches train another stage 0 (other batch mixes): a cached one must not be reused;
    the logging interval changes nothing that is learned and keeps the key."""
    data = tmp_path / "data"
    (data / "staged").mkdir(parents=True)
    (data / "staged" / "interactions.csv.gz").write_bytes(b"user_id,item_id,timestamp\n1,2,3\n")
    (data / "staged" / "items.csv.gz").write_bytes(b"item_id,title\n2,A\n")
    key = _base_key(data, tmp_path / "cache")
    for changed in ("trainer.group_by_length=true", "trainer.pad_to_multiple_of=16", "trainer.compile_mode=default"):
        assert _base_key(data, tmp_path / "cache", changed) != key, changed
    assert _base_key(data, tmp_path / "cache", "trainer.log_every_n_steps=50") == key


def test_cache_key_covers_format_version(monkeypatch):
    key = cache_key("r", {"k_core": 5}, [])
    monkeypatch.setattr("recsim.data.cache.DATA_FORMAT_VERSION", DATA_FORMAT_VERSION + 1)
    assert cache_key("r", {"k_core": 5}, []) != key


def test_mismatched_stats_rebuild_with_warning(tmp_path, counting):
    cache = tmp_path / "cache"
    load_dataset(tiny_cfg(RAW / "mcauley2014"), cache_dir=cache)
    (entry,) = entries(cache)
    stats = json.loads((entry / "stats.json").read_text())
    (entry / "stats.json").write_text(json.dumps({**stats, "interactions": 11}))
    with pytest.warns(UserWarning, match="does not match its stats.json"):
        data = load_dataset(tiny_cfg(RAW / "mcauley2014"), cache_dir=cache)
    assert data.stats()["interactions"] == 10 and len(counting) == 2
    assert json.loads((entry / "stats.json").read_text())["interactions"] == 10  # rewritten
    load_dataset(tiny_cfg(RAW / "mcauley2014"), cache_dir=cache)
    assert len(counting) == 2  # trusted again
    assert entries(cache) == [entry]


def test_unreadable_parquet_rebuilds_with_warning(tmp_path, counting):
    cache = tmp_path / "cache"
    load_dataset(tiny_cfg(RAW / "mcauley2014"), cache_dir=cache)
    (entry,) = entries(cache)
    table = entry / "interactions.parquet"
    table.write_bytes(table.read_bytes()[:50])
    with pytest.warns(UserWarning, match="unreadable"):
        data = load_dataset(tiny_cfg(RAW / "mcauley2014"), cache_dir=cache)
    assert data.stats()["interactions"] == 10 and len(counting) == 2


def test_synthetic_round_trip_keeps_types(tmp_path):
    built = []

    def build() -> InteractionData:
        built.append(1)
        return simulate(60, 48, 6, 2, 0.5, 0.7, 0.6, 5, 10, seed=1)

    first = load_or_build(tmp_path, "syn", "synthetic", {"seed": 1}, [], build)
    second = load_or_build(tmp_path, "syn", "synthetic", {"seed": 1}, [], build)
    assert built == [1]
    for table in ("interactions", "items", "ground_truth"):
        pd.testing.assert_frame_equal(getattr(first, table), getattr(second, table))
    assert isinstance(second.ground_truth.at[0, "old_interests"], list)
    assert second.meta["drift_timestamp"] == first.meta["drift_timestamp"]


def test_no_cache_dir_means_no_cache(tmp_path, counting):
    load_dataset(tiny_cfg(RAW / "mcauley2014"), cache_dir=None)
    load_dataset(tiny_cfg(RAW / "mcauley2014"), cache_dir=None)
    assert len(counting) == 2


def test_unknown_reader_lists_valid_ones():
    with pytest.raises(ValueError, match="amazon2014_staged, amazon2018, amazon2018_d3, mcauley2014, peso_blocks, recbole, synthetic"):
        load_dataset({"name": "x", "reader": "movielens"})


def test_emptied_dataset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no interactions left after preprocessing"):
        load_dataset(tiny_cfg(RAW / "mcauley2014", k_core=3), cache_dir=tmp_path)


def test_missing_source_through_load_dataset(tmp_path):
    from recsim.data.schema import DataFileError

    with pytest.raises(DataFileError, match="reviews_Tiny_5.json.gz: file not found"):
        load_dataset(tiny_cfg(tmp_path / "nowhere"), cache_dir=tmp_path / "cache")


def test_sampling_after_cache(tmp_path):
    # load_dataset always returns the whole dataset; the protocol applies sample_users (recsim.protocols.prepare)
    data = load_dataset(tiny_cfg(RAW / "mcauley2014", sample_users=2, sample_seed=3), cache_dir=tmp_path)
    assert data.interactions["user_id"].nunique() == 4
    (entry,) = entries(tmp_path)
    assert json.loads((entry / "stats.json").read_text())["users"] == 4  # the cache holds all users


def test_default_data_dir(monkeypatch):
    monkeypatch.delenv("RECSIM_DATA", raising=False)
    assert default_data_dir() == "data"
    monkeypatch.setenv("RECSIM_DATA", "/somewhere/else")
    assert default_data_dir() == "/somewhere/else"


# ------------------------------------------------------------------------------------ config files

DATASET_FILES = sorted((CONF / "dataset").glob("*.yaml"))
KEYS = {"name", "reader", "data_dir", "folder", "category", "k_core", "drop_untitled", "max_title_words",
        "sample_users", "sample_seed"}


def compose(dataset_file: Path) -> OmegaConf:
    return OmegaConf.create(
        {"seed": 11, "paths": OmegaConf.load(CONF / "paths" / "default.yaml"), "dataset": OmegaConf.load(dataset_file)}
    )


def test_every_dataset_config_is_complete():
    names = {p.stem for p in DATASET_FILES}
    assert names >= {"beauty", "toys", "books", "cds", "games", "instruments", "movies_tv", "synthetic"}
    for path in DATASET_FILES:
        raw = OmegaConf.load(path)
        assert KEYS <= set(raw.keys()), path
        assert raw._get_node("data_dir")._value() == "${paths.data_dir}"
        assert raw._get_node("sample_seed")._value() == "${seed}"
        # PESO's released blocks are filtered by their authors and carry no titles: kept as released
        expected = (None, 0, False, None) if raw.reader == "peso_blocks" else (None, 5, True, None)
        assert (raw.sample_users, raw.k_core, raw.drop_untitled, raw.max_title_words) == expected, path
        assert raw.reader in READERS, path
    categories = {p.stem: OmegaConf.load(p).category for p in DATASET_FILES}
    assert categories["toys"] == "Toys_and_Games" and categories["games"] == "Video_Games"
    assert categories["movies_tv"] == "Movies_and_TV" and categories["cds"] == "CDs_and_Vinyl"


def test_paths_config_reads_env(monkeypatch):
    monkeypatch.setenv("RECSIM_DATA", "/d")
    monkeypatch.setenv("RECSIM_CACHE", "/c")
    cfg = compose(CONF / "dataset" / "books.yaml")
    assert (cfg.dataset.data_dir, cfg.paths.cache_dir, cfg.dataset.sample_seed) == ("/d", "/c", 11)
    monkeypatch.delenv("RECSIM_DATA")
    monkeypatch.delenv("RECSIM_CACHE")
    assert (cfg.dataset.data_dir, cfg.paths.cache_dir) == ("data", ".cache/recsim")


def test_synthetic_config_loads_through_the_cache(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="recsim.data.load")
    cfg = compose(CONF / "dataset" / "synthetic.yaml")
    first = load_dataset(cfg.dataset, cache_dir=tmp_path)
    second = load_dataset(cfg.dataset, cache_dir=tmp_path)
    assert second.meta["cache_hit"] and first.stats() == second.stats()
    assert first.stats()["users"] == 200 and first.ground_truth is not None
    assert first.meta["drift_timestamp"] == simulate(**OmegaConf.to_container(cfg.dataset.simulator, resolve=True)).meta[
        "drift_timestamp"
    ]
    assert "synthetic: processed 200 users, 120 items" in caplog.text  # stats are logged


@pytest.mark.parametrize("option", [p.stem for p in DATASET_FILES])
def test_dataset_option_composes_with_the_root_config(option, monkeypatch):
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.setenv("RECSIM_DATA", "/staged")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="recsim.conf", version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=[f"dataset={option}", "seed=9"])
    finally:
        GlobalHydra.instance().clear()
    assert cfg.dataset.name == option
    assert (cfg.dataset.data_dir, cfg.dataset.sample_seed) == ("/staged", 9)


def _stage0_folder(root: Path, name: str, key: dict, done=True) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "key.json").write_text(json.dumps(key))
    (folder / "adapter.bin").write_bytes(b"weights")
    if done:
        (folder / "DONE").write_text("")
    return folder


def test_stage0_from_another_version_is_reused_only_with_the_same_settings(tmp_path):
    """reuse_base_stage_across_versions: a finished stage 0 whose key differs only in the recsim sources and in
    round-off-only settings (eval.batch_size, ...) fills this version's cache folder, recorded; any other
    difference (a seed), an unfinished folder or no match leaves it empty."""
    from recsim.runner import _reuse_other_version

    root = tmp_path / "base_stage"
    ours = {"seed": 1, "eval": {"batch_size": 256, "kl_batch_size": 16, "ks": [1, 3]},
            "recipe": {"scoring": {"pad_to_multiple_of": "auto", "kernel": "packed", "fp32": False}},
            "recsim_sources": "new"}  # fp32: added later; false does what recsim did before it
    older = {"seed": 1, "eval": {"batch_size": 4, "ks": [1, 3]}, "recipe": {"scoring": {"kernel": "packed"}},
             "recsim_sources": "old"}
    _stage0_folder(root, "unfinished", older, done=False)
    _stage0_folder(root, "otherseed", {**older, "seed": 2})
    assert not _reuse_other_version(root / "mine", ours) and not (root / "mine").exists()
    _stage0_folder(root, "old", older)
    assert _reuse_other_version(root / "mine", ours)
    mine = root / "mine"
    assert (mine / "DONE").exists() and (mine / "adapter.bin").read_bytes() == b"weights"
    assert json.loads((mine / "reused_from.json").read_text()) == {"folder": "old", "recsim_sources": "old"}
    assert json.loads((mine / "key.json").read_text()) == ours
    (mine / "DONE").write_text("first")  # another run of this seed published it first: it is left as it is
    assert _reuse_other_version(mine, ours) and (mine / "DONE").read_text() == "first"
    assert sorted(p.name for p in root.iterdir()) == ["mine", "old", "otherseed", "unfinished"]  # no staging left
    other_k = {**ours, "eval": {**ours["eval"], "ks": [1, 5]}}  # a setting that changes the scores
    assert not _reuse_other_version(root / "mine2", other_k)
    exact = {**ours, "recipe": {"scoring": {**ours["recipe"]["scoring"], "fp32": True}}}  # not what "old" did
    assert not _reuse_other_version(root / "mine3", exact)


def test_stage0_trained_compiled_is_reused_by_an_eager_run(tmp_path):
    """How a training step runs (compiled, CUDA graphs, static or padded widths) changes a stage 0 only by float
    round-off: a run whose update falls back to eager reuses the stage 0 trained under CUDA graphs. The batch size
    and the precision are still part of the match."""
    from recsim.runner import _reuse_other_version

    root = tmp_path / "base_stage"
    fast = {"seed": 1, "trainer": {"batch_size": 16, "precision": "bf16-mixed", "compile": True,
                                   "compile_mode": "reduce-overhead", "static_shapes": True, "pad_to_multiple_of": 64},
            "recsim_sources": "a"}
    _stage0_folder(root, "graphs", fast)
    eager = {**fast, "trainer": {**fast["trainer"], "compile": False, "compile_mode": None, "static_shapes": False,
                                 "pad_to_multiple_of": None}, "recsim_sources": "a"}
    assert _reuse_other_version(root / "eager", eager)
    other_batch = {**eager, "trainer": {**eager["trainer"], "batch_size": 32}}
    assert not _reuse_other_version(root / "b32", other_batch)

