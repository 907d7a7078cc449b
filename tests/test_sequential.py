"""SASRec, GRU4Rec and BPR-MF: padding, causality, scoring, growth, and that they can learn."""

import lightning
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from recsim.models.sequential import BPRMF, GRU4Rec, SASRec, collate_samples
from recsim.models.sequential_module import (
    RestoreBest,
    SequentialRecModule,
    build_sequential,
    early_stopping_callbacks,
    valid_score,
)
from recsim.protocols.base import Sample

N = 20
KINDS = ["sasrec", "gru4rec", "bpr_mf"]


def small(kind: str, num_items: int = N) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"hidden": 16}
    if kind == "sasrec":
        kwargs["max_len"] = 12
    return build_sequential(kind, num_items, **kwargs).eval()


def histories() -> torch.Tensor:
    # left-padded [3, 6]: a full row, a short row, a single item
    return torch.tensor([[3, 9, 4, 1, 7, 2], [0, 0, 5, 5, 11, 20], [0, 0, 0, 0, 0, 8]])


def successor_samples(length: int = 5) -> list[Sample]:
    """Item i is always followed by i % N + 1; histories of 1..length items ending anywhere."""
    out = []
    for end in range(1, N + 1):
        for n in range(1, length + 1):
            history = tuple((end - k - 1) % N + 1 for k in reversed(range(n)))  # ..., end-1, end
            out.append(Sample(user=0, history=history, target=end % N + 1))
    return out


def fit(kind: str, loss: str, epochs: int, lr: float, record: list | None = None) -> SequentialRecModule:
    lightning.seed_everything(0, verbose=False)
    model = build_sequential(kind, N, hidden=32, **({"max_len": 8} if kind == "sasrec" else {}))
    module = SequentialRecModule(model, loss=loss, lr=lr)
    loader = DataLoader(
        successor_samples(),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        collate_fn=lambda batch: collate_samples(batch, max_len=8),
    )
    callbacks = [] if record is None else [LossRecorder(record)]
    trainer = lightning.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, loader)
    return module


class LossRecorder(lightning.Callback):
    def __init__(self, out: list):
        self.out = out

    def on_train_epoch_end(self, trainer, module):
        self.out.append(float(trainer.callback_metrics["train/loss"]))


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])  # no_grad takes fused kernels
@pytest.mark.parametrize("kind", KINDS)
def test_extra_left_padding_changes_nothing(kind, grad):
    model = small(kind)
    h = histories()
    padded = torch.cat([torch.zeros(3, 4, dtype=torch.long), h], dim=1)  # [3, 10]
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(model.user_repr(padded), model.user_repr(h), atol=1e-5, rtol=1e-5)


def test_padding_does_matter_when_it_replaces_items():
    # guards the test above against a model that ignores its input
    model = small("gru4rec")
    h = histories()
    cut = h.clone()
    cut[0, 0] = 0
    assert not torch.allclose(model.user_repr(cut)[0], model.user_repr(h)[0])


def test_sasrec_attention_is_causal():
    model = small("sasrec")
    h = histories()
    changed = h.clone()
    changed[0, 3] = 15  # position 3 of the full row
    before, after = model.encode(h), model.encode(changed)  # [3, 6, D]
    torch.testing.assert_close(after[:, :3], before[:, :3])
    torch.testing.assert_close(after[1:], before[1:])  # other rows untouched
    assert all(not torch.allclose(after[0, t], before[0, t]) for t in range(3, 6))


def test_sasrec_keeps_the_newest_max_len_items():
    model = small("sasrec")  # max_len = 12
    long = torch.arange(1, 21).unsqueeze(0)  # [1, 20]
    torch.testing.assert_close(model.user_repr(long), model.user_repr(long[:, -12:]))


