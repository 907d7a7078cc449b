"""AlphaRec (recsim.models.alpharec): the graph propagation and InfoNCE by hand, leakage-free graphs on real
protocols, learning a planted pattern, scoring paths, determinism, save/load, config checks, and runs end to end."""

import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from conftest import REPO, compose
from recsim.models.alpharec import AlphaRec, AlphaRecRecommender, info_nce, normalized_adjacency, training_edges
from recsim.models.sequential import collate_samples
from recsim.protocols.base import EncodedData, Sample, make_samples

# toy graph: users 10, 11, 12 and items 1..4 (0 = padding); item degrees 2, 2, 2, 1, user degrees 2, 2, 3
TOY_EDGES = np.array([[10, 1], [10, 2], [11, 2], [11, 3], [12, 1], [12, 3], [12, 4]])


def toy_adjacency() -> torch.Tensor:
    """Â = D^-1/2 A D^-1/2 written out: nodes items 0..4, then users 10, 11, 12 as 5, 6, 7; Â_ui = 1/sqrt(d_u d_i)."""
    a = torch.zeros(8, 8, dtype=torch.float64)
    for user, item, value in [(5, 1, 1 / 2), (5, 2, 1 / 2), (6, 2, 1 / 2), (6, 3, 1 / 2),
                              (7, 1, 1 / math.sqrt(6)), (7, 3, 1 / math.sqrt(6)), (7, 4, 1 / math.sqrt(3))]:
        a[user, item] = a[item, user] = value
    return a


def toy_model(layers: int = 2, dim: int = 6) -> AlphaRec:
    torch.manual_seed(0)
    model = AlphaRec(torch.randn(5, dim), hidden=4, mlp_hidden=8, gcn_layers=layers)
    model.set_graph(TOY_EDGES)
    return model


def test_normalized_adjacency_is_the_hand_written_matrix():
    adjacency, item_degree, users = normalized_adjacency(TOY_EDGES, num_items=4)
    assert users.tolist() == [10, 11, 12] and item_degree.tolist() == [0, 2, 2, 2, 1]
    torch.testing.assert_close(adjacency.to_dense().double(), toy_adjacency())


def test_propagation_equals_the_matrix_product_and_the_readout_is_the_layer_mean():
    model = toy_model()
    with torch.no_grad():
        z = model.text.double()
        # z_u: mean title embedding of the user's items
        z_users = torch.stack([(z[1] + z[2]) / 2, (z[2] + z[3]) / 2, (z[1] + z[3] + z[4]) / 3])
        torch.testing.assert_close(model.user_text.double(), z_users)
        e0 = model.mlp(torch.cat([z, z_users]).float()).double()  # [8, D]
        a = toy_adjacency()
        expected = torch.stack([e0, a @ e0, a @ a @ e0])
        layers = model.propagate()
        torch.testing.assert_close(layers.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.item_table(layers).double(), expected[:, :5].mean(0), rtol=1e-5, atol=1e-6)


def test_a_history_of_all_a_user_s_items_is_that_user_s_graph_node():
    """The virtual user node reproduces the paper's user node when the history is the user's graph items."""
    model = toy_model()
    with torch.no_grad():
        layers = model.propagate()
        virtual = model.user_repr(torch.tensor([[0, 1, 3, 4], [0, 0, 1, 2]]), layers)  # users 12 and 10, left-padded
        torch.testing.assert_close(virtual, layers[:, [7, 5]].mean(0), rtol=1e-5, atol=1e-6)


def test_virtual_user_by_hand_for_an_item_outside_the_graph():
    model = toy_model(layers=1)
    model.set_graph(TOY_EDGES[TOY_EDGES[:, 1] != 4])  # item 4 leaves the graph: degree 0, counted as 1
    with torch.no_grad():
        layers = model.propagate()
        e0 = layers[0]
        u0 = model.mlp((model.text[2] + model.text[4]) / 2)
        u1 = e0[2] / math.sqrt(2 * 2) + e0[4] / math.sqrt(2 * 1)  # Σ e_i^(0) / sqrt(|H| d_i)
        torch.testing.assert_close(model.user_repr(torch.tensor([[0, 2, 4]]), layers)[0], (u0 + u1) / 2)


