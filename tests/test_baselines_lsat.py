"""LSAT on tiny_llama: the long-term adapter as the authors' code trains it, the fusion weight chosen on
validation, and its ensemble and merge in both inference modes (candidate scoring and list generation)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from recsim.backbones import lora as lora_ops
from recsim.methods.lsat import LSAT, SHORT
from recsim.protocols.base import EvalSplit, Sample

from conftest import compose
from test_llm_ranker import tiny_ranker

SAMPLES = [Sample(0, (1, 2, 3), 4, position=3), Sample(1, (5,), 6, position=1), Sample(2, tuple(range(1, 12)), 13, 11)]
CANDS = np.array([[4, 7, 9, 2], [6, 1, 2, 16], [13, 16, 3, 11]])
GEN = OmegaConf.create({"list_length": 3, "separator": "||", "max_new_tokens": 6, "max_title_words": 3})


class Rec:
    """The slice of LLMRecommender that LSAT uses, around the tiny ranker."""

    kind = "llm"

    def __init__(self):
        self.module = tiny_ranker()
        self.initial = lora_ops.snapshot(self.model)
        self.schedules = {0: OmegaConf.create({"lr": 1.0, "epochs": 5}), 1: OmegaConf.create({"lr": 2.0, "epochs": 7})}

    @property
    def model(self):
        return self.module.model

    def schedule(self, i, validated=True):
        return self.schedules[min(i, 1)], 4

    def score_candidates(self, samples, cands, bs):
        return self.module.score_candidates(samples, cands, bs)

    def set_trainable(self, layers=None, adapter="default"):
        return lora_ops.set_trainable(self.model, layers, adapter)

    def reset_to_initial(self):
        lora_ops.load_snapshot(self.model, self.initial)

    def clear_loss_terms(self):
        pass


def lsat(overrides=(), weight=None):
    cfg = compose(["method=lsat", "backbone=tiny_llama"] + list(overrides)).method
    rec, method = Rec(), LSAT(cfg)
    method.setup(rec, SimpleNamespace(window=10, valid_splits={}))
    torch.manual_seed(2)  # a fresh short-term LoRA is the identity (B = 0): make it differ from the long one
    with torch.no_grad():
        for n, p in lora_ops.lora_parameters(rec.model, SHORT).items():
            p.normal_(std=0.3)
    if weight is not None:
        method.short_ready, method.weight = True, weight
    return rec, method


def adapter_scores(rec, adapter):
    rec.model.set_adapter(adapter)
    try:
        return rec.score_candidates(SAMPLES, CANDS, 2)
    finally:
        rec.model.set_adapter("default")


def test_config_follows_the_authors_code():
    cfg = compose(["method=lsat"]).method
    assert cfg.long_term == "retrain" and list(cfg.weight_grid) == [0, 0.25, 0.5, 0.75, 1]
    assert cfg.select_metric == "NDCG@10" and cfg.combine == "ensemble"


def test_ensemble_scores_are_the_weighted_sum_of_two_separate_scorings():
    rec, method = lsat(weight=0.25)
    long, short = adapter_scores(rec, "default"), adapter_scores(rec, SHORT)
    assert not np.allclose(long, short)
    np.testing.assert_allclose(method.score_candidates(rec, SAMPLES, CANDS, 2), 0.25 * long + 0.75 * short, atol=1e-10)
    assert rec.model.active_adapter == "default"


def test_merge_scores_with_a_and_b_averaged_into_the_default_adapter():
    rec, method = lsat(["method.combine=merge"], weight=0.5)
    merged = method.score_candidates(rec, SAMPLES, CANDS, 2)
    long, short = lora_ops.lora_parameters(rec.model, "default"), lora_ops.lora_parameters(rec.model, SHORT)
    averaged = {n: (p.detach() + short[n.replace(".default.", f".{SHORT}.")].detach()) / 2 for n, p in long.items()}
    lora_ops.load_snapshot(rec.model, averaged)
    np.testing.assert_allclose(merged, adapter_scores(rec, "default"), atol=1e-5)


def reference_greedy(ranker, ids, mask, n, weights):
    """No cache: every step re-runs each adapter on the whole sequence; greedy on Σ w·log p."""
    eos, pad = ranker.tok.eos_token_id, ranker.tok.pad_token_id
    done = torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(n):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logp = 0
        for name, w in weights.items():
            ranker.model.set_adapter(name)
            logits = ranker.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
            logp = logp + w * torch.log_softmax(logits, -1)
        ranker.model.set_adapter("default")
        nxt = torch.where(done, torch.full_like(done, pad, dtype=torch.long), logp.argmax(-1))
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        done = done | (nxt == eos)
        if done.all():
            break
    return ids


def prompts(ranker):
    return ranker._left_pad([ranker.prompt_ids(s.history) for s in SAMPLES])  # unequal lengths: left padding


def test_ensemble_greedy_decoding_equals_a_reference_loop():
    rec, _ = lsat()
    ranker = rec.module
    ranker.eval()
    ids, mask = prompts(ranker)
    weights = {"default": 0.3, SHORT: 0.7}
    fast = ranker.ensemble_generate(ids, mask, 6, weights)
    torch.testing.assert_close(fast, reference_greedy(ranker, ids, mask, 6, weights), rtol=0, atol=0)
    assert rec.model.active_adapter == "default"
    # w = 1 is the long-term adapter's own greedy decoding
    plain = ranker.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                  pad_token_id=ranker.tok.pad_token_id)
    torch.testing.assert_close(ranker.ensemble_generate(ids, mask, 6, {"default": 1.0, SHORT: 0.0}), plain)
    assert not torch.equal(fast, plain)  # the short-term adapter changes what is written


def generated_texts(monkeypatch, ranker, fn):
    texts, decode = [], ranker.tok.decode
    monkeypatch.setattr(ranker.tok, "decode", lambda *a, **k: texts.append(decode(*a, **k)) or texts[-1])
    ranks, stats = fn()
    monkeypatch.setattr(ranker.tok, "decode", decode)
    return texts, ranks, stats


def test_generation_mode_goes_through_the_ensemble(monkeypatch):
    rec, method = lsat(weight=0.3)
    ranker = rec.module
    got = generated_texts(monkeypatch, ranker, lambda: method.generate_rankings(rec, SAMPLES, CANDS, GEN, 0, 2))
    ref = generated_texts(monkeypatch, ranker, lambda: ranker.generate_rankings(
        SAMPLES, CANDS, GEN, 0, 2,
        generate=lambda ids, mask, n: reference_greedy(ranker, ids, mask, n, {"default": 0.3, SHORT: 0.7})))
    long_only = generated_texts(monkeypatch, ranker, lambda: ranker.generate_rankings(SAMPLES, CANDS, GEN, 0, 2))
    assert got[0] == ref[0] and got[0] != long_only[0]
    np.testing.assert_array_equal(got[1], ref[1])
    assert got[2] == ref[2]


def test_generation_mode_goes_through_the_merge(monkeypatch):
    rec, method = lsat(["method.combine=merge"], weight=0.5)
    ranker = rec.module
    got = generated_texts(monkeypatch, ranker, lambda: method.generate_rankings(rec, SAMPLES, CANDS, GEN, 0, 2))
    before = generated_texts(monkeypatch, ranker, lambda: ranker.generate_rankings(SAMPLES, CANDS, GEN, 0, 2))
    long, short = lora_ops.lora_parameters(rec.model, "default"), lora_ops.lora_parameters(rec.model, SHORT)
    averaged = {n: (p.detach() + short[n.replace(".default.", f".{SHORT}.")].detach()) / 2 for n, p in long.items()}
    lora_ops.load_snapshot(rec.model, averaged)
    ref = generated_texts(monkeypatch, ranker, lambda: ranker.generate_rankings(SAMPLES, CANDS, GEN, 0, 2))
    assert got[0] == ref[0] and got[0] != before[0]
    np.testing.assert_array_equal(got[1], ref[1])


def test_before_the_first_update_inference_is_the_long_term_adapter_alone():
    rec, method = lsat()
    np.testing.assert_array_equal(method.score_candidates(rec, SAMPLES, CANDS, 2), adapter_scores(rec, "default"))


def valid_split():
    # 2 users, 3 candidates each (positive in column 0); scores are stubbed below
    samples = {"U_A": [Sample(0, (1,), 2, 1)], "U_I": [Sample(1, (3,), 4, 1)]}
    return EvalSplit("s1_valid", samples, {"U_A": np.array([[2, 5, 6]]), "U_I": np.array([[4, 7, 8]])}, role="valid")


def test_weight_is_chosen_on_validation_by_hand(monkeypatch):
    rec, method = lsat()
    method.protocol = SimpleNamespace(window=10, valid_splits={"s1": valid_split()})
    # user 0: long ranks the positive first, short second; user 1 the other way round
    stub = {0: (np.array([[2.0, 0.0, -1.0]]), np.array([[0.0, 1.0, -1.0]])),
            1: (np.array([[0.0, 1.0, -1.0]]), np.array([[2.0, 0.0, -1.0]]))}
    monkeypatch.setattr(method, "_adapter_scores", lambda rec, samples, cands: stub[samples[0].user])
    w = method.select_weight(SimpleNamespace(index=1, eval_split="s1"), rec)
    # w=0.5: both positives first (NDCG@10 = 1); w in {0, .25, .75, 1}: one user at rank 1 (1/log2 3)
    assert w == 0.5
    miss = (1 + 1 / np.log2(3)) / 2
    values = method.report["lsat_valid_NDCG@10"]
    assert values == pytest.approx({"0.0": miss, "0.25": miss, "0.5": 1.0, "0.75": miss, "1.0": miss})
    assert method.report["lsat_weight"] == 0.5
    method.weight, method.short_ready = w, True
    state = method.state_dict()
    assert json.loads(json.dumps(state)) == {"short_ready": True, "weight": 0.5}  # plain JSON-able values


def test_weight_ties_keep_the_first_of_the_grid(monkeypatch):
    rec, method = lsat(["method.weight_grid=[0.75,0.25]"])
    method.protocol = SimpleNamespace(window=10, valid_splits={"s1": valid_split()})
    same = (np.array([[1.0, 0.0, 0.0]]), np.array([[1.0, 0.0, 0.0]]))
    monkeypatch.setattr(method, "_adapter_scores", lambda rec, samples, cands: same)
    assert method.select_weight(SimpleNamespace(index=1, eval_split="s1"), rec) == 0.75


def test_weight_selection_needs_a_validation_split():
    rec, method = lsat()
    with pytest.raises(ValueError, match="no.*weight_grid"):
        method.select_weight(SimpleNamespace(index=1, eval_split="s1"), rec)
    rec, method = lsat(["method.weight_grid=[0.5]"])
    assert method.select_weight(SimpleNamespace(index=1, eval_split="s1"), rec) == 0.5


@pytest.mark.parametrize("bad, match", [("method.long_term=keep", "long_term='keep'"),
                                        ("method.weight_grid=[0.5,2]", "weight_grid"),
                                        ("method.select_metric=AUC", "select_metric='AUC'")])
def test_bad_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        lsat([bad])


def stage1():
    seqs = {0: np.array([1, 2, 3, 4]), 1: np.array([5, 6, 7])}
    return SimpleNamespace(index=1, sequences=seqs, cumulative_targets={0: [1, 2, 3], 1: [1, 2]}, eval_split="s1")


@pytest.mark.parametrize("mode", ["retrain", "continue"])
def test_long_term_adapter_retrains_from_scratch_or_continues(mode):
    rec, method = lsat([f"method.long_term={mode}", "method.long_epochs=3", "method.long_samples=null"])
    with torch.no_grad():  # the long-term adapter has been trained: it is no longer the initial one
        for p in lora_ops.lora_parameters(rec.model, "default").values():
            p.add_(0.1)
    trained = lora_ops.snapshot(rec.model)
    calls = []
    method.train_fn = lambda samples, optim, tag: calls.append((samples, optim, tag, lora_ops.snapshot(rec.model)))
    method.before_update(stage1(), rec, samples=[])
    (samples, optim, tag, at_start), = calls
    assert tag == "long_term" and len(samples) == 5  # every target up to the stage
    start = rec.initial if mode == "retrain" else trained
    assert all(torch.equal(at_start[n], start[n]) for n in start)
    if mode == "retrain":  # stage 0's schedule, as the authors' full retraining
        assert optim.lr == 1.0 and optim.epochs == 5
    else:
        assert optim.lr == 2.0 and optim.epochs == 3
    assert rec.model.active_adapter == SHORT
    assert all(p.requires_grad == (f".{SHORT}." in n) for n, p in rec.model.named_parameters() if "lora_" in n)
