"""PESO's released blocks: reader `peso_blocks` and protocol `stage=peso_blocks`, on a hand-made 5-block fixture
(the real file format) with every sequence, position and group computed by hand, plus the README counts of
the real files (skipped when ../shared/data is absent)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import compose
from recsim.data.load import load_dataset
from recsim.data.readers import read_peso_blocks
from recsim.data.schema import DataFileError
from recsim.protocols import build_protocol
from recsim.protocols.base import EncodedData
from recsim.protocols.peso_blocks import build_peso_blocks
from recsim.schema import ConfigError, validate

FOLDER = "peso_blocks/Toy_cl_0.6"
# block b -> {user: (previous_block, current_block)}; item ids are ints as strings, as in the released files
BLOCKS = [
    {"a": ([], [1, 2, 3, 4]), "b": ([], [5, 6, 7]), "c": ([], [8, 9])},  # c: 2 items < 3, left out of block 0
    {"a": ([1, 2, 3, 4], [10, 11, 12]), "d": ([], [13, 14, 15, 16]), "c": ([8, 9], [17, 18, 19])},
    {"b": ([5, 6, 7], [20, 21, 22, 23, 24]), "e": ([30, 31], [25, 26, 27])},  # b skips block 1; e: pre-block history
    {"a": ([1, 2, 3, 4, 10, 11, 12], [28, 29])},  # a: 2 items, left out of block 3
    {"a": ([1, 2, 3, 4, 10, 11, 12, 28, 29], [32, 33, 34]), "d": ([13, 14, 15, 16], [35, 36, 37, 38])},
]
# by hand: each user's sequence and the block of each position (-1: history before the user's first block)
SEQUENCES = {
    "a": ([1, 2, 3, 4, 10, 11, 12, 28, 29, 32, 33, 34], [0, 0, 0, 0, 1, 1, 1, 3, 3, 4, 4, 4]),
    "b": ([5, 6, 7, 20, 21, 22, 23, 24], [0, 0, 0, 2, 2, 2, 2, 2]),
    "c": ([8, 9, 17, 18, 19], [0, 0, 1, 1, 1]),
    "d": ([13, 14, 15, 16, 35, 36, 37, 38], [1, 1, 1, 1, 4, 4, 4, 4]),
    "e": ([30, 31, 25, 26, 27], [-1, -1, 2, 2, 2]),
}
# block -> group -> {user: test position}; validation = test position - 1 (always inside the block here)
TESTS = [
    {"U_A": {}, "new": {"a": 3, "b": 2}},
    {"U_A": {"a": 6, "c": 4}, "new": {"d": 3}},
    {"U_A": {"b": 7, "e": 4}, "new": {}},
    {"U_A": {}, "new": {}},
    {"U_A": {"a": 11, "d": 7}, "new": {}},
]
# block -> user -> training positions (current[:-2], position >= 1)
TRAIN = [
    {"a": [1], "b": [], "c": []},
    {"a": [4], "b": [], "c": [2], "d": [1]},
    {"a": [], "b": [3, 4, 5], "c": [], "d": [], "e": [2]},
    {"a": [], "b": [], "c": [], "d": [], "e": []},
    {"a": [9], "b": [], "c": [], "d": [4, 5], "e": []},
]
BOUNDARY = [  # block -> user -> where block b starts in the user's sequence
    {"a": 0, "b": 0, "c": 0},
    {"a": 4, "b": 3, "c": 2, "d": 0},
    {"a": 7, "b": 3, "c": 5, "d": 4, "e": 2},
    {"a": 7, "b": 8, "c": 5, "d": 4, "e": 5},
    {"a": 9, "b": 8, "c": 5, "d": 4, "e": 5},
]
VISIBLE = [  # block -> user -> len(sequences[u]) at that stage
    {"a": 4, "b": 3, "c": 2},
    {"a": 7, "b": 3, "c": 5, "d": 4},
    {"a": 7, "b": 8, "c": 5, "d": 4, "e": 5},
    {"a": 9, "b": 8, "c": 5, "d": 4, "e": 5},
    {"a": 12, "b": 8, "c": 5, "d": 8, "e": 5},
]


def write_blocks(root: Path, blocks=BLOCKS, folder: str = FOLDER) -> Path:
    directory = root / folder
    directory.mkdir(parents=True, exist_ok=True)
    name = Path(folder).name
    for b, block in enumerate(blocks):
        content = {u: {"previous_block": [str(i) for i in prev], "current_block": [str(i) for i in cur]}
                   for u, (prev, cur) in block.items()}
        with gzip.open(directory / f"{name}.all.block_{b}.json.gz", "wt", encoding="utf-8") as handle:
            json.dump(content, handle)
    return directory


def dataset_cfg(root: Path, **extra) -> dict:
    return {"name": "toy", "reader": "peso_blocks", "data_dir": str(root), "folder": FOLDER, "k_core": 0,
            "drop_untitled": False, "max_title_words": None, **extra}


@pytest.fixture
def toy(tmp_path) -> EncodedData:
    write_blocks(tmp_path)
    return EncodedData.from_data(load_dataset(dataset_cfg(tmp_path), cache_dir=None))


def build(data: EncodedData, users=None, min_block_interactions: int = 3, window: int = 20):
    stage = OmegaConf.create({"name": "peso_blocks", "history_window": window,
                              "min_block_interactions": min_block_interactions})
    return build_protocol(stage, data, users)


def raw(data: EncodedData, items) -> list[int]:
    return [int(data.item_ids[i]) for i in items]


def uid(data: EncodedData, user: str) -> int:
    return data.user_ids.index(user)


# ------------------------------------------------------------------------------------------ reader


def test_reader_builds_sequences_with_block_order_stamps(tmp_path):
    write_blocks(tmp_path)
    data = read_peso_blocks(tmp_path, FOLDER)
    assert data.name == "Toy_cl_0.6"
    assert data.meta["timestamps"] == "block-order stamps, not times"
    assert data.meta["block_of_stamp"] == "stamp // 10**7"
    for user, (items, blocks) in SEQUENCES.items():
        rows = data.interactions[data.interactions.user_id == user]
        assert rows.item_id.astype(int).tolist() == items
        stamps = rows.timestamp.to_numpy()
        assert stamps.tolist() == [b * 10**7 + p for p, b in enumerate(blocks)]
        assert (stamps // 10**7).tolist() == blocks
    assert data.interactions.rating.isna().all()
    titles = dict(zip(data.items.item_id, data.items.title))
    assert titles["30"] == "item 30" and len(titles) == sum(len(s) for s, _ in SEQUENCES.values())


def test_encoded_order_follows_the_stamps(toy):
    for user, (items, _) in SEQUENCES.items():
        assert raw(toy, toy.sequences[uid(toy, user)]) == items
    assert toy.titles[1:] == [f"item {i}" for i in toy.item_ids[1:]]


def test_missing_block_file_names_it_and_its_source(tmp_path):
    directory = write_blocks(tmp_path)
    (directory / "Toy_cl_0.6.all.block_3.json.gz").unlink()
    with pytest.raises(DataFileError, match=r"Toy_cl_0\.6\.all\.block_3\.json\.gz: file not found") as err:
        read_peso_blocks(tmp_path, FOLDER)
    assert "github.com/hsyoo32/peso" in str(err.value) and "edbec5f68ddc" in str(err.value)


def test_corrupt_block_file_is_an_error_naming_it(tmp_path):
    directory = write_blocks(tmp_path)
    path = directory / "Toy_cl_0.6.all.block_1.json.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataFileError, match=r"block_1\.json\.gz: truncated or corrupt gzip"):
        read_peso_blocks(tmp_path, FOLDER)
    with gzip.open(path, "wt") as handle:
        handle.write('{"a": {"previous_block": [], "current_block": "12"}}')
    with pytest.raises(DataFileError, match=r"block_1\.json\.gz: user 'a': not a list.*current_block"):
        read_peso_blocks(tmp_path, FOLDER)


def test_inconsistent_previous_block_is_an_error(tmp_path):
    blocks = [dict(b) for b in BLOCKS]
    blocks[2] = {**blocks[2], "b": ([5, 7, 6], [20, 21, 22])}  # reordered history of b
    write_blocks(tmp_path, blocks)
    with pytest.raises(DataFileError, match=r"block_2\.json\.gz: user 'b': previous_block .* first at position 1"):
        read_peso_blocks(tmp_path, FOLDER)


# ---------------------------------------------------------------------------------------- protocol


def test_splits_by_hand(toy):
    protocol = build(toy)
    assert list(protocol.splits) == [f"block{b}" for b in range(5)]
    for b, groups in enumerate(TESTS):
        split, valid = protocol.splits[f"block{b}"], protocol.valid_splits[f"block{b}"]
        assert valid.name == f"block{b}_valid" and valid.role == "valid"
        for group, expected in groups.items():
            got = {toy.user_ids[s.user]: s.position for s in split.samples[group]}
            assert got == expected, (b, group)
            got_valid = {toy.user_ids[s.user]: s.position for s in valid.samples[group]}
            assert got_valid == {u: p - 1 for u, p in expected.items()}, (b, group)
    c_test = protocol.splits["block1"].samples["U_A"][1]  # user c: full prefix as history
    assert raw(toy, c_test.history) == [8, 9, 17, 18] and raw(toy, [c_test.target]) == [19]


def test_stages_by_hand(toy):
    protocol = build(toy)
    assert [s.eval_split for s in protocol.stages] == [f"block{b}" for b in range(5)]
    for b, stage in enumerate(protocol.stages):
        named = lambda d: {toy.user_ids[u]: v for u, v in d.items()}
        assert named(stage.new_targets) == TRAIN[b], b
        assert named(stage.cumulative_targets) == {
            u: [p for k in range(b + 1) for p in TRAIN[k].get(u, [])] for u in TRAIN[b]}, b
        assert named(stage.boundary) == BOUNDARY[b], b
        assert {u: len(s) for u, s in named(stage.sequences).items()} == VISIBLE[b], b
        for u, seq in stage.sequences.items():
            assert np.array_equal(seq, toy.sequences[u][: len(seq)])
        assert sorted(toy.user_ids[u] for u in stage.active_users) == sorted(u for u, ps in TRAIN[b].items() if ps)
        assert sorted(toy.user_ids[u] for u in stage.inactive_users) == sorted(u for u, ps in TRAIN[b].items() if not ps)
    assert protocol.description["protocol"] == "peso_blocks" and protocol.description["blocks"] == 5


def test_training_samples_use_the_sliding_window(toy):
    from recsim.protocols.base import make_samples

    stage = build(toy, window=2).stages[2]
    samples = make_samples(stage.sequences, stage.new_targets, 2)
    got = [(toy.user_ids[s.user], raw(toy, s.history), raw(toy, [s.target])[0]) for s in samples]
    assert got == [("b", [6, 7], 20), ("b", [7, 20], 21), ("b", [20, 21], 22), ("e", [30, 31], 25)]


def test_no_evaluated_target_is_ever_a_training_target(toy):
    for min_items in (1, 2, 3):
        protocol = build(toy, min_block_interactions=min_items)
        evaluated = {(s.user, s.position) for sp in protocol.all_splits() for s in sp.all_samples()}
        assert evaluated
        for stage in protocol.stages:
            for targets in (stage.new_targets, stage.cumulative_targets):
                trained = {(u, p) for u, ps in targets.items() for p in ps}
                assert not trained & evaluated, (min_items, stage.name)


def test_min_block_interactions_rule(toy):
    strict = build(toy, min_block_interactions=3)
    users_in = lambda p, b: {toy.user_ids[s.user] for s in p.splits[f"block{b}"].all_samples()}
    assert "c" not in users_in(strict, 0) and "a" not in users_in(strict, 3)
    assert len(strict.stages[1].sequences[uid(toy, "c")]) == 5  # c's block-0 items stay as history
    loose = build(toy, min_block_interactions=2)
    assert users_in(loose, 0) == {"a", "b", "c"} and users_in(loose, 3) == {"a"}
    a_in_3 = loose.splits["block3"].samples["U_A"][0]
    assert a_in_3.position == 8 and loose.valid_splits["block3"].samples["U_A"][0].position == 7
    c_valid = {toy.user_ids[s.user] for s in loose.valid_splits["block0"].all_samples()}
    assert "c" not in c_valid  # c's block-0 validation target would be position 0 (no history)
    assert loose.stages[3].new_targets[uid(toy, "a")] == []  # 2 items: valid + test, nothing to train on
    with pytest.raises(ValueError, match="min_block_interactions=0"):
        build(toy, min_block_interactions=0)


def test_user_sample_restricts_stages_and_splits(toy):
    full = build(toy)
    chosen = [uid(toy, "a"), uid(toy, "e")]
    part = build(toy, users=chosen)
    for name, split in part.splits.items():
        keep = {g: [s for s in v if s.user in chosen] for g, v in full.splits[name].samples.items()}
        assert split.samples == keep
    for stage, whole in zip(part.stages, full.stages):
        assert set(stage.sequences) <= set(chosen)
        assert stage.new_targets == {u: v for u, v in whole.new_targets.items() if u in chosen}
        assert stage.boundary == {u: v for u, v in whole.boundary.items() if u in chosen}
    assert uid(toy, "e") not in part.stages[1].sequences and uid(toy, "e") in part.stages[2].sequences


def test_real_timestamps_are_refused():
    data = EncodedData("unix", {0: np.array([1, 2, 3])}, {0: np.array([1_400_000_000, 1_400_000_100, 1_400_000_200])},
                       ["<pad>", "x", "y", "z"], ["", "1", "2", "3"], ["u"])
    with pytest.raises(ValueError, match="stage=peso_blocks needs block-order stamps"):
        build_peso_blocks(data, 3, 20)


# ------------------------------------------------------------------------------------------ config


def test_config_composes_and_validates():
    for dataset in ("peso_cds", "peso_games"):
        cfg = compose([f"dataset={dataset}", "stage=peso_blocks"])
        validate(cfg)
        assert cfg.dataset.reader == "peso_blocks" and cfg.dataset.k_core == 0 and not cfg.dataset.drop_untitled
        assert cfg.dataset.folder.startswith("peso_blocks/") and cfg.stage.min_block_interactions == 3
    with pytest.raises(ConfigError, match="stage.min_block_interactions=0"):
        validate(compose(["dataset=peso_cds", "stage=peso_blocks", "stage.min_block_interactions=0"]))
    with pytest.raises(ConfigError, match="dataset.folder"):
        validate(compose(["dataset=peso_cds", "stage=peso_blocks", "dataset.folder=''"]))


# --------------------------------------------------------------------------------------- real data

REAL = Path(os.environ["RECSIM_DATA"]) / "peso_blocks"
# ../shared/data/peso_blocks/README.md: block -> (users, returning users, interactions inside the block)
COUNTS = {
    "peso_cds": ([(8494, 0, 81355), (1013, 332, 8686), (866, 341, 7488), (1078, 406, 9468), (1074, 328, 9421)],
                 39191),
    "peso_games": ([(12447, 0, 91273), (1035, 229, 7491), (1091, 219, 7492), (1949, 246, 14646),
                    (1791, 319, 13271)], 25935),
}


@pytest.mark.parametrize("dataset", sorted(COUNTS))
def test_real_block_counts_match_the_readme(dataset):
    if not REAL.is_dir():
        pytest.skip(f"PESO blocks not found under {REAL} (RECSIM_DATA); see ../shared/data/peso_blocks/README.md")
    cfg = {**OmegaConf.to_container(compose([f"dataset={dataset}"]).dataset, resolve=True), "data_dir": str(REAL.parent)}
    data = EncodedData.from_data(load_dataset(cfg, cache_dir=None))
    per_block, n_items = COUNTS[dataset]
    assert data.num_items == n_items
    protocol = build(data)
    for b, (users, returning, interactions) in enumerate(per_block):
        split = protocol.splits[f"block{b}"]
        assert len(split.all_samples()) == users and len(split.samples["U_A"]) == returning, b
        stamps = np.concatenate(list(data.timestamps.values()))
        assert int(np.sum(stamps // 10**7 == b)) == interactions, b