def test_info_nce_on_a_two_by_two_toy():
    # users (1, 0), (0, 1); items (1, 0), (1, 1)/√2: cosines [[1, 1/√2], [0, 1/√2]], positives on the diagonal
    s = torch.tensor([[1.0, 2**-0.5], [0.0, 2**-0.5]])
    # τ = 0.5: row 1 = log(1 + e^(2(1/√2 - 1))) = 0.442548, row 2 = log(1 + e^(2(0 - 1/√2))) = 0.217622
    loss = info_nce(s.diagonal(), torch.stack([s[0, 1:], s[1, :1]]), tau=0.5)
    assert float(loss) == pytest.approx((0.442548 + 0.217622) / 2, abs=1e-6)
    # a -inf negative is no negative: only the positive is left, loss 0
    assert float(info_nce(torch.tensor([0.3]), torch.tensor([[float("-inf")]]), tau=0.1)) == pytest.approx(0.0)


def rec_for(encoded: EncodedData, overrides=(), seed: int = 0, dim: int = 8) -> AlphaRecRecommender:
    cfg = compose(["backbone=alpharec", *overrides])
    with open_dict(cfg):
        cfg.backbone.mlp_hidden, cfg.backbone.hidden = 32, 16
    text = torch.from_numpy(np.random.default_rng(123).normal(size=(encoded.num_items + 1, dim))).float()
    return AlphaRecRecommender(cfg, encoded, seed=seed, text=text)


def tiny_encoded(num_items: int = 6) -> EncodedData:
    seqs = {0: np.array([1, 2, 3, 4]), 1: np.array([2, 3, 5, 6]), 2: np.array([6, 1, 4])}
    titles = ["<pad>"] + [f"t{i}" for i in range(1, num_items + 1)]
    return EncodedData("t", seqs, {u: np.arange(len(s)) for u, s in seqs.items()}, titles, [""] + titles[1:],
                       ["u0", "u1", "u2"])


def test_in_batch_loss_is_info_nce_on_the_other_targets_with_duplicates_masked():
    rec = rec_for(tiny_encoded(), ["backbone.negatives=in_batch"])
    module, model = rec.module, rec.module.model
    model.set_graph(TOY_EDGES[TOY_EDGES[:, 1] <= 4])
    batch = collate_samples([Sample(0, (1,), 2), Sample(1, (2, 3), 5), Sample(2, (6,), 2)], max_len=4)
    cos = model.cosine_all(batch["history"])[:, batch["target"]]  # [B, B]: row b against every row's target
    neg = cos.masked_fill(torch.eye(3, dtype=torch.bool), float("-inf"))
    neg[0, 2] = neg[2, 0] = float("-inf")  # rows 0 and 2 share target 2
    torch.testing.assert_close(module.compute_loss(batch), info_nce(cos.diagonal(), neg, module.tau))


def test_sampled_negatives_are_uniform_non_targets():
    module = rec_for(tiny_encoded()).module
    target = torch.tensor([1, 3, 6] * 200)
    draws = module.sample_negatives(target)
    assert draws.shape == (600, 256) and (draws != target[:, None]).all()
    assert draws.min() >= 1 and draws.max() <= 6 and set(draws[1].tolist()) == {1, 2, 4, 5, 6}


def test_training_edges_are_targets_and_position_zero_items_only():
    samples = [Sample(0, (7, 8), 9, position=2), Sample(0, (8, 9), 4, position=3), Sample(1, (5, 6), 3, position=5)]
    # user 1's history starts at position 3: items 5, 6 may be held-out targets of some round, never edges
    assert training_edges(samples).tolist() == [[0, 4], [0, 7], [0, 9], [1, 3]]


@pytest.mark.parametrize("stage, held_in_histories", [
    (["stage=leave_one_out"], False), (["stage=two_period", "stage.t_quantiles=[0.6,0.7,0.8]"], True),
    (["stage=stages"], True)], ids=["leave_one_out", "two_period_3_rounds", "stages"])
