"""SASRec, GRU4Rec and BPR-MF: padding, causality, scoring, growth, and that they can learn."""

import lightning
import pytest
import torch
from torch.utils.data import DataLoader

from recsim.models.sequential import BPRMF, GRU4Rec, SASRec, collate_samples
from recsim.models.sequential_module import SequentialRecModule, build_sequential
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
