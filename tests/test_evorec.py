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
from recsim.training import compile_targets

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


def test_kl_figure_after_an_update_runs_in_passes_of_eval_kl_batch_size(monkeypatch):
    """Not in passes of eval.batch_size: the gpu scale scores 256 users a pass, and the figure's fp32 [tokens, V]
    logits of both models at that size took GBs (out of memory beside other runs on one GPU)."""
    from recsim import runner
    from recsim.methods import kl as kl_module
    from recsim.methods.base import Finetune

    asked = []
    monkeypatch.setattr(kl_module, "kl_after_update", lambda module, anchor, samples, batch_size: asked.append(
        (len(samples), batch_size)) or 0.0)
    split = SimpleNamespace(samples={"U_I": [A, B, A]})
    protocol = SimpleNamespace(splits={"s1": split})
    cfg = compose(["eval.batch_size=256", "eval.kl_batch_size=2", "eval.kl_samples=2"])
    rec = SimpleNamespace(kind="llm", module=None)
    assert runner._kl_on_inactive_users(cfg, protocol, SimpleNamespace(eval_split="s1"), rec, Finetune(None), {}) == 0.0
    assert asked == [(2, 2)]


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
    for overrides, expected in (([], ("all", "sum", "auto")),
                                (["method.kl.positions=answer", "method.kl.reduction=token_mean",
                                  "method.kl.cache_frozen=false"], ("answer", "token_mean", False))):
        method = EvoRec(compose(["method=evorec", "method.t=1", *overrides]).method)
        method.protocol = SimpleNamespace(window=20)
        terms.clear()
        method.before_update(stage, rec, [])
        (term,) = terms
        assert (term.positions, term.reduction, term.cache_frozen, term.lam, len(term.samples)) == (*expected, 2e-4, 2)
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


# ---- L_c prepared once per update (kl.cache_frozen): the same term as the per-step passes -------------

from recsim.methods.kl import KLPool, kl_to_anchor  # noqa: E402
from recsim.models.layer_split import lowest_trainable_layer  # noqa: E402

LOCATED = {2, 3}  # of tiny_llama's 4 blocks: l_min = 2


def _pool_setup(n=13, seed=0):
    """A ranker whose located blocks 2-3 train, its pre-update anchor, and a pool of unequal prompt lengths."""
    torch.manual_seed(seed)  # peft draws lora_A from the global generator
    ranker = tiny_ranker()
    anchor = lora_ops.snapshot(ranker.model)
    lora_ops.set_trainable(ranker.model, LOCATED)
    rng = np.random.default_rng(seed)
    pool = [Sample(i, tuple(rng.integers(1, 17, rng.integers(1, 12)).tolist()), int(rng.integers(1, 17)))
            for i in range(n)]
    return ranker, anchor, pool


def _move_located(ranker, scale=0.05):
    with torch.no_grad():
        for p in ranker.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def test_lowest_trainable_layer():
    ranker = tiny_ranker()
    lora_ops.set_trainable(ranker.model, {3, 1})
    assert lowest_trainable_layer(ranker.model) == 1
    lora_ops.set_trainable(ranker.model)
    assert lowest_trainable_layer(ranker.model) == 0
    lora_ops.set_trainable(ranker.model, {3})
    ranker.base.get_input_embeddings().weight.requires_grad_(True)  # outside the blocks: nothing can be skipped
    assert lowest_trainable_layer(ranker.model) == 0
    for p in ranker.parameters():
        p.requires_grad_(False)
    assert lowest_trainable_layer(ranker.model) is None