@pytest.mark.parametrize("kind", KINDS)
def test_score_matches_score_all_columns(kind):
    model = small(kind)
    h = histories()
    items = torch.tensor([[1, 2, 20], [5, 7, 7], [19, 3, 8]])
    torch.testing.assert_close(model.score(h, items), model.score_all(h).gather(1, items))
    all_scores = model.score_all(h)
    assert all_scores.shape == (3, N + 1)
    assert torch.isneginf(all_scores[:, 0]).all() and torch.isfinite(all_scores[:, 1:]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_grow_items_keeps_old_rows_and_scores(kind):
    model = small(kind)
    h = histories()
    old_rows, old_scores = model.item_emb.weight.detach().clone(), model.score_all(h)
    model.grow_items(N + 5)
    assert model.num_items == N + 5 and model.item_emb.weight.shape == (N + 6, 16)
    torch.testing.assert_close(model.item_emb.weight[: N + 1], old_rows)
    assert model.item_emb.weight[0].abs().sum() == 0 and model.item_emb.padding_idx == 0
    new_scores = model.score_all(h)
    torch.testing.assert_close(new_scores[:, : N + 1], old_scores)
    assert torch.isfinite(new_scores[:, N + 1 :]).all()
    with pytest.raises(ValueError):
        model.grow_items(N)


def test_collate_left_pads_and_truncates():
    batch = collate_samples([Sample(4, (1, 2, 3, 4, 5), 6), Sample(7, (9,), 2)], max_len=3)
    assert batch["history"].tolist() == [[3, 4, 5], [0, 0, 9]]
    assert batch["target"].tolist() == [6, 2] and batch["user"].tolist() == [4, 7]
    assert batch["position"].tolist() == [-1, -1]
    assert batch["history"].dtype == torch.long


def test_bpr_negatives_are_uniform_non_targets_and_seeded():
    target = torch.randint(1, N + 1, (5000,))
    draws = [SequentialRecModule(small("bpr_mf"), loss="bpr", seed=3).sample_negatives(target) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    neg = draws[0]
    assert (neg != target).all() and neg.min() >= 1 and neg.max() <= N
    assert len(neg.unique()) == N


@pytest.mark.parametrize("kind", ["sasrec", "gru4rec"])
def test_learns_successor_task(kind):
    module = fit(kind, "ce", epochs=30, lr=1e-2)
    batch = collate_samples(successor_samples(), max_len=8)
    top1 = module.score_all(batch["history"]).argmax(1)
    hr1 = (top1 == batch["target"]).float().mean().item()
    assert hr1 > 0.9, f"{kind} HR@1 = {hr1:.2f}"
    scores = module.score_candidates(batch["history"], torch.stack([batch["target"], batch["history"][:, -1]], 1))
    assert (scores[:, 0] > scores[:, 1]).float().mean() > 0.9


def test_bpr_loss_decreases():
    losses = []
    fit("bpr_mf", "bpr", epochs=30, lr=1e-2, record=losses)
    assert len(losses) == 30
    # BPR-MF is order-free, so it cannot solve the successor task; its loss must still fall well
    # below the untrained value log(2) ~ 0.69 (one noisy sampled negative: average the last epochs)
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses


def test_unknown_kind_names_it_and_lists_valid_ones():
    with pytest.raises(ValueError, match="bert4rec") as err:
        build_sequential("bert4rec", N)
    for kind in KINDS:
        assert kind in str(err.value)
    with pytest.raises(ValueError, match="unknown loss"):
        SequentialRecModule(BPRMF(N), loss="bce")


def test_models_are_the_documented_classes():
    assert isinstance(build_sequential("sasrec", N), SASRec)
    assert isinstance(build_sequential("gru4rec", N), GRU4Rec)
    assert isinstance(build_sequential("bpr_mf", N), BPRMF)


# ------------------------------------------------------------------ RecBole-matching options and early stopping

RECBOLE = dict(inner_size=64, activation="gelu", norm="post", layer_norm_eps=1e-12, emb_scale=False,
               attn_dropout=0.3, inner_dropout=False, positions="from_oldest", init="normal")


def recbole_sasrec(num_items: int = N, **over) -> SASRec:
    torch.manual_seed(0)
    return SASRec(num_items, hidden=16, layers=2, heads=2, dropout=0.1, max_len=12, **{**RECBOLE, **over}).eval()


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("model", ["sasrec_recbole", "gru4rec_recbole"])
def test_recbole_variants_ignore_extra_left_padding(model, grad):
    if model == "sasrec_recbole":
        m = recbole_sasrec()
    else:
        torch.manual_seed(0)
        m = GRU4Rec(N, hidden=16, gru_hidden=24, gru_bias=False).eval()
    h = histories()
    padded = torch.cat([torch.zeros(3, 4, dtype=torch.long), h], dim=1)  # [3, 10]
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(m.user_repr(padded), m.user_repr(h), atol=1e-5, rtol=1e-5)


def test_recbole_sasrec_is_causal():
    model = recbole_sasrec()
    h = histories()
    changed = h.clone()
    changed[0, 3] = 15
    before, after = model.encode(h), model.encode(changed)
    torch.testing.assert_close(after[:, :3], before[:, :3])
    assert all(not torch.allclose(after[0, t], before[0, t]) for t in range(3, 6))


def test_positions_count_from_the_oldest_or_the_newest_item():
    h = torch.tensor([[0, 0, 5, 7, 9], [1, 2, 3, 4, 5]])
    assert recbole_sasrec()._positions(h).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert recbole_sasrec(positions="from_newest")._positions(h).tolist() == [7, 8, 9, 10, 11]  # max_len 12


def test_block_options_reach_the_layers():
    model = recbole_sasrec()
    block = model.blocks[0]
    assert block.linear1.out_features == 64 and block.linear2.in_features == 64  # inner_size
    assert block.activation_relu_or_gelu == 2  # torch's code for gelu (1 = relu)
    assert not block.norm_first and isinstance(model.norm, torch.nn.Identity)  # post-LN, no final LN
    assert isinstance(model.input_norm, torch.nn.LayerNorm) and model.input_norm.eps == 1e-12
    assert block.norm1.eps == block.norm2.eps == 1e-12
    assert block.self_attn.dropout == 0.3 and isinstance(block.dropout, torch.nn.Identity)
    paper = SASRec(N, hidden=16, max_len=12)  # the defaults: the earlier recsim block
    pb = paper.blocks[0]
    assert pb.linear1.out_features == 16 and pb.activation_relu_or_gelu == 1 and pb.norm_first
    assert isinstance(paper.input_norm, torch.nn.Identity) and paper.norm.eps == 1e-5
    assert pb.self_attn.dropout == 0.2 and isinstance(pb.dropout, torch.nn.Dropout)


def test_emb_scale_multiplies_item_embeddings_by_sqrt_hidden():
    outs = {}
    for scale in (True, False):
        model = SASRec(N, hidden=16, layers=0, dropout=0.0, max_len=12, emb_scale=scale).eval()
        model.norm = torch.nn.Identity()  # with no blocks, encode = item * scale + position
        with torch.no_grad():
            model.pos_emb.weight.zero_()
        outs[scale] = (model.encode(histories()), model.item_emb(histories()))
    torch.testing.assert_close(outs[True][0], outs[True][1] * 4.0)  # sqrt(16)
    torch.testing.assert_close(outs[False][0], outs[False][1])


def test_normal_init_is_recbole_s():
    model = recbole_sasrec(num_items=400)
    block = model.blocks[0]
    for w in (block.self_attn.in_proj_weight, block.linear1.weight, block.self_attn.out_proj.weight):
        assert 0.015 < w.std().item() < 0.025
    assert block.linear1.bias.abs().sum() == 0 and block.self_attn.out_proj.bias.abs().sum() == 0
    assert model.item_emb.weight[0].abs().sum() == 0
    torch_init = recbole_sasrec(init="torch")
    assert torch_init.blocks[0].linear1.bias.abs().sum() > 0  # torch's Linear draws its biases


def test_bad_choices_name_the_key_and_the_allowed_values():
    with pytest.raises(ValueError, match=r"backbone.norm='sandwich'.*\['pre', 'post'\]"):
        SASRec(N, norm="sandwich")
    with pytest.raises(ValueError, match="backbone.positions"):
        SASRec(N, positions="random")
    with pytest.raises(ValueError, match=r"early_stopping.metric='AUC'"):
        SequentialRecModule(BPRMF(N), valid_metric="AUC")


def test_gru_hidden_adds_recbole_s_projection():
    model = GRU4Rec(N, hidden=16, gru_hidden=24, gru_bias=False)
    assert model.gru.hidden_size == 24 and model.proj.in_features == 24 and model.proj.out_features == 16
    assert not any("bias" in name for name, _ in model.gru.named_parameters())
    assert model.user_repr(histories()).shape == (3, 16)
    plain = GRU4Rec(N, hidden=16)
    assert plain.gru.hidden_size == 16 and isinstance(plain.proj, torch.nn.Identity)


def hand_bpr() -> BPRMF:
    """Items on a line: e1=(1,0), e2=(.9,0), e3=(.5,0), e4=(.1,0); a history [1] scores 1 > 2 > 3 > 4."""
    model = BPRMF(4, hidden=2)
    with torch.no_grad():
        model.item_emb.weight.copy_(torch.tensor([[0, 0], [1, 0], [0.9, 0], [0.5, 0], [0.1, 0]]))
    return model


def test_validation_ranks_the_catalogue_with_the_full_history_masked():
    # row 0: user 0 saw [1], target 3: item 1 is masked, item 2 is above -> rank 1
    # row 1: user 1 saw [2, 1] (window of 1 keeps [1]), target 4: 1 and 2 masked, 3 above -> rank 1
    # masking only the window would leave item 2 in row 1: rank 2
    samples = [Sample(0, (1,), 3, position=1), Sample(1, (1,), 4, position=2)]
    sequences = {0: np.array([1, 3]), 1: np.array([2, 1, 4])}
    results = {}
    for metric in ("MRR@10", "NDCG@10"):
        for seen in (sequences, None):
            module = SequentialRecModule(hand_bpr(), valid_metric=metric, seen_sequences=seen)
            trainer = lightning.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                                        enable_model_summary=False)
            loader = DataLoader(samples, batch_size=1, collate_fn=lambda b: collate_samples(b, max_len=1))
            results[metric, seen is None] = trainer.validate(module, loader, verbose=False)[0][f"val/{metric}"]
    assert results["MRR@10", False] == pytest.approx(0.5)  # (1/2 + 1/2) / 2
    assert results["MRR@10", True] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert results["NDCG@10", False] == pytest.approx(1 / np.log2(3))


def test_truncated_mrr_matches_recbole_s():
    ranks = np.array([0, 4, 12])
    assert valid_score(ranks, "MRR@10") == pytest.approx((1 + 1 / 5 + 0) / 3)  # rank 12 is past K
    assert valid_score(ranks, "HR@5") == pytest.approx(2 / 3)


class ScriptedValidation(SequentialRecModule):
    """Logs a fixed validation curve, so the stopping epoch and the restored epoch are known in advance."""

    curve = [0.1, 0.3, 0.2, 0.3, 0.05, 0.9, 0.9]

    def on_validation_epoch_end(self):
        self.log("val/MRR@10", self.curve[self.current_epoch])


class WeightsPerEpoch(lightning.Callback):
    def __init__(self):
        self.weights = []

    def on_train_epoch_end(self, trainer, module):
        self.weights.append(module.model.item_emb.weight.detach().clone())


def test_early_stopping_stops_after_patience_and_restores_the_best_epoch():
    # curve 0.1, 0.3 (best, epoch 1), 0.2, 0.3 (a tie is no improvement), 0.05 -> 3 epochs without a
    # strict improvement after epoch 1: stop after epoch 4, weights of epoch 1
    lightning.seed_everything(0, verbose=False)
    module = ScriptedValidation(build_sequential("bpr_mf", N, hidden=8), loss="ce", lr=0.05)
    record = WeightsPerEpoch()
    stop, best = early_stopping_callbacks("MRR@10", patience=3)
    loader = DataLoader(successor_samples(), batch_size=32, collate_fn=lambda b: collate_samples(b, max_len=8))
    trainer = lightning.Trainer(max_epochs=7, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                callbacks=[stop, best, record])
    trainer.fit(module, loader, val_dataloaders=loader)
    assert len(record.weights) == 5 and best.best_epoch == 1 and best.best == pytest.approx(0.3)
    torch.testing.assert_close(module.model.item_emb.weight, record.weights[1])
    assert not torch.equal(record.weights[1], record.weights[4])  # the restore did something


def test_early_stopping_without_validation_is_an_error():
    module = SequentialRecModule(build_sequential("bpr_mf", N, hidden=8))
    loader = DataLoader(successor_samples(), batch_size=32, collate_fn=lambda b: collate_samples(b, max_len=8))
    trainer = lightning.Trainer(max_epochs=300, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                callbacks=early_stopping_callbacks("MRR@10", patience=2))
    with pytest.raises(RuntimeError, match="ran no validation"):
        trainer.fit(module, loader)
    assert trainer.current_epoch == 0


def step_change(grad_clip, trainer_clip) -> float:
    """How far one AdamW step moves the weights, with module-level and Trainer-level clipping."""
    lightning.seed_everything(0, verbose=False)
    module = SequentialRecModule(build_sequential("bpr_mf", N, hidden=8), lr=0.1, grad_clip=grad_clip)
    before = module.model.item_emb.weight.detach().clone()
    loader = DataLoader(successor_samples(), batch_size=32, collate_fn=lambda b: collate_samples(b, max_len=8))
    lightning.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      gradient_clip_val=trainer_clip).fit(module, loader)
    return (module.model.item_emb.weight - before).abs().sum().item()