def test_no_test_or_validation_target_is_ever_an_edge(stage, held_in_histories):
    from recsim.methods import build_method
    from recsim.protocols.prepare import prepare_protocol

    cfg = compose(["backbone=alpharec", "method=retrain", *stage])
    protocol = prepare_protocol(cfg).protocol
    method = build_method(cfg.method)
    method.setup(None, protocol)
    held = {(s.user, s.target) for split in protocol.all_splits() for s in split.all_samples()}
    assert held
    in_histories = set()
    for stage_data in protocol.stages:
        samples = method.training_samples(stage_data, None)
        edges = {tuple(e) for e in training_edges(samples).tolist()}
        assert edges and not edges & held
        in_histories |= {(s.user, i) for s in samples for i in s.history} & held
        # every user's first item is an edge once a training sample reaches back to it
        firsts = {(u, int(protocol.data.sequences[u][0])) for u, ps in stage_data.cumulative_targets.items()
                  if any(p <= protocol.window for p in ps)}
        assert firsts <= edges
    # the continual protocols keep held-out targets visible as history: a graph of history items would leak there
    assert bool(in_histories) == held_in_histories


def planted_data(groups: int = 4, per_group: int = 10, users: int = 80, length: int = 8, seed: int = 0):
    """Each user interacts with `length` items of one group only, in random order; titles carry no signal."""
    rng = np.random.default_rng(seed)
    seqs = {u: rng.choice(per_group, length, replace=False) + 1 + (u % groups) * per_group for u in range(users)}
    num_items = groups * per_group
    titles = ["<pad>"] + [f"t{i}" for i in range(1, num_items + 1)]
    data = EncodedData("planted", seqs, {u: np.arange(length) for u in seqs}, titles, [""] + titles[1:],
                       [f"u{u}" for u in seqs])
    train = make_samples(seqs, {u: list(range(1, length - 1)) for u in seqs}, window=50)
    test = make_samples(seqs, {u: [length - 1] for u in seqs}, window=50)
    return data, train, test


def fit(rec, samples, tmp_path, epochs: int, seed: int = 0, tag: str = "fit") -> list[float]:
    import lightning

    from recsim.runner import train

    lightning.seed_everything(seed, verbose=False)
    optim = OmegaConf.create({"lr": rec.cfg.backbone.lr, "epochs": epochs, "max_steps": None})
    train(rec.cfg, rec, samples, optim, rec.cfg.backbone.batch_size, seed, tmp_path, tag)
    metrics = pd.read_csv(tmp_path / "logs" / tag / "metrics.csv")
    return metrics["train/loss"].dropna().tolist()


PLANTED = ["backbone.early_stopping=null", "backbone.negatives=16", "backbone.batch_size=64", "backbone.lr=5e-3",
           "trainer.accelerator=cpu"]


def hr_at_10(rec, test) -> float:
    from recsim.eval.metrics import ranks_full

    ranks = ranks_full(rec.score_all(test), np.array([s.target for s in test]), [s.history for s in test])
    return float((ranks < 10).mean())


def test_training_lowers_the_loss_and_ranks_a_planted_pattern(tmp_path):
    data, train, test = planted_data()
    rec = rec_for(data, PLANTED)
    before = hr_at_10(rec, test)
    losses = fit(rec, train, tmp_path, epochs=30)
    after = hr_at_10(rec, test)
    # random ranking of the 33 unmasked items puts the target in the top 10 with p = 10/33 ≈ 0.30
    assert losses[-1] < 0.7 * losses[0]
    assert after >= 0.8 and after > before + 0.3, (before, after)
    assert {tuple(e) for e in rec.module.model.edges.tolist()} == {tuple(e) for e in training_edges(train).tolist()}


def test_score_all_and_score_candidates_agree(tmp_path):
    data, train, test = planted_data(users=16)
    rec = rec_for(data, PLANTED)
    fit(rec, train, tmp_path, epochs=2)
    candidates = np.random.default_rng(0).integers(1, data.num_items + 1, size=(len(test), 30))
    full = rec.score_all(test)
    assert np.isneginf(full[:, 0]).all()
    np.testing.assert_allclose(rec.score_candidates(test, candidates, 8), np.take_along_axis(full, candidates, 1),
                               rtol=1e-6, atol=1e-7)


