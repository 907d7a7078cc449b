"""SumLoRA, SD-LoRA and InfLoRA (recsim.methods.cumulative) on the tiny random Llama: frozen adapters stay put,
the model sums every adapter, each method's reshaping of frozen adapters, the variants' data and init, storage,
resume, and five stages end to end through the runner."""

import functools
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from recsim.backbones import lora as lora_ops
from recsim.backbones.adapters import Adapters
from recsim.methods import METHODS
from recsim.methods.cumulative import delta_norm, design_down_projection, extend_basis, input_covariances
from recsim.protocols.base import Sample, make_samples
from recsim.utils.state import load_state, save_state

from conftest import compose
from test_llm_ranker import tiny_ranker

SEQS = {0: np.arange(1, 9), 1: np.arange(3, 11), 2: np.arange(5, 13)}
WINDOW = 5
NEW = {0: [1, 2, 3], 1: [4, 5], 2: [6, 7]}  # each stage's new target positions (every user)
EVAL = [Sample(0, (1, 2, 3), 4), Sample(1, (5, 6), 7), Sample(2, tuple(range(1, 9)), 9)]
CANDS = np.array([[4, 7, 9, 2], [7, 1, 2, 16], [9, 16, 3, 11]])


def stage(i):
    cumulative = sorted(p for j in range(i + 1) for p in NEW[j])
    return SimpleNamespace(index=i, name=f"stage{i}", sequences=SEQS, new_targets={u: NEW[i] for u in SEQS},
                           cumulative_targets={u: cumulative for u in SEQS}, eval_split=f"window{i + 1}")


PROTOCOL = SimpleNamespace(window=WINDOW, stages=[stage(i) for i in range(3)], valid_splits={})


class Rec:
    """The slice of LLMRecommender the cumulative methods use, around the tiny ranker."""

    kind = "llm"

    def __init__(self, nonzero_b=True):
        self.module = tiny_ranker(nonzero_b=nonzero_b)

    @property
    def model(self):
        return self.module.model

    def set_trainable(self, layers=None, adapter="default"):
        return lora_ops.set_trainable(self.model, layers, adapter)

    def score_candidates(self, samples, cands, bs):
        return self.module.score_candidates(samples, cands, bs)

    def clear_loss_terms(self):
        pass


@functools.lru_cache(maxsize=None)
def method_cfg(name, overrides=()):
    return compose([f"method={name}", "backbone=tiny_llama", *overrides]).method


def build(name, *overrides, nonzero_b=True):
    rec, method = Rec(nonzero_b), METHODS[name](method_cfg(name, tuple(overrides)))
    method.setup(rec, PROTOCOL)
    return rec, method