def test_pool_batches_are_what_collate_makes():
    ranker, anchor, pool = _pool_setup()
    prepared = KLPool(ranker, anchor, pool, "all", cache_frozen=True)
    for rows in ([0, 5, 2], [7], [12, 11, 3, 4, 9]):
        expected = ranker.collate([pool[r] for r in rows])
        got = prepared.batch(np.array(rows))
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("positions", ["all", "answer"])
@pytest.mark.parametrize("cache", [True, "auto"])  # on the CPU, auto: states below l_min once, frozen per step
@pytest.mark.parametrize("prepare_all", [False, True])  # each sample at its first draw | the pool at once (GPU)
def test_prepared_l_c_equals_the_per_step_passes(positions, cache, prepare_all):
    """Values and gradients of L_c at several steps of an update that moves the weights, prepared vs reference.

    fp32 round-off only: the pool is run in other batch shapes than the steps' batches. At |log p| ≈ ln V ≈ 10.8
    one ulp is 9.5e-7, so a position's KL can differ by ~1e-6, and their sum over ~250 positions by a few 1e-6."""
    ranker, anchor, pool = _pool_setup()
    kw = dict(samples=pool, batch_size=4, seed=3, positions=positions, reduction="sum")
    ref = AnchorKL(anchor, 1.0, cache_frozen=False, **kw)
    fast = AnchorKL(anchor, 1.0, cache_frozen=cache, prepare_all=prepare_all, **kw)
    params = [p for p in ranker.parameters() if p.requires_grad]
    torch.manual_seed(0)
    for step in range(5):  # the pool is prepared at step 0, at the anchor; the weights move after every step
        out = {}
        for name, term in (("ref", ref), ("fast", fast)):
            for p in params:
                p.grad = None
            value = term(ranker, {}, {})["kl"]
            value.backward()
            out[name] = value.item(), [p.grad.clone() for p in params]
        (v_ref, g_ref), (v_fast, g_fast) = out["ref"], out["fast"]
        assert v_fast == pytest.approx(v_ref, rel=1e-6, abs=5e-6)
        for a, b in zip(g_fast, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        if step:
            assert v_ref > 0.1  # the weights did move: a real comparison
        _move_located(ranker)
    assert fast.pool.split == 2 and fast.pool.stored == (cache is True)
    # per position, on a batch of the pool
    rows = np.array([4, 0, 9])
    torch.testing.assert_close(fast.pool.kl_rows(ranker, anchor, rows), kl_rows(ranker, fast.pool.batch(rows), anchor,
                                                                               positions), rtol=0, atol=2e-6)


def test_pool_batches_keep_the_pool_width_under_cuda_graphs():
    """Under CUDA graphs (the ranker marked by trainer.compile's callback) every KL batch is as wide as the pool, so
    the compiled blocks see one shape a update; L_c's values are the per-step reference's up to round-off."""
    ranker, anchor, pool = _pool_setup()
    _move_located(ranker, 0.1)
    ranker.cuda_graphs = True
    prepared = KLPool(ranker, anchor, pool, "answer", cache_frozen=True)
    assert prepared.static_width and prepared.summary()["static_width"]
    narrower = []
    for rows in (np.array([0, 5, 2]), np.array([7]), np.array([12, 11, 3, 4, 9])):
        got = prepared.batch(rows)
        assert got["input_ids"].shape[1] == prepared.width  # not the batch's own longest row
        narrow = ranker.collate([pool[r] for r in rows])
        narrower.append(narrow["input_ids"].shape[1] < prepared.width)
        torch.testing.assert_close(prepared.kl_rows(ranker, anchor, rows), kl_rows(ranker, narrow, anchor, "answer"),
                                   rtol=0, atol=2e-6)
    assert any(narrower)  # some batch would have been cut narrower: the width was kept, not merely equal
    ranker.cuda_graphs = False
    assert not KLPool(ranker, anchor, pool, "answer", cache_frozen=True).static_width


def test_pool_stores_final_states_not_log_probs():
    """The store holds the frozen model's final states [positions, H] (it held [positions, V] fp32 log-probs:
    12.6 GB at the gpu scale); a head that the anchor (a LoRA) could move makes it keep no store."""
    ranker, anchor, pool = _pool_setup()
    prepared = KLPool(ranker, anchor, pool, "all", cache_frozen=True, prepare_all=True)
    hidden = ranker.base.get_output_embeddings().weight.shape[1]
    positions = int(prepared.counts.sum())
    assert prepared.frozen_h.shape == (positions, hidden) and prepared.store_bytes == positions * hidden * 4
    # a stored row's states are the frozen pass's final states at its positions
    rows = np.array([3])
    index, start, mask, where = prepared._cut(rows)
    ranker.eval()  # the pool's passes run with dropout off
    with torch.no_grad():
        ids = prepared.tensors["input_ids"][index, start:]
        expected = ranker.with_params(anchor, lambda: ranker._decode(ids, mask).last_hidden_state[where])
    torch.testing.assert_close(prepared.frozen_h[prepared._stored_rows(rows)], expected, rtol=0, atol=1e-5)
    head_weight = next(n for n, p in ranker.model.named_parameters() if p is ranker.base.get_output_embeddings().weight)
    moving = {**anchor, head_weight: ranker.base.get_output_embeddings().weight.detach().clone()}
    assert not KLPool(ranker, moving, pool, "all", cache_frozen=True).stored


def test_prepared_l_c_without_located_layers_runs_every_block():
    ranker, anchor, pool = _pool_setup(n=6)
    lora_ops.set_trainable(ranker.model)  # t = 1: every block trains, nothing to share
    _move_located(ranker, 0.1)
    prepared = KLPool(ranker, anchor, pool, "all", cache_frozen=True)
    for rows in (np.array([1, 5]), np.array([5, 0, 1])):  # a new batch, then one holding prepared rows
        torch.testing.assert_close(prepared.kl_rows(ranker, anchor, rows),
                                   kl_rows(ranker, prepared.batch(rows), anchor, "all"), rtol=0, atol=2e-6)
    assert prepared.split == 0 and prepared.state is None and prepared.ready.sum() == 3


def test_no_backward_below_the_lowest_located_layer():
    """With blocks 2-3 located, a training step (L_e + the consistency term) never runs backward through blocks
    0-1 or the embeddings; prepared, the KL batch does not even run blocks 0-1 forward after its first step."""
    # auto on the CPU: the frozen model still runs, from block 2; prepare_all: the pool before the first step
    for cache, prepare_all in ((False, None), (True, False), ("auto", False), (True, True)):
        ranker, anchor, pool = _pool_setup(n=4)  # one batch: its second draw finds every row prepared
        ranker.loss_terms.append(AnchorKL(anchor, 0.5, pool, batch_size=4, positions="all", reduction="sum",
                                          cache_frozen=cache, prepare_all=prepare_all))
        decoder = ranker.base.get_decoder()
        forward, backward, embedded = [0] * 4, [0] * 4, []
        hooks = [ranker.base.get_input_embeddings().register_forward_hook(lambda m, a, out: embedded.append(out.requires_grad))]
        for l, layer in enumerate(decoder.layers):
            hooks.append(layer.register_forward_hook(lambda m, a, out, l=l: forward.__setitem__(l, forward[l] + 1)))
            hooks.append(layer.register_full_backward_hook(lambda m, gi, go, l=l: backward.__setitem__(l, backward[l] + 1)))
        batch = ranker.collate([Sample(0, (1, 2, 3), 4), Sample(1, (5,), 6)])
        try:
            for step in range(2):
                forward[:], backward[:] = [0] * 4, [0] * 4
                ranker.zero_grad()
                ranker.training_step(batch, step).backward()
                _move_located(ranker)
        finally:
            for h in hooks:
                h.remove()
        assert embedded and not any(embedded)  # nothing (peft, enable_input_require_grads) makes the input need grad
        # second step: L_e and the current KL pass run backward through blocks 2-3 only
        assert backward == [0, 0, 2, 2], (cache, backward)
        # forward: L_e, current and frozen KL passes through every block (reference); prepared, only L_e below
        # l_min, and above it the current pass (and the frozen one without the store)
        assert forward == {False: [3, 3, 3, 3], True: [1, 1, 2, 2], "auto": [1, 1, 3, 3]}[cache], (cache, forward)
        assert ranker.loss_terms[0].pool is None or ranker.loss_terms[0].pool.ready.all()
        grads = {n: p.grad for n, p in ranker.model.named_parameters() if "lora_" in n}
        assert all(g is None for n, g in grads.items() if lora_ops.layer_of(n) < 2)
        assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items()
                   if lora_ops.layer_of(n) >= 2 and "lora_B" in n)


