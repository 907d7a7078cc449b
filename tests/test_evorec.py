"""EvoRec's consistency term (L_c normalisation, logging, KL after an update) and Locate's block outputs."""

import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from recsim.backbones import lora as lora_ops
from recsim.methods.evorec import EvoRec
from recsim.methods.kl import AnchorKL, kl_after_update, kl_rows
from recsim.protocols.base import Sample, StageData

from conftest import compose
from test_llm_ranker import tiny_ranker

# ---- a ranker whose answer logits are known: token k of a sample has logits scale_k · w ------------

SCALES = {1: [1.0], 2: [0.0, 1.0]}  # target item -> the scales of its answer tokens
# anchor w = [0, 0]: p = (1/2, 1/2) everywhere. current w = [ln 3, 0]: q = (3/4, 1/4) at scale 1, p at scale 0.
# KL(p ‖ q) at scale 1 = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(4/3); 0 at scale 0.
K1 = 0.5 * math.log(4 / 3)
A, B = Sample(0, (5,), 1), Sample(1, (5,), 2)  # 1 answer token (KL K1), 2 answer tokens (KL 0, K1)


class LogitTable(torch.nn.Module):
    device = torch.device("cpu")

    def __init__(self, w):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.w = torch.nn.Parameter(torch.tensor(w))

    def collate(self, samples):
        return {"scale": torch.tensor([c for s in samples for c in SCALES[s.target]]),
                "input_ids": torch.zeros(len(samples), 1)}

    def answer_logits(self, batch):
        return {"logits": batch["scale"][:, None] * self.model.w[None, :]}

    def with_params(self, params, fn, *args):
        saved = self.model.w.detach().clone()
        with torch.no_grad():
            self.model.w.copy_(params["w"])
        try:
            return fn(*args)
        finally:
            with torch.no_grad():
                self.model.w.copy_(saved)


ANCHOR = {"w": torch.tensor([0.0, 0.0])}


def test_kl_after_update_by_hand():
    current = LogitTable([math.log(3), 0.0])
    # mean over the 3 answer tokens (K1 + 0 + K1) / 3, not the mean of the per-sample means (3/4 K1)
    for batch_size in (1, 2):
        assert kl_after_update(current, ANCHOR, [A, B], batch_size) == pytest.approx(2 * K1 / 3, rel=1e-6)
    assert kl_after_update(current, ANCHOR, [A], 4) == pytest.approx(K1, rel=1e-6)
    assert kl_after_update(LogitTable([0.0, 0.0]), ANCHOR, [A, B], 2) == 0.0
    assert kl_after_update(current, ANCHOR, [], 2) == 0.0
    current.train()
    kl_after_update(current, ANCHOR, [A], 1)
    assert current.training  # the mode is restored


def test_anchor_kl_reductions_by_hand():
    current = LogitTable([math.log(3), 0.0])
    term = lambda **kw: AnchorKL(ANCHOR, 0.5, [A, B], batch_size=2, name="c", **kw)(current, {}, {})["c"].item()
    assert term() == pytest.approx(0.5 * 2 * K1 / 3, rel=1e-6)  # default: token_mean, FT-KL's unchanged term
    assert term(reduction="sum") == pytest.approx(0.5 * 2 * K1, rel=1e-6)  # summed over the 3 tokens


def test_bad_kl_settings_are_rejected():
    with pytest.raises(ValueError, match="method.kl.positions='prompt'"):
        AnchorKL(ANCHOR, 1.0, positions="prompt")
    with pytest.raises(ValueError, match="method.kl.reduction='mean'.*token_mean"):
        AnchorKL(ANCHOR, 1.0, reduction="mean")


def _moved_ranker():
    ranker = tiny_ranker()
    anchor = lora_ops.snapshot(ranker.model)
    with torch.no_grad():
        for n, p in ranker.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.3)
    return ranker, anchor


def test_kl_after_update_on_the_llm_is_zero_at_the_anchor_and_positive_after():
    ranker = tiny_ranker()  # LoRA dropout 0.05: 0 needs dropout off
    ranker.train()
    samples = [Sample(0, (1, 2, 3), 4), Sample(1, (5, 6), 7), Sample(2, (8,), 9)]
    assert kl_after_update(ranker, lora_ops.snapshot(ranker.model), samples, 2) == 0.0
    moved, anchor = _moved_ranker()
    rows = torch.cat([kl_rows(moved, moved.collate([s]), anchor) for s in samples])
    assert kl_after_update(moved, anchor, samples, 2) == pytest.approx(rows.mean().item(), rel=1e-5)
    assert rows.mean().item() > 1e-4


