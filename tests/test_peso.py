"""PESO's softmax-KL proximal term and the other proximal terms (recsim/methods/proximal.py), on tiny inputs."""

import math

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from recsim.backbones import lora as lora_ops
from recsim.methods import build_method
from recsim.methods.proximal import (LoRAOutputKL, ParameterProximity, group_parameters, lora_matrices,
                                     orthogonality, softmax_kl, squared_l2)
from recsim.protocols.base import Sample
from recsim.utils.state import load_state, save_state

from conftest import compose
from test_llm_ranker import tiny_ranker

PREFIX = "base_model.model.model.layers"
NAMES = [f"{PREFIX}.{layer}.{module}.lora_{m}.default.weight"
         for layer in (0, 1) for module in ("self_attn.q_proj", "mlp.down_proj") for m in "AB"]
HEAD = ["base_model.model.lm_head.lora_A.default.weight", "base_model.model.lm_head.lora_B.default.weight"]


def test_softmax_kl_zero_at_the_anchor_positive_elsewhere_and_by_hand():
    v = torch.randn(4, 6)
    assert softmax_kl(v, v.clone()).item() == 0.0
    assert softmax_kl(v + 0.1 * torch.randn(4, 6), v).item() > 0
    # softmax([ln 2, 0, 0]) = [1/2, 1/4, 1/4] against uniform: ½ ln(3/2) + ½ ln(3/4) = ½ ln(9/8)
    got = softmax_kl(torch.tensor([math.log(2), 0.0, 0.0]), torch.tensor([5.0, 5.0, 5.0]))
    assert got.item() == pytest.approx(0.5 * math.log(9 / 8), rel=1e-6)


def test_softmax_kl_gradient_is_the_local_variance_gradient():
    torch.manual_seed(0)
    previous = torch.randn(50, dtype=torch.float64)
    delta = 1e-3 * torch.randn(50, dtype=torch.float64)
    current = (previous + delta).requires_grad_(True)
    softmax_kl(current, previous).backward()
    p = torch.softmax(previous, 0)
    approx = p * (delta - (p * delta).sum())  # ∇ ½ Var_p(Δ)
    assert ((current.grad - approx).norm() / approx.norm()).item() < 1e-2
    assert softmax_kl(current, previous).item() == pytest.approx(0.5 * (p * (delta - (p * delta).sum()) ** 2).sum().item(),
                                                                 rel=1e-2)


def test_granularities_group_parameters_as_stated():
    names = NAMES + HEAD
    module = group_parameters(names, "module")
    assert list(module) == [f"{PREFIX}.0.self_attn.q_proj", f"{PREFIX}.0.mlp.down_proj", f"{PREFIX}.1.self_attn.q_proj",
                            f"{PREFIX}.1.mlp.down_proj", "base_model.model.lm_head"]
    assert module[f"{PREFIX}.1.mlp.down_proj"] == NAMES[6:8]  # A and B together
    assert group_parameters(names, "matrix") == {n: [n] for n in names}
    assert group_parameters(names, "layer") == {"layer0": NAMES[:4], "layer1": NAMES[4:], "outside_blocks": HEAD}
    assert group_parameters(names, "global") == {"all": names}
    with pytest.raises(ValueError, match="method.granularity='block'"):
        group_parameters(names, "block")


def _two_modules():
    """Module q: A = [ln 2, 0], B = [0]; module d: A = [1, 2], B = [3]; previous adapter all zeros."""
    q, d = f"{PREFIX}.0.self_attn.q_proj", f"{PREFIX}.0.mlp.down_proj"
    params = {f"{q}.lora_A.default.weight": torch.tensor([[math.log(2), 0.0]]), f"{q}.lora_B.default.weight": torch.zeros(1, 1),
              f"{d}.lora_A.default.weight": torch.tensor([[1.0, 2.0]]), f"{d}.lora_B.default.weight": torch.tensor([[3.0]])}
    return params, {n: torch.zeros_like(p) for n, p in params.items()}


