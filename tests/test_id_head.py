"""The ID classification head (recsim.decoders.id_head): it learns a separable problem, ranks by its logits, is seeded,
and is saved beside the memory and reused."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import compose
from recsim.decoders import build_decoder
from recsim.decoders.id_head import head_accuracy, top_items, train_head
from recsim.decoders.latent import Memory

KNOBS = dict(epochs=30, lr=1e-2, batch_size=32, weight_decay=0.0, seed=0)


def clusters(classes=6, per_class=40, dim=8, seed=0):
    """Well-separated Gaussian clusters, one per item 1..classes: a linearly separable problem."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 6
    targets = torch.arange(classes).repeat_interleave(per_class) + 1
    return centres[targets - 1] + 0.5 * torch.randn(len(targets), dim, generator=g), targets


def test_the_head_learns_a_separable_problem():
    states, targets = clusters()
    head = train_head(states, targets, 6, **KNOBS)
    assert head_accuracy(head, states, targets) == 1.0
    held, held_targets = clusters(seed=0)[0][::7] + 0.1, targets[::7]  # near the training points
    assert head_accuracy(head, held, held_targets) == 1.0
    assert not head.weight.requires_grad  # frozen once trained


def test_lists_are_the_catalogue_by_descending_logit():
    states, targets = clusters()
    head = train_head(states, targets, 6, **KNOBS)
    queries = torch.randn(5, 8, generator=torch.Generator().manual_seed(9)) * 6
    logits = head(queries)
    assert top_items(head, queries, 6).tolist() == (logits.argsort(1, descending=True) + 1).tolist()
    assert top_items(head, queries, 3).shape == (5, 3) and top_items(head, queries, 50).shape == (5, 6)
    assert top_items(head, states[:1], 1).item() == targets[0].item()


def test_training_is_seeded():
    states, targets = clusters()
    a, b = train_head(states, targets, 6, **KNOBS), train_head(states, targets, 6, **KNOBS)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    c = train_head(states, targets, 6, **{**KNOBS, "seed": 1})
    assert not torch.equal(a.weight, c.weight)


def test_bad_inputs_are_refused():
    states, targets = clusters()
    with pytest.raises(ValueError, match="epochs=0"):
        train_head(states, targets, 6, **{**KNOBS, "epochs": 0})
    with pytest.raises(ValueError, match="targets must be items 1..5"):
        train_head(states, targets, 5, **KNOBS)


def test_the_decoder_trains_on_the_memory_and_reuses_its_saved_head(tmp_path):
    states, targets = clusters()
    cfg = compose(["recipe=generative", "decoder=id_head", "decoder.train.epochs=30", "decoder.train.lr=0.01",
                   "decoder.train.batch_size=32", "decoder.train.weight_decay=0"])
    rec = SimpleNamespace(module=SimpleNamespace(device=torch.device("cpu")), num_items=8)  # items 7, 8 are cold

    def fitted():
        decoder = build_decoder("id_head", cfg)
        decoder.memory = Memory(states.half(), targets, {"model": "-"}, 1.0)
        decoder.num_items = 8
        decoder.fit(rec, tmp_path)
        return decoder

    first = fitted()
    assert first.train_accuracy == 1.0 and first.top_k() == 10
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["id_head"]
    lists = first.lists(states[::40]).numpy()  # one state per cluster
    assert lists[:, 0].tolist() == [1, 2, 3, 4, 5, 6] and lists.shape == (6, 10)
    assert (lists[:, 8:] == -1).all() and set(lists[:, :8].ravel()) == set(range(1, 9))  # every class, once
    again = fitted()  # the saved head: same weights, the first fit's figures
    assert torch.equal(again.head.weight, first.head.weight) and again.train_seconds == first.train_seconds
    rows = again.count_rows({"users": 1, "listed": 10, "invalid": 0, "short_lists": 0, "cold_targets": 0})
    assert rows["id_head_train_accuracy"] == 1.0 and rows["cold_items"] == 2 and rows["memory_entries"] == 240
    assert np.isclose(rows["memory_seconds_per_100k"], 1.0 / 240 * 1e5)