def test_all_positions_are_every_predicting_position():
    ranker, anchor = _moved_ranker()
    one = ranker.collate([Sample(0, (1, 2, 3), 4)])
    answer, every = kl_rows(ranker, one, anchor, "answer"), kl_rows(ranker, one, anchor, "all")
    n_tokens, n_answer = int(one["attention_mask"].sum()), int((one["labels"] != -100).sum())
    assert len(answer) == n_answer and len(every) == n_tokens - 1  # the last token predicts nothing
    torch.testing.assert_close(every[-n_answer:], answer)  # the answer positions are the last ones
    two = ranker.collate([Sample(0, (1, 2, 3), 4), Sample(1, (5,), 6)])  # left padding is no position
    assert len(kl_rows(ranker, two, anchor, "all")) == int(two["attention_mask"].sum()) - 2


def test_raw_and_weighted_consistency_are_logged_per_step(tmp_path):
    ranker = tiny_ranker(nonzero_b=False)
    lora_ops.set_trainable(ranker.model)
    lam, inactive = 0.5, [Sample(5, (1, 2), 3), Sample(6, (4,), 5)]
    ranker.loss_terms.append(AnchorKL(lora_ops.snapshot(ranker.model), lam, inactive, batch_size=2,
                                      name="consistency_kl", positions="all", reduction="sum"))
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=CSVLogger(str(tmp_path), name="logs"),
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    samples = [Sample(0, (1, 2, 3), 4)] * 2
    trainer.fit(ranker, DataLoader(samples, batch_size=2, collate_fn=ranker.collate))
    logs = pd.read_csv(next(tmp_path.glob("logs/*/metrics.csv")))
    raw, weighted = logs["train/consistency_kl_raw"].to_numpy(), logs["train/consistency_kl"].to_numpy()
    assert len(raw) == 3 and raw[0] == 0.0 and raw[-1] > 0  # 0 before the first step moves the adapter
    np.testing.assert_allclose(weighted, lam * raw, rtol=1e-5)
    assert "train/nll" in logs


def test_evorec_builds_its_consistency_term_from_the_config():
    ranker = tiny_ranker()
    stage = StageData(index=1, name="stage1", sequences={0: np.array([1, 2, 3]), 1: np.array([4, 5, 6])},
                      new_targets={0: [2]}, cumulative_targets={1: [1, 2]}, boundary={0: 2, 1: 3}, active_users=[0],
                      inactive_users=[1], eval_split="test1")
    terms = []
    rec = SimpleNamespace(model=ranker.model, set_trainable=lambda layers=None: None, add_loss_term=terms.append)
    for overrides, expected in (([], ("all", "sum")), (["method.kl.positions=answer", "method.kl.reduction=token_mean"],
                                                       ("answer", "token_mean"))):
        method = EvoRec(compose(["method=evorec", "method.t=1", *overrides]).method)
        method.protocol = SimpleNamespace(window=20)
        terms.clear()
        method.before_update(stage, rec, [])
        (term,) = terms
        assert (term.positions, term.reduction, term.lam, len(term.samples)) == (*expected, 2e-4, 2)
    method = EvoRec(compose(["experiment=evorec_wo_consistency", "method.t=1"]).method)  # the ablation row: no term
    method.protocol = SimpleNamespace(window=20)
    terms.clear()
    method.before_update(stage, rec, [])
    assert terms == [] and method.cfg.lam == 0


# ---- Locate: the states are the decoder blocks' outputs -----------------------------------------


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_layer_states_are_block_outputs_not_the_normed_state(pooling):
    ranker = tiny_ranker()
    histories = [(1, 2, 3), (4, 5)]  # unequal lengths: left padding
    layers = ranker.base.get_decoder().layers
    hooks_before = [len(layer._forward_hooks) for layer in layers]
    own = []  # the last block's output, taken by a hook of the test's own
    handle = layers[-1].register_forward_hook(lambda m, a, out: own.append(out[0] if isinstance(out, tuple) else out))
    try:
        states = ranker.layer_states(histories, pooling, batch_size=2)  # [L, n, H]
    finally:
        handle.remove()
    assert [len(layer._forward_hooks) for layer in layers] == hooks_before  # its hooks are removed
    ids, mask = ranker._left_pad([ranker.prompt_ids(h) for h in histories])
    ranker.eval()  # LoRA dropout off, as layer_states has it
    with torch.no_grad():
        hidden = ranker._decode(ids, mask, output_hidden_states=True).hidden_states  # embeddings, ..., normed last
    m = mask[:, :, None].float()
    pool = (lambda h: h[:, -1]) if pooling == "last" else (lambda h: (h * m).sum(1) / m.sum(1))
    assert states.shape == (len(layers), 2, hidden[0].shape[-1])
    for l in range(len(layers) - 1):
        torch.testing.assert_close(states[l], pool(hidden[l + 1]))
    torch.testing.assert_close(states[-1], pool(own[0]))
    assert not torch.allclose(states[-1], pool(hidden[-1]), atol=1e-3)  # hidden_states[-1] is normed
    if pooling == "last":  # and normed it is exactly: norm(block output) = hidden_states[-1]
        with torch.no_grad():
            torch.testing.assert_close(ranker.base.get_decoder().norm(states[-1]), hidden[-1][:, -1])