def test_an_update_trains_the_same_weights_prepared_or_not():
    """A Lightning fit of L_e + λ·L_c (EvoRec's term: all positions, sum) ends at the same LoRA weights."""
    trained = {}
    for cache, prepare_all in ((False, None), (True, False), (True, True)):
        ranker, anchor, pool = _pool_setup()
        ranker.loss_terms.append(AnchorKL(anchor, 0.05, pool, batch_size=4, seed=7, name="consistency_kl",
                                          positions="all", reduction="sum", cache_frozen=cache,
                                          prepare_all=prepare_all))
        samples = [Sample(20 + i, (i % 16 + 1, (3 * i) % 16 + 1), (5 * i) % 16 + 1) for i in range(12)]
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, deterministic=True)
        torch.manual_seed(0)  # LoRA dropout of the L_e pass
        trainer.fit(ranker, DataLoader(samples, batch_size=4, shuffle=True, collate_fn=ranker.collate,
                                       generator=torch.Generator().manual_seed(1)))
        trained[cache, prepare_all] = lora_ops.snapshot(ranker.model)
        moved = max(float((trained[cache, prepare_all][n] - anchor[n]).abs().max()) for n in anchor)
        assert moved > 1e-3
    reference = trained.pop((False, None))
    for fast in trained.values():
        for name, value in reference.items():
            torch.testing.assert_close(fast[name], value, rtol=0, atol=1e-5)
            if lora_ops.layer_of(name) < 2:
                assert torch.equal(value, fast[name])