def test_same_seed_same_model_other_seed_another(tmp_path):
    data, train, test = planted_data(users=16)
    runs = []
    for i, seed in enumerate([3, 3, 4]):
        rec = rec_for(data, PLANTED, seed=seed)
        losses = fit(rec, train, tmp_path / str(i), epochs=3, seed=seed)
        runs.append((losses, rec.score_all(test)))
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0]


def test_save_load_round_trip_and_reset(tmp_path):
    data, train, test = planted_data(users=16)
    rec = rec_for(data, PLANTED)
    fit(rec, train, tmp_path, epochs=2)
    rec.save(tmp_path)
    other = rec_for(data, PLANTED, seed=9)
    other.load(tmp_path)
    assert np.array_equal(other.module.model.edges, rec.module.model.edges)
    np.testing.assert_array_equal(other.score_all(test), rec.score_all(test))
    rec.reset_to_initial()
    assert len(rec.module.model.edges) == 0 and rec.module.model.adjacency._nnz() == 0
    (tmp_path / "graph.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="graph.safetensors"):
        other.load(tmp_path)


def test_the_config_is_the_authors_and_drives_early_stopping():
    from lightning.pytorch.callbacks import EarlyStopping

    bb = compose(["backbone=alpharec"]).backbone
    assert (bb.encoder, bb.hidden, bb.mlp_hidden, bb.gcn_layers, bb.tau, bb.negatives, bb.lr, bb.batch_size) == (
        "minilm", 64, 1536, 2, 0.15, 256, 5e-4, 4096)
    rec = rec_for(tiny_encoded())
    stop, _ = rec.callbacks()
    assert isinstance(stop, EarlyStopping) and stop.patience == 20 and stop.monitor == "val/Recall@20"
    assert rec.schedule(0)[0].epochs == 500 and rec.schedule(0, validated=False)[0].epochs == bb.epochs
    assert isinstance(rec.module.configure_optimizers(), torch.optim.Adam)
    assert rec.kind == "graph" and rec.can_rank_all and rec.history_shown == 50


@pytest.mark.parametrize("override, message", [
    ("backbone.tau=0", "backbone.tau=0: expected a number > 0"),
    ("backbone.negatives=some", "backbone.negatives='some': expected an integer >= 1 or in_batch"),
    ("backbone.encoder=bert", "backbone.encoder='bert': expected one of minilm"),
    ("backbone.gcn_layers=-1", "backbone.gcn_layers=-1: expected an integer >= 0"),
    ("backbone.early_stopping.metric=MAP@5", "backbone.early_stopping.metric='MAP@5'"),
])
def test_bad_values_are_named_before_any_work(override, message):
    from recsim.schema import ConfigError, validate

    validate(compose(["backbone=alpharec"]))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose(["backbone=alpharec", override]))


def run(args, out):
    cmd = [sys.executable, "-m", "recsim.run", *args, f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pd.read_csv(out / "results.csv")


def test_leave_one_out_run_end_to_end_with_minilm(tmp_path):
    df = run(["backbone=alpharec", "dataset=synthetic", "stage=leave_one_out", "method=base", "debug=smoke"],
             tmp_path / "loo")
    full = df[(df.eval_mode == "full") & (df.split == "test")]
    assert set(full.candidates) == {"all"} and {"HR@10", "NDCG@10", "MRR"} <= set(full.metric)
    assert len(df[(df.eval_mode == "candidates") & (df.split == "test")]) > 0
    assert (df.backbone == "alpharec").all()
    assert (tmp_path / "loo" / "stages" / "00_train" / "graph.safetensors").is_file()


@pytest.mark.slow  # ~18 s: two stages through `python -m recsim.run`
def test_finetune_updates_the_model_and_grows_the_graph(tmp_path):
    import safetensors.torch

    out = tmp_path / "ft"
    df = run(["backbone=alpharec", "dataset=synthetic", "method=finetune", "debug=smoke"], out)
    changed = df[df.metric == "changed_params"].set_index("stage").value
    assert changed[1] > 0
    assert sorted(df[df.eval_mode == "full"].stage.unique()) == [0, 1]
    edges = [safetensors.torch.load_file(str(out / "stages" / s / "graph.safetensors"))["edges"]
             for s in ("00_base", "01_update1")]
    assert {tuple(e) for e in edges[0].tolist()} < {tuple(e) for e in edges[1].tolist()}