def train_step(rec, seed=0):
    """One AdamW step (with weight decay: it would move any frozen tensor it saw) on whatever is trainable."""
    torch.manual_seed(seed)
    params = [p for p in rec.module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    rec.module.train()
    out = rec.module.answer_logits(rec.module.collate(make_samples(SEQS, {u: NEW[2] for u in SEQS}, WINDOW)))
    F.cross_entropy(out["logits"], out["targets"]).backward()
    opt.step()
    opt.zero_grad()
    rec.module.eval()


def run_stage(method, rec, i, train=True):
    st = stage(i)
    method.report = {}
    method.before_update(st, rec, method.training_samples(st, rec))
    if train:
        train_step(rec, seed=i)
    method.after_update(st, rec)


def scores(rec):
    return rec.score_candidates(EVAL, CANDS, 2)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def layers(rec):
    return {n: m for n, m in rec.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


# ---- SumLoRA ---------------------------------------------------------------------------------------
def test_sumlora_freezes_earlier_adapters_and_sums_every_delta():
    rec, method = build("sumlora", "method.variant=latest")
    adapters = Adapters(rec.model)
    run_stage(method, rec, 0)
    default = adapters.snapshot("default")
    run_stage(method, rec, 1)
    assert same(adapters.snapshot("default"), default)  # bit for bit across a stage
    assert not (adapters.snapshot("stage1")[next(n for n in adapters.snapshot("stage1") if "lora_B" in n)] == 0).all()
    stage1 = adapters.snapshot("stage1")
    run_stage(method, rec, 2)
    assert same(adapters.snapshot("default"), default) and same(adapters.snapshot("stage1"), stage1)
    assert method.stack == ["default", "stage1", "stage2"] and adapters.active() == method.stack
    # output = base + Σ_k scaling · B_k A_k x, by hand on a projection
    layer = layers(rec)["base_model.model.model.layers.2.mlp.down_proj"]
    x = torch.randn(3, 4, layer.in_features)
    with torch.no_grad():
        by_hand = layer.base_layer(x) + sum(layer.scaling[k] * x @ layer.lora_A[k].weight.T @ layer.lora_B[k].weight.T
                                            for k in method.stack)
        torch.testing.assert_close(layer(x), by_hand, rtol=1e-5, atol=1e-6)


def test_sumlora_directions_rescales_each_adapter_once_when_it_is_frozen():
    rec, method = build("sumlora", "method.variant=latest", "method.form=directions")
    run_stage(method, rec, 0)
    trained = {n: (l.lora_A["default"].weight.clone(), l.lora_B["default"].weight.clone()) for n, l in layers(rec).items()}
    method.before_update(stage(1), rec, method.training_samples(stage(1), rec))
    for name, layer in layers(rec).items():
        a0, b0 = trained[name]  # (α/r)(B/‖B‖_F)(A/‖A‖_F)
        torch.testing.assert_close(layer.lora_A["default"].weight, a0 / a0.norm(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(layer.lora_B["default"].weight, b0 / b0.norm(), rtol=1e-6, atol=1e-7)
        assert (layer.lora_B["stage1"].weight == 0).all()  # the trainable adapter is not rescaled
        assert layer.scaling["default"] == 2.0  # α/r stays
    train_step(rec)
    method.after_update(stage(1), rec)
    unit = {n: l.lora_A["default"].weight.clone() for n, l in layers(rec).items()}
    stage1 = {n: l.lora_A["stage1"].weight.clone() for n, l in layers(rec).items()}
    run_stage(method, rec, 2)
    for name, layer in layers(rec).items():
        torch.testing.assert_close(layer.lora_A["stage1"].weight, stage1[name] / stage1[name].norm())
        torch.testing.assert_close(layer.lora_A["default"].weight, unit[name])  # once, not again


# ---- SD-LoRA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["latest", "latest_inherit"])
def test_sdlora_is_function_preserving_at_a_stage_start_and_trains_magnitudes(variant):
    rec, method = build("sdlora", f"method.variant={variant}")
    run_stage(method, rec, 0)
    before = scores(rec)
    method.before_update(stage(1), rec, method.training_samples(stage(1), rec))
    np.testing.assert_allclose(scores(rec), before, rtol=1e-5, atol=1e-6)
    trainable = {id(p) for p in rec.module.parameters() if p.requires_grad}  # what the optimiser gets
    for name, layer in layers(rec).items():
        alpha = layer.scaling["default"]
        assert isinstance(alpha, torch.nn.Parameter) and alpha.ndim == 0 and id(alpha) in trainable
        assert float(delta_norm(layer.lora_A["default"].weight, layer.lora_B["default"].weight)) == pytest.approx(1)
        assert not layer.lora_B["default"].weight.requires_grad and layer.lora_B["stage1"].weight.requires_grad
    out = rec.module.answer_logits(rec.module.collate(EVAL))
    F.cross_entropy(out["logits"], out["targets"]).backward()
    grads = [p.grad for p in method.magnitudes.values()]
    assert all(g is not None for g in grads) and sum(float(g.abs()) for g in grads) > 0
    rec.module.zero_grad()
    start = {k: p.detach().clone() for k, p in method.magnitudes.items()}
    train_step(rec)
    assert any(not torch.equal(p, start[k]) for k, p in method.magnitudes.items())  # the step moved them
    method.after_update(stage(1), rec)
    before = scores(rec)  # again after a trained stage: stage1 is split into direction and magnitude
    method.before_update(stage(2), rec, method.training_samples(stage(2), rec))
    np.testing.assert_allclose(scores(rec), before, rtol=1e-5, atol=1e-6)
    assert len(method.magnitudes) == 2 * len(layers(rec))


# ---- InfLoRA ---------------------------------------------------------------------------------------
def test_gpm_rule_and_design_by_hand():
    cov = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    e = torch.eye(4, dtype=torch.float64)
    m = extend_basis(cov, None, 0.7)  # 4 + 3 = 7 of 10 reaches 0.7
    assert m.shape == (4, 2) and torch.allclose((m @ m.T).abs(), torch.diag(torch.tensor([1.0, 1, 0, 0], dtype=torch.float64)))
    m = extend_basis(cov, e[:, :1], 0.9)  # M holds 4; + 3 + 2 reaches 9
    assert m.shape == (4, 3) and torch.allclose(m[:, 0], e[:, 0])
    assert extend_basis(cov, e[:, :2], 0.7).shape == (4, 2)  # M already holds 0.7: nothing added
    a = design_down_projection(cov, e[:, :1], 2)  # the top-2 directions off M = e1: e2, e3
    torch.testing.assert_close(a.abs(), e[1:3])
    a = design_down_projection(cov, e[:, :3], 2)  # one direction left: the second row is 0
    torch.testing.assert_close(a.abs(), torch.stack([e[3], torch.zeros(4, dtype=torch.float64)]))


def test_input_covariances_equal_a_per_sample_reference_without_padding():
    rec = Rec()
    layer_map = layers(rec)
    name = "base_model.model.model.layers.1.self_attn.v_proj"
    samples = make_samples(SEQS, {u: NEW[1] for u in SEQS}, WINDOW) + [Sample(9, (1,), 2)]  # unequal lengths
    fast = input_covariances(rec.module, layer_map, samples, batch_size=3)[name]
    seen = []
    handle = layer_map[name].register_forward_pre_hook(lambda m, args: seen.append(args[0][0].double()))
    rec.module.eval()  # as the collection runs: no dropout in the layers below
    with torch.no_grad():
        for s in samples:  # one sample a pass: no padding at all
            batch = rec.module.collate([s])
            rec.module._decode(batch["input_ids"], batch["attention_mask"])
    handle.remove()
    x = torch.cat(seen)
    torch.testing.assert_close(fast, x.T @ x, rtol=1e-4, atol=1e-4)


def test_inflora_designs_a_off_the_memory_and_trains_only_b():
    rec, method = build("inflora")
    run_stage(method, rec, 0)
    assert method.bases == {}  # stage 0 enters M at the start of stage 1
    for i in (1, 2):
        method.before_update(stage(i), rec, method.training_samples(stage(i), rec))
        assert method.memory_stages == list(range(i))
        for name, layer in layers(rec).items():
            a, b, m = layer.lora_A[f"stage{i}"].weight, layer.lora_B[f"stage{i}"].weight, method.bases[name]
            assert 0 < m.shape[1] < a.shape[1]
            assert (a.double() @ m).abs().max() < 1e-5
            rows = a[a.abs().sum(1) > 0].double()
            torch.testing.assert_close(rows @ rows.T, torch.eye(len(rows), dtype=torch.float64), atol=1e-5, rtol=0)
            assert (b == 0).all() and b.requires_grad and not a.requires_grad
        train_step(rec)
        sizes = {n: m.shape[1] for n, m in method.bases.items()}
        method.after_update(stage(i), rec)
        assert method.memory_stages == list(range(i + 1))
        assert all(method.bases[n].shape[1] >= k for n, k in sizes.items())
        assert sum(method.bases[n].shape[1] for n in sizes) > sum(sizes.values())  # stage i's inputs entered M


# ---- variants, storage, resume ---------------------------------------------------------------------
@pytest.mark.parametrize("variant, inherit_init", [("all", "increment"), ("latest", "increment"),
                                                   ("all_inherit", "increment"), ("latest_inherit", "copy")])
def test_variants_pick_the_data_and_the_init(variant, inherit_init):
    rec, method = build("sumlora", f"method.variant={variant}", f"method.inherit_init={inherit_init}")
    st = stage(1)
    targets = st.cumulative_targets if variant.startswith("all") else st.new_targets
    assert method.training_samples(st, rec) == make_samples(SEQS, targets, WINDOW)
    assert len(method.training_samples(st, rec)) == (15 if variant.startswith("all") else 6)
    run_stage(method, rec, 0)
    default = {n: (l.lora_A["default"].weight.clone(), l.lora_B["default"].weight.clone()) for n, l in layers(rec).items()}
    method.before_update(st, rec, method.training_samples(st, rec))
    if not variant.endswith("inherit"):  # the fresh init the seed gives
        fresh = Adapters(Rec().model)
        fresh.add("stage1", seed=method.cfg.seed * 1000 + 1)
        fresh_a = fresh.snapshot("stage1")
    for name, layer in layers(rec).items():
        a, b = layer.lora_A["stage1"].weight, layer.lora_B["stage1"].weight
        if not variant.endswith("inherit"):
            assert torch.equal(a, fresh_a[f"{name}.lora_A.stage1.weight"]) and (b == 0).all()
        elif inherit_init == "increment":
            assert torch.equal(a, default[name][0]) and (b == 0).all()
        else:
            assert torch.equal(a, default[name][0]) and torch.equal(b, default[name][1])


@pytest.mark.parametrize("name", ["sumlora", "sdlora", "inflora"])
def test_adapter_bytes_grow_with_stages(name):
    rec, method = build(name)
    one = Adapters(rec.model).bytes(["default"])
    run_stage(method, rec, 0)
    assert "adapter_bytes" not in method.report  # stage 0 is shared with every method: no method figures
    seen = []
    for i in (1, 2):
        run_stage(method, rec, i, train=False)
        seen.append((method.report["adapter_bytes"], method.report["adapters"]))
    assert [n for _, n in seen] == [2, 3]
    alphas = 4 * len(layers(rec)) if name == "sdlora" else 0  # SD-LoRA: + one fp32 α per module and frozen adapter
    assert [b for b, _ in seen] == [2 * one + alphas, 3 * one + 2 * alphas]


@pytest.mark.parametrize("name, overrides", [("sumlora", ("method.form=directions",)), ("sdlora", ()),
                                             ("inflora", ())])
def test_resume_restores_the_method_and_continues_as_an_uninterrupted_run(tmp_path, name, overrides):
    rec, method = build(name, *overrides)
    for i in (0, 1):
        run_stage(method, rec, i)
    save_state(tmp_path, method.state_dict())
    Adapters(rec.model).save(tmp_path / "adapter")
    resumed, again = build(name, *overrides, nonzero_b=False)  # other LoRA weights until the load
    again.load_state_dict(load_state(tmp_path))  # before the weights, as the runner does
    Adapters(resumed.model).load(tmp_path / "adapter")
    assert again.stack == method.stack == ["default", "stage1"]
    assert Adapters(resumed.model).active() == ["default", "stage1"]
    np.testing.assert_array_equal(scores(resumed), scores(rec))
    if name == "sdlora":
        assert same({k: p.detach() for k, p in again.magnitudes.items()},
                    {k: p.detach() for k, p in method.magnitudes.items()})
    if name == "inflora":
        assert same(again.bases, method.bases) and again.memory_stages == method.memory_stages
    run_stage(method, rec, 2)
    run_stage(again, resumed, 2)
    np.testing.assert_array_equal(scores(resumed), scores(rec))
    assert same(Adapters(resumed.model).snapshot("stage2"), Adapters(rec.model).snapshot("stage2"))


@pytest.mark.parametrize("bad, match", [(("method.variant=some",), "method.variant='some'"),
                                        (("method.form=sum",), "method.form='sum'")])
def test_bad_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        build("sumlora", *bad)


def test_needs_an_llm_backbone():
    method = METHODS["inflora"](method_cfg("inflora"))
    with pytest.raises(ValueError, match="method=inflora needs an LLM backbone"):
        method.setup(SimpleNamespace(kind="sequential"), PROTOCOL)


# ---- end to end ------------------------------------------------------------------------------------
FIVE_STAGES = ["backbone=tiny_llama", "debug=smoke", "dataset.simulator.num_users=40", "stage=stages",
               "stage.first_share=0.5", "stage.window_shares=[0.1,0.1,0.1,0.1,0.1]", "reuse_base_stage=false",
               "eval.all_splits=false", "eval.validation=false", "eval.n_boot=10", "trainer.max_train_samples=16",
               "trainer.base.max_steps=2", "trainer.update.max_steps=2"]


def run_five(tmp_path, method, extra=(), out=None):
    from recsim.runner import run

    out = out or tmp_path / method
    run(compose([*FIVE_STAGES, f"method={method}", *extra, f"paths.cache_dir={tmp_path / 'cache'}"], out))
    return out


def quality(out):
    df = pd.read_csv(out / "results.csv")
    return df[~df.metric.isin(["update_seconds", "peak_mem_mb"])].reset_index(drop=True)


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("sumlora", ("method.form=directions",)), ("sdlora", ()), ("inflora", ())])
def test_five_stages_end_to_end(tmp_path, method, extra):
    out = run_five(tmp_path, method, extra)
    df = pd.read_csv(out / "results.csv")
    stored = df[df.metric == "adapter_bytes"].set_index("stage").value
    assert list(stored.index) == [1, 2, 3, 4] and stored.is_monotonic_increasing and stored.is_unique
    assert "kl_UI_after_update" not in set(df.metric)  # that figure would not describe a cumulative update
    last = out / "stages" / "04_stage4" / "adapter"
    assert all((last / f"stage{t}" / "adapter_config.json").is_file() for t in range(1, 5))
    assert len(df[(df.eval_mode == "candidates") & (df.stage == 4)]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sdlora", "inflora"])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, method):
    full = run_five(tmp_path, method)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for folder in (cut / "stages").iterdir():
        if int(folder.name[:2]) >= 2:
            shutil.rmtree(folder)
    for name in ("results.csv", "results.md", "DONE"):
        (cut / name).unlink()
    run_five(tmp_path, method, out=cut)
    pd.testing.assert_frame_equal(quality(full), quality(cut))
