"""stage.holdout_users: a seeded share of users held out entirely (non-members), in every protocol.

Held-out users never appear in any stage (so in no method's training data), their test samples form the group
`holdout`, which the "all" row never pools; 0 changes nothing, the stage-0 key included."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf, open_dict

from conftest import REPO, compose
from recsim.data.readers import BLOCK_STRIDE
from recsim.data.schema import InteractionData
from recsim.protocols import build_protocol
from recsim.protocols.base import EncodedData, make_samples
from recsim.protocols.holdout import HOLDOUT, apply_holdout, choose_holdout, holdout_settings
from recsim.protocols.prepare import prepare_protocol, save_prepared
from recsim.schema import ConfigError, validate

SYNTH = ["dataset.simulator.num_users=40", "eval.negatives=9"]


def encode(rows: list[tuple[str, str, int]]) -> EncodedData:
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(rating=np.nan)
    items = pd.DataFrame({"item_id": sorted(set(inter["item_id"]))}).assign(title=lambda d: "t " + d["item_id"])
    return EncodedData.from_data(InteractionData("hand", inter, items))


def timed_data() -> EncodedData:
    """12 users, 5..10 interactions each at seeded days in 0..999."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(12):
        n = int(rng.integers(5, 11))
        for i, t in zip(rng.choice(40, n, replace=False), np.sort(rng.integers(0, 1000, n))):
            rows.append((f"u{u:02d}", f"i{i}", int(t)))
    return encode(rows)


def block_data() -> EncodedData:
    """PESO-style block-order stamps (block * BLOCK_STRIDE + position): 8 users with 3..5 items in each of 3 blocks."""
    rows, item = [], 0
    for u in range(8):
        k = 0
        for b in range(3):
            for _ in range(3 + (u + b) % 3):
                rows.append((f"u{u}", f"i{item % 50}", b * BLOCK_STRIDE + k))
                item, k = item + 1, k + 1
    return encode(rows)


PROTOCOLS = {
    "two_period": ({"name": "two_period", "t_quantiles": [0.5, 0.75], "history_window": 5}, timed_data),
    "stages": ({"name": "stages", "first_share": 0.5, "window_shares": [0.25, 0.25], "history_window": 5}, timed_data),
    "leave_one_out": ({"name": "leave_one_out", "history_window": 5}, timed_data),
    "global_split": ({"name": "global_split", "shares": [0.6, 0.2, 0.2], "history_window": 5}, timed_data),
    "peso_blocks": ({"name": "peso_blocks", "min_block_interactions": 3, "history_window": 5}, block_data),
}


def built(name: str, share: float, seed: int = 0):
    stage, make = PROTOCOLS[name]
    data = make()
    plain = build_protocol(OmegaConf.create(stage), data)
    users = sorted(data.sequences)
    return data, plain, apply_holdout(plain, data.user_ids, users, share, seed)


# ---- who is held out ------------------------------------------------------------------------------------------
def test_a_quarter_of_eight_users_is_two_seeded_users():
    ids = [f"u{i}" for i in range(8)]
    users = list(range(8))
    picks = {seed: choose_holdout(ids, users, 0.25, seed) for seed in range(6)}
    assert all(len(p) == 2 and len(set(p)) == 2 and set(p) <= set(users) for p in picks.values())
    assert choose_holdout(ids, users, 0.25, 3) == picks[3]  # same seed, same users
    assert len({tuple(p) for p in picks.values()}) > 1  # other seeds, other users
    assert len(choose_holdout(ids, users, 0.3, 0)) == 2  # floor(0.3 * 8) = 2
    # drawn by sorted original id, so the order of the user indices does not matter
    assert choose_holdout(ids[::-1], users, 0.25, 3) == sorted(7 - u for u in picks[3])
    with pytest.raises(ValueError, match=r"stage.holdout_users=0.1 of 8 users holds out none"):
        choose_holdout(ids, users, 0.1, 0)


@pytest.mark.parametrize("bad", [1, 1.5, -0.1, "x", True])
def test_bad_shares_error_before_any_work(bad, tmp_path):
    with pytest.raises(ValueError, match=r"stage.holdout_users=.*expected a number in \[0, 1\)"):
        holdout_settings(OmegaConf.create({"holdout_users": bad}))
    if not isinstance(bad, str):
        with pytest.raises(ConfigError, match=r"stage.holdout_users=.*expected a number in \[0, 1\)"):
            validate(compose(SYNTH + [f"stage.holdout_users={str(bad).lower()}"]))
    # prepare_protocol checks it before reading the data (the data folder here does not exist)
    cfg = compose(["dataset=beauty", f"dataset.data_dir={tmp_path / 'none'}"])
    with open_dict(cfg):
        cfg.stage.holdout_users = bad
    with pytest.raises(ValueError, match=r"stage.holdout_users="):
        prepare_protocol(cfg)


