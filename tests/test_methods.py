"""EvoRec's Locate and Update, and the update baselines (EWC, FT-KL, LSAT), on tiny inputs."""

import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from recsim.backbones import lora as lora_ops
from recsim.backbones.lora import layer_of
from recsim.methods.evorec import select_layers
from recsim.methods.ewc import EWCPenalty
from recsim.methods.kl import AnchorKL
from recsim.protocols.base import Sample

from test_llm_ranker import tiny_ranker
from test_run_e2e import TINY, quality, run


def test_locate_picks_the_layers_whose_states_moved():
    torch.manual_seed(0)
    old = torch.randn(4, 5, 8)  # [layers, users, H]
    new = old.clone()
    new[1] = torch.randn(5, 8)  # layers 1 and 3 change for every user, 3 most
    new[3] = -old[3]
    chosen, sims, votes = select_layers(old, new, t=0.5)
    assert chosen == [1, 3]
    assert sims[0] == pytest.approx(1.0) and sims[2] == pytest.approx(1.0) and sims[3] == pytest.approx(-1.0)
    assert select_layers(old, new, t=0.25)[0] == [3]  # ceil(0.25 * 4) = 1 layer: the most moved
    assert select_layers(old, new, t=1.0)[0] == [0, 1, 2, 3]
    assert votes == [0, 0, 0, 5]  # every user's lowest-similarity layer is 3
    assert select_layers(old, new, t=0.5, rule="vote")[0] == [1, 3]  # 3 by votes, then 1 by mean cosine


def test_consistency_kl_is_zero_before_the_first_step_and_off_at_lambda_zero():
    ranker = tiny_ranker()  # LoRA dropout 0.05: the term must still be exactly 0 at the anchor
    ranker.train()
    samples = [Sample(0, (1, 2, 3), 4), Sample(1, (5, 6), 7)]
    term = AnchorKL(lora_ops.snapshot(ranker.model), lam=1.0, samples=samples, batch_size=2)
    assert term(ranker, {}, {})["kl"].item() == 0.0
    with torch.no_grad():  # move the adapter: the KL becomes positive
        for n, p in ranker.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.3)
    assert term(ranker, {}, {})["kl"].item() > 1e-4
    assert AnchorKL(lora_ops.snapshot(ranker.model), lam=0.0, samples=samples)(ranker, {}, {}) == {}


def test_ewc_penalty_by_hand():
    ranker = tiny_ranker()
    lora_ops.set_trainable(ranker.model)
    name, param = next((n, p) for n, p in ranker.named_parameters() if p.requires_grad)
    fisher = {name: torch.full_like(param, 2.0)}
    penalty = EWCPenalty(ranker, fisher, lam=10.0)
    assert penalty(ranker, {}, {})["ewc"].item() == 0.0  # at θ = θ*
    with torch.no_grad():
        param.add_(0.1)
    # (λ/2) Σ F Δ² = 5 · 2 · 0.01 · numel
    assert penalty(ranker, {}, {})["ewc"].item() == pytest.approx(5 * 2 * 0.01 * param.numel(), rel=1e-4)


def lora_by_layer(path):
    state = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    return state


@pytest.mark.slow
def test_evorec_trains_only_located_layers(tmp_path):
    out = tmp_path / "evo"
    run(TINY + ["method=evorec", "method.t=0.5", "method.filters.sasrec.epochs=2"], out)
    eff = json.loads((out / "stages" / "01_update1" / "efficiency.json").read_text())
    located = set(eff["located_layers"])
    assert len(located) == 2 and len(eff["layer_cosine"]) == 4  # ceil(0.5 * 4 layers)
    before = lora_by_layer(out / "stages" / "00_base")
    after = lora_by_layer(out / "stages" / "01_update1")
    moved = {layer_of(k) for k in before if not torch.equal(before[k], after[k])}
    assert moved == located
    assert eff["forgotten_items"] > 0 and eff["changed_params"] == eff["trainable_params"]


@pytest.mark.slow
def test_evorec_without_its_parts_is_plain_finetuning(tmp_path):
    """t = 1, K = 0, λ = 0 leaves nothing of EvoRec: the update must equal `finetune` exactly."""
    a, b = tmp_path / "evo", tmp_path / "ft"
    run(TINY + ["method=evorec", "method.t=1", "method.k=0", "method.lam=0"], a)
    run(TINY + ["method=finetune"], b)
    qa, qb = quality(a), quality(b)
    pd.testing.assert_frame_equal(qa.drop(columns="method"), qb.drop(columns="method"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ewc", "ftkl", "lsat", "evorec"])
def test_update_baselines_end_to_end(tmp_path, method):
    extra = ["method.filters.sasrec.epochs=2"] if method == "evorec" else []
    out = tmp_path / method
    run(TINY + [f"method={method}"] + extra, out)
    df = pd.read_csv(out / "results.csv")
    assert set(df[df.eval_mode == "candidates"].group) == {"U_A", "U_I", "all"}
    assert df[(df.metric == "changed_params") & (df.stage == 1)].value.iloc[0] > 0
    if method == "lsat":  # both adapters are saved in peft's format
        assert (out / "stages" / "01_update1" / "adapter" / "short" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_evorec_update_is_the_same_with_l_c_prepared_once(tmp_path):
    """method.kl.cache_frozen=true (frozen log-probs stored, blocks below the located ones run once per sample)
    trains the same adapter as the per-step reference passes (false), up to float round-off."""
    args = TINY + ["method=evorec", "method.t=0.5", "method.filters.sasrec.epochs=2", "method.kl_samples=32",
                   "method.lam=0.01"]  # a λ at which L_c moves the weights (sum over ~2,000 positions)
    adapters = {}
    for cache in ("true", "false"):
        out = tmp_path / cache
        run(args + [f"method.kl.cache_frozen={cache}"], out)
        eff = json.loads((out / "stages" / "01_update1" / "efficiency.json").read_text())
        assert ("kl_pool" in eff) == (cache == "true")
        if cache == "true":
            assert eff["kl_pool"]["frozen_stored"] and eff["kl_pool"]["split_layer"] == min(eff["located_layers"]) > 0
        adapters[cache] = lora_by_layer(out / "stages" / "01_update1")
    base = lora_by_layer(tmp_path / "true" / "stages" / "00_base")
    assert any(not torch.equal(base[k], v) for k, v in adapters["false"].items())
    for k, v in adapters["false"].items():
        torch.testing.assert_close(adapters["true"][k], v, rtol=0, atol=1e-5)