def test_grad_clip_is_the_module_s_and_the_trainer_s_is_ignored():
    free = step_change(None, None)
    # clipped to norm 1e-12 the gradient is far below Adam's eps (1e-8): the step all but vanishes
    assert step_change(1e-12, None) < 0.01 * free
    assert step_change(None, 1e-12) == pytest.approx(free)  # trainer.gradient_clip_val belongs to LLMs


def tiny_encoded():
    from recsim.protocols.base import EncodedData

    seqs = {0: np.array([1, 2, 3]), 1: np.array([2, 3, 4])}
    return EncodedData("t", seqs, {u: np.arange(3) for u in seqs}, ["<pad>", "a", "b", "c", "d"],
                       ["", "a", "b", "c", "d"], ["u0", "u1"])


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec", "bpr_mf"])
def test_backbone_configs_build_and_drive_early_stopping(backbone):
    from lightning.pytorch.callbacks import EarlyStopping
    from omegaconf import open_dict

    from recsim.models.recommender import SequentialRecommender
    from tests.conftest import compose

    cfg = compose([f"backbone={backbone}"])
    rec = SequentialRecommender(cfg, tiny_encoded(), seed=0)
    assert type(rec.module.model) is {"sasrec": SASRec, "gru4rec": GRU4Rec, "bpr_mf": BPRMF}[backbone]
    stop, best = rec.callbacks()
    assert isinstance(stop, EarlyStopping) and stop.patience == 11 and stop.monitor == "val/MRR@10"
    assert isinstance(best, RestoreBest) and rec.schedule(0)[0].epochs == 300
    assert rec.module.seen_sequences[1].tolist() == [2, 3, 4] and rec.module.grad_clip is None
    with open_dict(cfg):
        cfg.backbone.early_stopping = None
    off = SequentialRecommender(cfg, tiny_encoded(), seed=0)
    assert off.callbacks() == [] and off.schedule(0)[0].epochs == cfg.backbone.epochs