def test_peso_term_by_hand_at_each_granularity_and_reduction():
    params, anchor = _two_modules()
    term = lambda g, r: ParameterProximity(params, anchor, "softmax_kl", g, r, lam=1.0, name="peso_kl").raw().item()
    def kl_to_uniform(x):  # KL(softmax(x) ‖ uniform) by hand
        z = [math.exp(v) for v in x]
        return sum(e / sum(z) * math.log(e / sum(z) * len(x)) for e in z)

    by_module = kl_to_uniform([math.log(2), 0, 0]) + kl_to_uniform([1, 2, 3])  # each module's 3 entries
    by_matrix = kl_to_uniform([math.log(2), 0]) + 0.0 + kl_to_uniform([1, 2]) + 0.0  # a 1-entry B has KL 0
    assert term("module", "sum") == pytest.approx(by_module, rel=1e-6)
    assert term("module", "mean") == pytest.approx(by_module / 2, rel=1e-6)
    assert term("matrix", "sum") == pytest.approx(by_matrix, rel=1e-6)
    assert term("matrix", "mean") == pytest.approx(by_matrix / 2, rel=1e-6)  # / 2 LoRA modules: the authors' mean
    assert term("global", "sum") == pytest.approx(kl_to_uniform([math.log(2), 0, 0, 1, 2, 3]), rel=1e-6)
    assert term("layer", "sum") == pytest.approx(term("global", "sum"))  # both modules sit in layer 0
    with pytest.raises(ValueError, match="method.reduction='avg'"):
        ParameterProximity(params, anchor, "softmax_kl", "module", "avg", lam=1.0, name="peso_kl")


def test_l2_term_by_hand():
    params, anchor = _two_modules()
    l2 = lambda r: ParameterProximity(params, anchor, "squared_l2", "module", r, lam=1.0, name="prox_l2").raw().item()
    assert l2("sum") == pytest.approx(math.log(2) ** 2 + 1 + 4 + 9)  # Σ over every entry
    assert l2("mean") == pytest.approx((math.log(2) ** 2 + 14) / 2)  # / 2 LoRA modules
    assert squared_l2(torch.ones(3), torch.ones(3)).item() == 0.0


