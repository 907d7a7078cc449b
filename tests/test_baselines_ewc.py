"""EWC's Fisher: the per-sample empirical Fisher over >= 512 old samples, its fast path equal to the loop."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recsim.backbones import lora as lora_ops
from recsim.methods import ewc as ewc_mod
from recsim.protocols.base import Sample

from conftest import compose
from test_llm_ranker import tiny_ranker

SAMPLES = [Sample(0, (1, 2, 3), 4), Sample(1, (5,), 6), Sample(2, tuple(range(1, 12)), 13),
           Sample(3, (7, 8), 9), Sample(4, (16, 15, 14, 2), 1)]  # unequal lengths: the fast path pads them


def _grads(ranker, sample):
    params = [p for p in ranker.model.parameters() if p.requires_grad]
    out = ranker.answer_logits(ranker.collate([sample]))
    return torch.autograd.grad(F.cross_entropy(out["logits"], out["targets"]), params)


def test_fisher_is_the_mean_of_per_sample_squared_gradients():
    ranker = tiny_ranker()
    lora_ops.set_trainable(ranker.model)
    ranker.eval()
    g1, g2 = _grads(ranker, SAMPLES[0]), _grads(ranker, SAMPLES[1])
    fisher = ewc_mod.diagonal_fisher(ranker, SAMPLES[:2], batch_size=1)
    names = [f"model.{n}" for n, p in ranker.model.named_parameters() if p.requires_grad]
    assert list(fisher) == names  # keyed like LLMRanker.named_parameters(), as EWCPenalty reads them
    for n, a, b in zip(names, g1, g2):
        torch.testing.assert_close(fisher[n], (a**2 + b**2) / 2, atol=1e-8, rtol=1e-5)
    # not the square of the mean gradient, which cancels opposite signs
    n, a, b = names[0], g1[0], g2[0]
    assert not torch.allclose(fisher[n], ((a + b) / 2) ** 2)


@pytest.mark.parametrize("batch_size", [2, 8])
def test_vectorised_fisher_equals_the_loop(batch_size):
    ranker = tiny_ranker()
    lora_ops.set_trainable(ranker.model)
    loop = ewc_mod.diagonal_fisher(ranker, SAMPLES, batch_size=1)
    fast = ewc_mod.diagonal_fisher(ranker, SAMPLES, batch_size=batch_size)
    assert loop.keys() == fast.keys()
    for n in loop:
        torch.testing.assert_close(fast[n], loop[n], atol=1e-6, rtol=0)
    assert any(f.abs().sum() > 0 for f in loop.values())
    assert ranker.training  # the mode is restored after the Fisher's eval-mode passes


def test_fisher_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="fisher_batch_size=0"):
        ewc_mod.diagonal_fisher(tiny_ranker(), SAMPLES, batch_size=0)


def test_ewc_config_defaults_to_512_fisher_samples():
    cfg = compose(["method=ewc"]).method
    assert cfg.fisher_samples == 512 and cfg.fisher_batch_size == 8


@pytest.mark.parametrize("n_users, expected", [(700, 512), (20, 20)])
def test_ewc_uses_512_old_samples_or_all_when_fewer(monkeypatch, n_users, expected):
    seen = {}

    def fake_fisher(module, samples, batch_size):
        seen["samples"], seen["batch_size"] = samples, batch_size
        return {}

    monkeypatch.setattr(ewc_mod, "diagonal_fisher", fake_fisher)
    cfg = compose(["method=ewc", "seed=3"]).method
    method = ewc_mod.EWC(cfg)
    method.protocol = SimpleNamespace(window=5)
    # each user: 3 items, the first two before the window (old targets: position 1), the third new
    seqs = {u: np.array([1, 2, 3]) for u in range(n_users)}
    stage = SimpleNamespace(index=1, sequences=seqs, boundary={u: 2 for u in seqs},
                            cumulative_targets={u: [1, 2] for u in seqs})
    terms = []
    rec = SimpleNamespace(module=torch.nn.Linear(1, 1), set_trainable=lambda *a, **k: 0, add_loss_term=terms.append)
    method.before_update(stage, rec, samples=[])
    assert len(seen["samples"]) == expected and method.report["fisher_samples"] == expected
    assert len({s.user for s in seen["samples"]}) == expected  # a subsample without repeats
    assert all(s.target == 2 and s.position == 1 for s in seen["samples"])  # old targets only
    assert seen["batch_size"] == 8 and len(terms) == 1


def test_ewc_rejects_a_non_positive_fisher_sample_count():
    cfg = compose(["method=ewc", "method.fisher_samples=0"]).method
    method = ewc_mod.EWC(cfg)
    method.protocol = SimpleNamespace(window=5)
    stage = SimpleNamespace(index=1, sequences={}, boundary={}, cumulative_targets={})
    rec = SimpleNamespace(set_trainable=lambda *a, **k: 0)
    with pytest.raises(ValueError, match="fisher_samples=0"):
        method.before_update(stage, rec, samples=[])


def test_fisher_cache_reuses_exactly_this_model_state_and_these_samples(tmp_path, monkeypatch):
    """A λ sweep computes F once: a second EWC on the same model and samples reads it back (no new
    computation, identical F); a changed trainable weight gives a new entry."""
    ranker = tiny_ranker()
    calls = []
    real = ewc_mod.diagonal_fisher
    monkeypatch.setattr(ewc_mod, "diagonal_fisher", lambda *a: calls.append(1) or real(*a))
    seqs = {0: np.array([1, 2, 3, 4]), 1: np.array([5, 6, 7, 8])}
    stage = SimpleNamespace(index=1, sequences=seqs, boundary={0: 3, 1: 3}, cumulative_targets={0: [1, 2, 3], 1: [1, 2, 3]})

    def run_ewc(cache: bool):
        method = ewc_mod.EWC(compose(["method=ewc", f"method.fisher_cache={str(cache).lower()}"]).method)
        method.protocol = SimpleNamespace(window=5)
        terms = []
        rec = SimpleNamespace(module=ranker, cache_dir=tmp_path, base_hash="b", set_trainable=lambda *a, **k: 0,
                              add_loss_term=terms.append)
        method.before_update(stage, rec, samples=[])
        return {id(p): f for p, f, _ in terms[0].terms}, method.report

    first, r1 = run_ewc(True)
    second, r2 = run_ewc(True)
    assert len(calls) == 1 and not r1["fisher_from_cache"] and r2["fisher_from_cache"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    run_ewc(False)
    assert len(calls) == 2  # off: always computed
    with torch.no_grad():
        next(p for p in ranker.parameters() if p.requires_grad).add_(0.1)
    run_ewc(True)
    assert len(calls) == 3 and len(list((tmp_path / "fisher").iterdir())) == 2