def test_sasrec_config_is_recbole_s():
    from recsim.models.recommender import SequentialRecommender
    from tests.conftest import compose

    model = SequentialRecommender(compose(["backbone=sasrec"]), tiny_encoded(), seed=0).module.model
    block = model.blocks[0]
    assert (block.linear1.out_features, block.activation_relu_or_gelu, block.norm_first) == (256, 2, False)
    assert (model.emb_scale, model.positions, model.input_norm.eps, block.self_attn.dropout) == (
        False, "from_oldest", 1e-12, 0.5)


@pytest.mark.parametrize("kind", ["sasrec", "gru4rec", "bpr_mf"])
@pytest.mark.parametrize("loss", ["ce", "bpr"])
def test_length_buckets_give_the_same_loss_and_gradients(kind, loss):
    """by_length only skips padding: loss and every gradient equal one pass over the padded batch."""
    from recsim.models.sequential_module import SequentialRecModule, build_sequential

    torch.manual_seed(0)
    lengths = [1, 2, 3, 5, 8, 9, 17, 33, 40, 1, 4]
    history = torch.zeros(len(lengths), 40, dtype=torch.long)  # left-padded to 40
    for row, n in enumerate(lengths):
        history[row, 40 - n :] = torch.randint(1, 30, (n,))
    batch = {"history": history, "target": torch.randint(1, 30, (len(lengths),))}
    grads = []
    for buckets in (False, True):
        torch.manual_seed(1)
        extra = {"max_len": 40} if kind == "sasrec" else {}
        module = SequentialRecModule(build_sequential(kind, 30, hidden=16, **extra), loss=loss, seed=3,
                                     length_buckets=buckets).eval()  # dropout off: the passes are comparable
        loss_value = module.compute_loss(batch)
        loss_value.backward()
        grads.append((loss_value.detach(), [p.grad.clone() for p in module.parameters() if p.grad is not None]))
    (a, ga), (b, gb) = grads
    assert torch.allclose(a, b, atol=1e-6)
    assert len(ga) == len(gb) > 0 and all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))