def test_orthogonality_by_hand():
    current = {"q.lora_A.default.weight": torch.eye(2)}
    earlier = [{"q.lora_A.default.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]])},
               {"q.lora_A.default.weight": torch.tensor([[0.0, 1.0], [0.0, 0.0]])}]
    # ‖I A_0^T‖² = 1 + 4 + 9 + 16 = 30; ‖I A_1^T‖² = 1
    assert orthogonality(current, earlier).item() == pytest.approx(31.0)
    assert orthogonality(current, [{"q.lora_A.default.weight": torch.zeros(3, 2)}]).item() == 0.0


BATCH = [Sample(0, (1, 2, 3), 4), Sample(1, (5,), 6), Sample(2, (8, 2, 7, 9), 9)]


def _output_kl_after_a_pass(ranker, term):
    ranker.train()  # the training pass: LoRA dropout on; the term's inputs are taken before it
    batch = ranker.collate(BATCH)
    ranker.answer_logits(batch)
    return term.raw(batch)


def test_output_kl_zero_for_equal_adapters_and_equal_to_a_per_module_reference():
    ranker = tiny_ranker()
    term = LoRAOutputKL(ranker.model, {n: p.detach().clone() for n, p in lora_matrices(ranker.model).items()}, lam=1.0)
    assert _output_kl_after_a_pass(ranker, term).item() == 0.0
    with torch.no_grad():  # move the adapter away from the anchor
        for n, p in lora_matrices(ranker.model).items():
            p.add_(0.3 * torch.randn_like(p))
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0].detach())) for n, m in term.layers]
    batch = ranker.collate(BATCH)
    ranker.answer_logits(batch)
    got = term.raw(batch)
    for h in hooks:
        h.remove()
    mask = batch["attention_mask"].bool()
    reference = []
    for n, layer in term.layers:  # one module at a time: the real tokens' mean of KL(new ‖ prev) over features
        a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        a0, b0 = term.previous[n]
        x = seen[n][mask]  # [N, in]
        new, prev = s * x @ a.T @ b.T, s * x @ a0.T @ b0.T
        reference.append((torch.softmax(new, -1) * (torch.log_softmax(new, -1) - torch.log_softmax(prev, -1))).sum(-1).mean())
    assert got.item() > 0 and got.item() == pytest.approx(torch.stack(reference).mean().item(), rel=1e-5)
    got.backward()  # the gradient reaches every LoRA matrix of the adapter, nothing else
    grads = {n for n, p in ranker.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == set(lora_matrices(ranker.model))
    term.close()
    ranker.answer_logits(batch)
    assert term.inputs == {}  # the hooks are gone


def _method(name, **overrides):
    cfg = compose([f"method={name}"] + [f"method.{k}={v}" for k, v in overrides.items()])
    return build_method(OmegaConf.create(OmegaConf.to_container(cfg.method, resolve=True)))


class _Rec:
    kind = "llm"

    def __init__(self):
        self.module = type("M", (), {"ce_temperature": 1.0})()

    def schedule(self, index, validated=True):
        return OmegaConf.create({"lr": 2e-4 if index == 0 else 4e-4, "epochs": 1}), 8


def test_lr_scale_sets_the_update_lr_and_ce_temperature_reaches_the_ranker():
    stage = lambda i: type("S", (), {"index": i})()
    method, rec = _method("peso", lr_scale=0.1, ce_temperature=0.8), _Rec()
    method.setup(rec, protocol=None)
    update = OmegaConf.create({"lr": 4e-4, "epochs": 2})
    assert method.update_optim(update, stage(2)).lr == pytest.approx(2e-5)  # 0.1 x stage 0's 2e-4
    assert method.update_optim(update, stage(2)).epochs == 2 and update.lr == 4e-4  # a copy, the rest kept
    assert method.update_optim(update, stage(0)) is update
    assert rec.module.ce_temperature == 0.8 and method.shares_base_stage is False
    plain = _method("single_lora")
    plain.setup(_Rec(), protocol=None)
    assert plain.update_optim(update, stage(1)).lr == 4e-4 and plain.shares_base_stage is True
    with pytest.raises(ValueError, match="method.lr_scale=-1"):
        _method("peso", lr_scale=-1)


def test_orthogonal_method_keeps_earlier_a_through_its_state(tmp_path):
    ranker = tiny_ranker()
    rec = type("R", (), {"model": ranker.model, "module": ranker, "set_trainable": lambda self: None,
                         "add_loss_term": lambda self, t: None, "clear_loss_terms": lambda self: None})()
    method = _method("prox_orthogonal")
    for index in (1, 2):
        method.before_update(type("S", (), {"index": index})(), rec, samples=[])
        assert len(method.term.earlier_a) == index  # the A of every earlier stage
        method.after_update(None, rec)
        with torch.no_grad():
            for n, p in lora_matrices(ranker.model).items():
                p.add_(1.0)
    save_state(tmp_path, method.state_dict())
    again = _method("prox_orthogonal")
    again.load_state_dict(load_state(tmp_path))
    assert sorted(again.earlier_a) == ["0", "1"]
    for k in ("0", "1"):
        for n, a in method.earlier_a[k].items():
            assert torch.equal(again.earlier_a[k][n], a)
    assert not torch.equal(method.earlier_a["0"][next(iter(method.earlier_a["0"]))],
                           method.earlier_a["1"][next(iter(method.earlier_a["1"]))])


def test_lora_matrices_are_a_and_b_only():
    ranker = tiny_ranker()
    names = list(lora_matrices(ranker.model))
    assert len(names) == 4 * 7 * 2 and all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    assert set(names) <= set(lora_ops.lora_parameters(ranker.model))


TERMS = {"single_lora": None, "peso": "peso_kl", "prox_l2": "prox_l2", "prox_output_kl": "output_kl",
         "prox_orthogonal": "orthogonal"}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(TERMS))
def test_every_method_runs_three_stages_and_logs_its_term(tmp_path, method):
    from recsim.runner import run

    out = tmp_path / method
    cfg = compose([f"method={method}", "stage=stages", "stage.window_shares=[0.15,0.15,0.1]", "dataset=synthetic",
                   "dataset.simulator.num_users=40", "backbone=tiny_llama", "trainer.max_train_samples=16",
                   "trainer.base.max_steps=3", "trainer.update.max_steps=3", "trainer.progress_bar=false",
                   "eval.n_boot=10", "eval.validation=false", "eval.kl_samples=8"]
                  + ([] if method == "single_lora" else ["method.lam=1.0"]), output_dir=out)
    run(cfg)
    assert (out / "DONE").is_file()
    for stage in (1, 2):
        logged = pd.read_csv(out / "logs" / f"stage{stage}" / "metrics.csv")
        if TERMS[method] is None:
            assert not any(c.endswith("_raw") for c in logged.columns)
            continue
        raw = logged[f"train/{TERMS[method]}_raw"].dropna()
        assert len(raw) == 3 and (raw >= 0).all() and raw.max() > 0
        if method != "prox_orthogonal":  # v_t starts at v_{t-1}: 0 at the first step, then the adapter moves
            assert raw.iloc[0] == 0.0