def test_good_values_validate_and_configs_without_the_keys_still_do():
    assert validate(compose(SYNTH + ["stage.holdout_users=0.25", "stage.holdout_seed=7"])) is None
    for stage in ("two_period", "stages", "leave_one_out", "global_split"):
        cfg = compose([f"stage={stage}"])
        assert cfg.stage.holdout_users == 0 and cfg.stage.holdout_seed == cfg.seed
        with open_dict(cfg):
            del cfg.stage["holdout_users"], cfg.stage["holdout_seed"]
        assert validate(cfg) is None and holdout_settings(cfg.stage) == (0.0, None)


# ---- every protocol -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_held_out_users_are_in_no_stage_and_scored_as_holdout(name):
    data, plain, proto = built(name, 0.25, seed=1)
    held = set(proto.description["holdout"]["user_indices"])
    assert len(held) == len(data.sequences) // 4
    for before, stage in zip(plain.stages, proto.stages):
        for part in (stage.sequences, stage.new_targets, stage.cumulative_targets, stage.boundary):
            assert not held & set(part)
        assert not held & set(stage.active_users) and not held & set(stage.inactive_users)
        for targets in (stage.new_targets, stage.cumulative_targets):
            assert not held & {s.user for s in make_samples(stage.sequences, targets, proto.window)}
        # members keep exactly their data
        assert stage.new_targets == {u: v for u, v in before.new_targets.items() if u not in held}
        assert stage.cumulative_targets == {u: v for u, v in before.cumulative_targets.items() if u not in held}
        assert stage.active_users == [u for u in before.active_users if u not in held]
    # held out before the protocol: some of them were trained on without the setting
    assert held & {u for s in plain.stages for u, ps in s.cumulative_targets.items() if ps}
    for split_name, split in proto.splits.items():
        original = plain.splits[split_name].samples
        assert list(split.samples) == [*original, HOLDOUT]
        assert split.samples[HOLDOUT] == [s for v in original.values() for s in v if s.user in held]
        for group, samples in original.items():
            assert split.samples[group] == [s for s in samples if s.user not in held]
    assert proto.splits[proto.stages[0].eval_split].samples[HOLDOUT]  # their test samples are still there
    for split in proto.valid_splits.values():
        assert not held & {s.user for s in split.all_samples()}  # validation would let them choose checkpoints


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_method_and_decoder_training_data_exclude_held_out_users(name):
    from recsim.decoders.latent import memory_samples
    from recsim.methods.base import Base, ContinualMethod, Retrain

    _, _, proto = built(name, 0.25, seed=2)
    held = set(proto.description["holdout"]["user_indices"])
    for method in (ContinualMethod(None), Base(None), Retrain(None)):  # finetune = ContinualMethod's samples
        method.setup(None, proto)
        for stage in proto.stages:
            samples = method.training_samples(stage, None) or []
            assert not held & {s.user for s in samples}
    for stage in proto.stages:
        for which in ("seen", "stage"):  # L2D's memory
            assert not held & {s.user for s in memory_samples(proto, stage, which)}


def test_zero_share_is_the_protocol_itself():
    _, plain, proto = built("two_period", 0.0)
    assert proto is plain


# ---- through prepare_protocol ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _prepared(cache, extra, drop_keys=False):
    cfg = compose(SYNTH + [f"paths.cache_dir={cache}"] + extra)
    if drop_keys:  # a config written before the setting existed
        with open_dict(cfg):
            del cfg.stage["holdout_users"], cfg.stage["holdout_seed"]
    return prepare_protocol(cfg)


def test_zero_share_prepares_exactly_what_a_config_without_the_keys_does(cache, tmp_path):
    old, zero = _prepared(cache, [], drop_keys=True), _prepared(cache, ["stage.holdout_users=0", "stage.holdout_seed=5"])
    assert old.description == zero.description and "holdout" not in zero.description
    for a, b in zip(old.protocol.stages, zero.protocol.stages):
        assert a.new_targets == b.new_targets and a.cumulative_targets == b.cumulative_targets
        assert a.active_users == b.active_users and a.inactive_users == b.inactive_users and a.boundary == b.boundary
        assert all(np.array_equal(a.sequences[u], b.sequences[u]) for u in a.sequences) and a.sequences.keys() == b.sequences.keys()
    for a, b in zip(old.protocol.all_splits(), zero.protocol.all_splits()):
        assert a.samples == b.samples and a.candidates.keys() == b.candidates.keys()
        assert all(np.array_equal(a.candidates[g], b.candidates[g]) for g in a.candidates)
    for name, prepared in (("old", old), ("zero", zero)):
        (tmp_path / name).mkdir()
        save_prepared(prepared, tmp_path / name)
    for name in ("protocol.json", "dataset_stats.json", "candidates.npz"):
        assert (tmp_path / "old" / name).read_bytes() == (tmp_path / "zero" / name).read_bytes()


