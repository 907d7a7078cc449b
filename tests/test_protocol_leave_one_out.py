"""stage=leave_one_out: last item = test, second-to-last = validation, the rest = training."""

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from conftest import compose
from recsim.data.schema import InteractionData
from recsim.protocols import build_protocol
from recsim.protocols.base import EncodedData


def test_leave_one_out_by_hand():
    # a: 5 items, b: 3 items, c: 2 items (train-only); same-day ties keep the source order (a's x2 before x3)
    rows = [("a", "x1", 1), ("a", "x2", 2), ("a", "x3", 2), ("a", "x4", 3), ("a", "x5", 4),
            ("b", "x3", 1), ("b", "x1", 2), ("b", "x6", 3), ("c", "x2", 1), ("c", "x4", 5)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(rating=np.nan)
    items = pd.DataFrame({"item_id": [f"x{i}" for i in range(1, 7)], "title": [f"t{i}" for i in range(1, 7)]})
    data = EncodedData.from_data(InteractionData("loo", inter, items))
    x = {iid: i for i, iid in enumerate(data.item_ids)}
    a, b, c = (data.user_ids.index(u) for u in "abc")
    proto = build_protocol(OmegaConf.create({"name": "leave_one_out", "history_window": 2}), data)
    (stage,) = proto.stages
    assert (stage.index, stage.name, stage.eval_split) == (0, "train", "test")
    assert stage.cumulative_targets == stage.new_targets == {a: [1, 2], b: [], c: [1]}
    assert stage.active_users == [a, b, c] and stage.inactive_users == [] and set(stage.boundary.values()) == {0}
    assert list(proto.splits) == ["test"] and list(proto.splits["test"].samples) == ["all"]
    test, valid = proto.splits["test"].samples["all"], proto.valid_splits["test"].samples["all"]
    assert proto.valid_splits["test"].name == "test_valid" and proto.valid_splits["test"].role == "valid"
    assert [(s.user, s.position, s.history, s.target) for s in test] == \
        [(a, 4, (x["x3"], x["x4"]), x["x5"]), (b, 2, (x["x3"], x["x1"]), x["x6"])]  # window 2
    assert [(s.user, s.position, s.history, s.target) for s in valid] == \
        [(a, 3, (x["x2"], x["x3"]), x["x4"]), (b, 1, (x["x3"],), x["x1"])]
    assert proto.window == 2


def test_leave_one_out_config_reads_50_items():
    cfg = compose(["stage=leave_one_out"])
    assert cfg.stage.name == "leave_one_out" and cfg.stage.history_window == 50