def test_ftkl_keeps_the_per_step_term():
    """FT-KL's KL batch is the training batch itself: nothing to prepare, whatever cache_frozen says."""
    ranker = tiny_ranker()
    batch = ranker.collate([Sample(0, (1, 2, 3), 4), Sample(1, (5,), 6)])
    anchor = lora_ops.snapshot(ranker.model)
    with torch.no_grad():
        for n, p in ranker.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.2)
    for cache in (False, True, "auto"):
        term = AnchorKL(anchor, 1.0, samples=None, cache_frozen=cache)
        value = term(ranker, batch, {})["kl"]
        assert term.pool is None
        assert value.item() == kl_to_anchor(ranker, batch, anchor).item() > 0
    with pytest.raises(ValueError, match="method.kl.cache_frozen='bogus': expected auto, true or false"):
        AnchorKL(anchor, 1.0, cache_frozen="bogus")


def test_pool_is_prepared_eagerly_under_a_compiled_model():
    """The whole pool's one-off preparation runs the blocks eagerly even when trainer.compile compiled them (its
    chunks differ in row count: compiled, each would be a recompile and under CUDA graphs a recording), and
    prepares the same states as without compilation."""
    import torch._dynamo

    ranker, anchor, pool = _pool_setup()
    _move_located(ranker, 0.1)
    plain = KLPool(ranker, anchor, pool, "answer", cache_frozen=True, prepare_all=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    targets = compile_targets(ranker)
    for net in targets:
        net.compile(backend="eager")  # what CompileModel does, with a backend that needs no compiler
    try:
        prepared = KLPool(ranker, anchor, pool, "answer", cache_frozen=True, prepare_all=True)
        assert prepared.ready.all()
        assert torch._dynamo.utils.counters["stats"]["calls_captured"] == 0  # no block was traced
        torch.testing.assert_close(prepared.frozen_h, plain.frozen_h, rtol=0, atol=0)
        rows = np.array([0, 1])
        prepared.kl_rows(ranker, anchor, rows)  # a step's pass is compiled as the trainer asked
        assert torch._dynamo.utils.counters["stats"]["calls_captured"] > 0
    finally:
        for net in targets:
            net._compiled_call_impl = None
        torch._dynamo.reset()
