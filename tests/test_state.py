"""recsim.utils.state: method state as safetensors + JSON; nothing in a run directory is ever unpickled."""

import json
import pickle

import pytest
import torch

from recsim.utils.state import load_state, save_state


def test_round_trip_of_tensors_and_json_values(tmp_path):
    weight = torch.arange(6, dtype=torch.float32).view(2, 3)
    state = {"short_ready": True, "round": 3, "lam": 2e-4, "name": None, "layers": [1, 4],
             "fisher": {"a.weight": weight, "a.bias": torch.tensor([0.5], dtype=torch.float64)},
             "anchors": [weight[0], {"step": 7}]}  # a view: safetensors itself refuses shared storage
    save_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["method_state.json", "method_tensors.safetensors"]
    back = load_state(tmp_path)
    assert {k: back[k] for k in ("short_ready", "round", "lam", "name", "layers")} == \
        {"short_ready": True, "round": 3, "lam": 2e-4, "name": None, "layers": [1, 4]}
    assert torch.equal(back["fisher"]["a.weight"], weight) and back["fisher"]["a.bias"].dtype == torch.float64
    assert torch.equal(back["anchors"][0], torch.tensor([0.0, 1.0, 2.0])) and back["anchors"][1] == {"step": 7}
    stored = json.loads((tmp_path / "method_state.json").read_text())
    assert stored["fisher"]["a.weight"] == {"__tensor__": "fisher.a.weight"}


def test_state_without_tensors_is_json_only(tmp_path):
    save_state(tmp_path, {"t": torch.ones(1)})
    save_state(tmp_path, {"short_ready": False})  # a stale tensor file must not survive
    assert [p.name for p in tmp_path.iterdir()] == ["method_state.json"]
    assert load_state(tmp_path) == {"short_ready": False}


@pytest.mark.parametrize("state,key", [({"rng": {"gen": object()}}, "'rng.gen': object"),
                                       ({"ids": {1, 2}}, "'ids': set"),
                                       ({"x": [1, (2, b"raw")]}, "'x.1.1': bytes"),
                                       ({"m": {3: 1.0}}, "m.3: keys must be strings")])
def test_anything_else_is_rejected_naming_the_key(tmp_path, state, key):
    with pytest.raises(TypeError, match=key.replace(".", r"\.").replace("(", r"\(")):
        save_state(tmp_path, state)


class Boom:
    def __reduce__(self):  # unpickling this would create a file: proof that code ran
        return (open, (str(MARKER), "w"))


MARKER = None


def test_pickled_file_in_a_run_directory_is_never_executed(tmp_path):
    global MARKER
    MARKER = tmp_path / "code_ran"
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "method.pt").write_bytes(pickle.dumps({"x": Boom()}))
    with pytest.raises(FileNotFoundError, match="pickled method.pt from an older recsim, which is never loaded"):
        load_state(stage)
    assert not MARKER.exists()
    # a sequential model's weights are read from safetensors only, never from a model.pt beside them
    from recsim.models.recommender import SequentialRecommender

    rec = SequentialRecommender.__new__(SequentialRecommender)
    rec.module = torch.nn.Linear(2, 2)
    (stage / "model.pt").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(FileNotFoundError, match="model.pt from an older recsim is never unpickled"):
        rec.load(stage)
    assert not MARKER.exists()


def test_sequential_recommender_save_load_round_trip(tmp_path):
    from recsim.models.recommender import SequentialRecommender

    a, b = (SequentialRecommender.__new__(SequentialRecommender) for _ in range(2))
    torch.manual_seed(0)
    a.module = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5))
    b.module = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5))
    a.save(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    b.load(tmp_path)
    for (n, p), (_, q) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert torch.equal(p, q), n


def test_no_pickle_loading_left_in_recsim():
    from conftest import REPO

    offenders = [str(p) for p in (REPO / "recsim").rglob("*.py")
                 if "weights_only=False" in p.read_text() or "torch.load(" in p.read_text()]
    assert offenders == []