def test_protocol_json_records_the_held_out_users(cache, tmp_path):
    a = _prepared(cache, ["stage.holdout_users=0.25"])
    b = _prepared(cache, ["stage.holdout_users=0.25", "stage.holdout_seed=9"])
    none = _prepared(cache, [])
    save_prepared(a, tmp_path)
    record = json.loads((tmp_path / "protocol.json").read_text())["holdout"]
    n = len(a.protocol.stages[0].sequences) + record["users"]  # members of stage 0 + held out = every user
    assert record["share"] == 0.25 and record["seed"] == 1 and record["of_users"] == n
    assert record["users"] == n // 4 == len(record["user_ids"]) == len(record["user_indices"])
    assert record["user_ids"] == [a.data.user_ids[u] for u in record["user_indices"]]
    assert b.description["holdout"]["user_ids"] != record["user_ids"]  # another seed, other users
    splits = json.loads((tmp_path / "protocol.json").read_text())["splits"]
    assert splits["round1"][HOLDOUT] == sum(record["from_groups"]["round1"].values()) > 0
    # a held-out user's candidates are those it has as a member (drawn per user, whatever its group)
    rows = lambda p, groups: {s.user: tuple(r) for g in groups for s, r in zip(p.protocol.splits["round1"].samples[g],
                                                                               p.protocol.splits["round1"].candidates[g])}
    held = rows(a, [HOLDOUT])
    member = rows(none, ["U_A", "U_I", "new"])
    assert held and all(member[u] == r for u, r in held.items())


# ---- results: the "all" row pools members only ----------------------------------------------------------------
def test_all_row_never_pools_held_out_users():
    from recsim.runner import _metric_rows, _pooled

    # 0-based ranks: only U_A's first user hits at 1; every held-out user does
    ranks = {"U_A": np.array([0, 2]), "U_I": np.array([5]), "new": np.array([3]), HOLDOUT: np.array([0, 0, 0])}
    assert _pooled(ranks).tolist() == [0, 2, 5]  # U_A ∪ U_I
    assert _pooled(ranks, ("U_A", "new")).tolist() == [0, 2, 3]  # peso_blocks' pooled_groups
    assert _pooled({"all": np.array([4]), HOLDOUT: np.array([1])}).tolist() == [4]  # leave-one-out, global split
    assert _pooled({"x": np.array([2]), HOLDOUT: np.array([1])}).tolist() == [2]
    cfg = OmegaConf.create({"eval": {"n_boot": 10}, "seed": 0})
    users = {g: np.arange(len(r)) for g, r in ranks.items()}
    rows = pd.DataFrame(_metric_rows({}, ranks, users, "candidates", "round1", [1], cfg, {}))
    hr = rows[rows.metric == "HR@1"].set_index("group")
    assert hr.at["all", "n_users"] == 3 and hr.at["all", "value"] == pytest.approx(1 / 3)  # ranks 0, 2, 5
    assert hr.at[HOLDOUT, "n_users"] == 3 and hr.at[HOLDOUT, "value"] == 1.0
    alone = _metric_rows({}, {HOLDOUT: np.array([1])}, {HOLDOUT: np.array([0])}, "candidates", "r", [1], cfg, {})
    assert {r["group"] for r in alone} == {HOLDOUT}  # non-members alone make no "all" row


# ---- the stage-0 cache key ------------------------------------------------------------------------------------
def test_stage_0_key_is_unchanged_at_zero_and_changes_otherwise():
    from recsim.runner import _comparable, base_stage_key

    tiny = ["backbone=tiny_llama", "debug=smoke"]
    before = compose(tiny)
    with open_dict(before):  # a config written before the setting existed
        del before.stage["holdout_users"], before.stage["holdout_seed"]
    old = base_stage_key(before)
    assert "holdout_users" not in old["stage"] and "holdout_seed" not in old["stage"]
    zero = [base_stage_key(compose(tiny + o)) for o in ([], ["stage.holdout_users=0"], ["stage.holdout_seed=7"])]
    assert all(k == old for k in zero)  # exactly the key of before, not only comparable
    assert all(_comparable(k) == _comparable(old) for k in zero)
    quarter = base_stage_key(compose(tiny + ["stage.holdout_users=0.25"]))
    other_seed = base_stage_key(compose(tiny + ["stage.holdout_users=0.25", "stage.holdout_seed=7"]))
    assert quarter["stage"]["holdout_users"] == 0.25 and quarter["stage"]["holdout_seed"] == 1
    assert len({json.dumps(k, sort_keys=True) for k in (old, quarter, other_seed)}) == 3
    assert _comparable(quarter) != _comparable(old)


# ---- end to end -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_reports_a_holdout_group_beside_all(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "recsim.run", "dataset=synthetic", "backbone=tiny_llama", "debug=smoke",
           "stage.holdout_users=0.25", "method=finetune", "dataset.simulator.num_users=60", "reuse_base_stage=false",
           f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(out / "results.csv")
    q = df[(df.eval_mode == "candidates") & (df.metric == "HR@10") & (df.split == "round1")]
    assert set(q.group) == {"U_A", "U_I", HOLDOUT, "all"}
    record = json.loads((out / "protocol.json").read_text())
    for stage in (0, 1):
        n = q[q.stage == stage].set_index("group").n_users
        assert n["all"] == n["U_A"] + n["U_I"] and n[HOLDOUT] == record["splits"]["round1"][HOLDOUT] > 0
    assert record["holdout"]["users"] == record["holdout"]["of_users"] // 4 > 0
