"""The LLM recommender on the tiny random Llama: scoring, training, adapters (numbers are not an LLM's)."""

import contextlib
import os

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from recsim.backbones import lora as lora_ops
from recsim.backbones.llm import load_base_model, load_tokenizer
from recsim.models import llm_ranker as llm_ranker_module
from recsim.models.llm_ranker import LLMRanker, fp32_logits
from recsim.protocols.base import Sample

from conftest import REPO

CACHE = os.environ["RECSIM_CACHE"]
PROMPT = OmegaConf.create({"template": "History:\n{history}\nNext:", "max_history": 10, "max_title_words": 8,
                           "max_prompt_tokens": 512})
OPTIM = OmegaConf.create({"lr": 1e-2, "weight_decay": 0.0})
TITLES = ["<pad>"] + [f"Velvet {c} Lipstick number {i}" + " extra" * (i % 3)
                      for i, c in enumerate(["Rose", "Plum", "Coral", "Nude", "Ruby", "Berry", "Peach", "Wine"] * 2, 1)]


def tiny_ranker(normalize="mean", seed=0, nonzero_b=True, kernel=None):
    cfg = OmegaConf.load(REPO / "recsim/conf/backbone/tiny_llama.yaml")
    model = lora_ops.add_lora(load_base_model(cfg, CACHE, seed=seed), cfg.lora)
    if nonzero_b:  # a fresh LoRA is the identity (B = 0); make the adapters matter for the checks
        torch.manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.2)
    scoring = OmegaConf.create({"normalize": normalize, "max_title_words": None, "max_answer_tokens": 32})
    if kernel is not None:  # None: the key absent, as in configs written before it (packed)
        scoring.kernel = kernel
    return LLMRanker(model, load_tokenizer(cfg, CACHE), TITLES, PROMPT, scoring, OPTIM)


def naive_scores(ranker, samples, cands, normalize):
    """Reference: one teacher-forced pass of prompt+candidate per (sample, candidate)."""
    ranker.eval()
    out = np.zeros(cands.shape)
    with torch.no_grad():
        for i, s in enumerate(samples):
            for j, c in enumerate(cands[i]):
                res = ranker.answer_logits(ranker.collate([Sample(s.user, s.history, int(c))]))
                lp = torch.log_softmax(res["logits"], -1).gather(-1, res["targets"][:, None])[:, 0].double()
                out[i, j] = (lp.mean() if normalize == "mean" else lp.sum()).item()
    return out


# prompts of 18 to 135 tokens, answers of 9 to 12 tokens (EOS included)
SAMPLES = [Sample(0, (1, 2, 3), 4), Sample(1, (5,), 6), Sample(2, tuple(range(1, 15)), 15), Sample(3, (8, 2), 9),
           Sample(4, (16, 3, 12, 7, 1), 10)]
CANDS = np.array([[4, 7, 9, 2], [6, 1, 2, 16], [15, 16, 3, 11], [9, 9, 14, 5], [10, 12, 3, 8]])


@pytest.mark.parametrize("kernel", [None, "packed", "kv_repeat"])
@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_shared_prompt_scoring_equals_one_pass_per_candidate(normalize, kernel):
    ranker = tiny_ranker(normalize, kernel=kernel)
    fast = ranker.score_candidates(SAMPLES, CANDS, batch_size=3)  # batches of unequal prompt lengths
    assert fast.shape == CANDS.shape and fast.dtype == np.float64
    # kv_repeat sums the token log-probs in fp32: a sum of ~130 is good to 1 ulp = 1.5e-5, hence its rtol
    rtol = 2.5e-7 if kernel == "kv_repeat" and normalize == "sum" else 0
    np.testing.assert_allclose(fast, naive_scores(ranker, SAMPLES, CANDS, normalize), rtol=rtol, atol=1e-5)


def test_unknown_kernel_is_named():
    ranker = tiny_ranker(kernel="bogus")
    with pytest.raises(ValueError, match="scoring.kernel='bogus': expected one of packed, kv_repeat"):
        ranker.score_candidates(SAMPLES[:1], CANDS[:1])


def test_packed_candidates_do_not_see_each_other(monkeypatch):
    """Item 9 third among other candidates scores the same whatever the others are (and however many); a mask
    that let packed candidates see each other (plain causal over the whole packed row) changes it."""
    ranker = tiny_ranker(kernel="packed")
    samples = [Sample(0, (1, 2, 3), 4), Sample(1, tuple(range(1, 12)), 5)]
    first = ranker.score_candidates(samples, np.array([[4, 7, 9, 2], [6, 1, 9, 16]]))
    other = ranker.score_candidates(samples, np.array([[13, 1, 9, 16, 5, 12], [3, 14, 9, 11, 2, 8]]))
    np.testing.assert_allclose(first[:, 2], other[:, 2], rtol=0, atol=1e-6)
    alone = ranker.score_candidates(samples, np.array([[9], [9]]))
    np.testing.assert_allclose(first[:, 2], alone[:, 0], rtol=0, atol=1e-6)

    def leaky(seg):  # the control: causal over prompt and every earlier candidate, padding excluded
        L = seg.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        return ((causal & (seg[:, None, :] >= 0)) | torch.eye(L, dtype=torch.bool))[:, None]

    monkeypatch.setattr(ranker, "_packed_mask", leaky)
    leaked = ranker.score_candidates(samples, np.array([[13, 1, 9, 16, 5, 12], [3, 14, 9, 11, 2, 8]]))
    assert np.abs(leaked[:, 2] - first[:, 2]).min() > 1e-4


def test_packed_scores_under_bf16_autocast_stay_close_to_fp32():
    ranker = tiny_ranker(kernel="packed")
    ref = naive_scores(ranker, SAMPLES, CANDS, "mean")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ranker.score_candidates(SAMPLES, CANDS, batch_size=3)
    assert np.isfinite(low).all()
    np.testing.assert_allclose(low, ref, rtol=0, atol=1e-2)


@pytest.mark.parametrize("kernel", ["packed", "kv_repeat"])
def test_scoring_autocast_option_runs_the_decoder_in_bf16(kernel):
    """scoring.autocast=true: the decoder's pass in bf16 (the scores move, within 1e-2); auto on CPU: fp32."""
    ranker = tiny_ranker(kernel=kernel)
    ref = naive_scores(ranker, SAMPLES, CANDS, "mean")
    np.testing.assert_allclose(ranker.score_candidates(SAMPLES, CANDS, batch_size=3), ref, rtol=0, atol=1e-5)
    ranker.scoring_cfg.autocast = True
    low = ranker.score_candidates(SAMPLES, CANDS, batch_size=3)
    assert np.abs(low - ref).max() > 1e-5  # bf16 did run
    np.testing.assert_allclose(low, ref, rtol=0, atol=1e-2)


def test_lora_inputs_stay_bf16_under_autocast_and_nothing_moves(monkeypatch):
    """Under autocast peft's cast of a LoRA input to the adapter's fp32 is off (autocast casts it back to bf16 for
    the matmul): lora_A sees the bf16 activation, and scores and training logits are bit-identical to a pass
    with the cast on. Outside the pass the flag is restored; without autocast the cast stays on."""
    ranker = tiny_ranker(kernel="packed")
    for name, p in ranker.model.named_parameters():  # as on a GPU: a bf16 base (its residual stream bf16), fp32 LoRA
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    ranker.scoring_cfg.autocast = True
    lora_a = next(m for n, m in ranker.model.named_modules() if n.endswith("q_proj.lora_A.default"))
    seen = []
    lora_a.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    batch = ranker.collate(SAMPLES)

    def passes():
        seen.clear()
        scores = ranker.score_candidates(SAMPLES, CANDS, batch_size=3)
        ranker.eval()  # LoRA dropout off: in training it draws its mask on the bf16 tensor (same law, other bits)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            logits = ranker.answer_logits(batch)["logits"]  # the training pass's path (_decode)
        return scores, logits, set(seen)

    fast, fast_logits, fast_dtypes = passes()
    assert fast_dtypes == {torch.bfloat16}
    assert all(m.cast_input_dtype_enabled for m in ranker.model.modules() if hasattr(m, "cast_input_dtype_enabled"))
    # the control: peft's cast left on (the code before this change)
    monkeypatch.setattr(llm_ranker_module, "no_lora_input_casts", lambda layers, active: contextlib.nullcontext())
    ref, ref_logits, ref_dtypes = passes()
    assert ref_dtypes == {torch.float32}
    np.testing.assert_array_equal(fast, ref)
    assert torch.equal(fast_logits, ref_logits)
    monkeypatch.undo()
    seen.clear()
    ranker.scoring_cfg.autocast = False
    ranker.score_candidates(SAMPLES[:1], CANDS[:1])
    assert set(seen) == {torch.float32}  # no autocast: the bf16 input is cast for the fp32 adapter, as it must be


def test_packed_width_padded_to_a_multiple_keeps_the_scores():
    """scoring.pad_to_multiple_of: the packed rows are padded to a multiple of N columns (fewer distinct shapes
    on a GPU); padding is segment -1, so the scores do not move. auto = no padding on CPU."""
    ranker = tiny_ranker(kernel="packed")
    widths = []
    ranker.base.get_decoder().register_forward_pre_hook(lambda m, args, kw: widths.append(kw["input_ids"].shape[1]),
                                                        with_kwargs=True)
    plain = ranker.score_candidates(SAMPLES, CANDS, batch_size=3)
    assert any(w % 64 for w in widths)  # auto on CPU: the rows' own width
    widths.clear()
    ranker.scoring_cfg.pad_to_multiple_of = 64
    padded = ranker.score_candidates(SAMPLES, CANDS, batch_size=3)
    assert widths and all(w % 64 == 0 for w in widths)
    np.testing.assert_allclose(padded, plain, rtol=0, atol=1e-6)


def test_fp32_scoring_of_a_bf16_base_equals_one_fp32_pass_per_candidate_and_restores_it():
    """scoring.fp32: a bf16 base is scored in fp32 (its weights upcast for the pass: exact) with autocast off, so
    the scores equal the one-pass-per-candidate reference of the same (bf16-valued) weights in fp32; the base
    is bf16 again afterwards, bit for bit. Without it the bf16 pass is off by far more than 1e-5."""
    ranker = tiny_ranker(kernel="packed")
    for name, p in ranker.model.named_parameters():  # bf16-valued weights, kept in fp32 for the reference
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16).float()
    ref = naive_scores(ranker, SAMPLES, CANDS, "mean")
    for name, p in ranker.model.named_parameters():  # now a bf16 base, as on a GPU
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in ranker.model.named_parameters()}
    ranker.scoring_cfg.autocast = True  # fp32 overrides it
    assert np.abs(ranker.score_candidates(SAMPLES, CANDS, batch_size=3) - ref).max() > 1e-4
    ranker.scoring_cfg.fp32 = True
    exact = ranker.score_candidates(SAMPLES, CANDS, batch_size=3)
    np.testing.assert_allclose(exact, ref, rtol=0, atol=1e-5)
    after = dict(ranker.model.named_parameters())
    assert all(after[n].dtype == v.dtype and torch.equal(after[n], v) for n, v in before.items())


@pytest.mark.slow  # inductor compiles the decoder on CPU: ~90 s
def test_compiled_scoring_pass_keeps_the_scores_and_leaves_training_eager():
    """scoring.compile: the packed pass runs a torch.compile'd view of the decoder (batches of several widths:
    dynamic shapes), with the eager pass's scores; the module's own decoder is not compiled in place."""
    ranker = tiny_ranker(kernel="packed")
    eager = ranker.score_candidates(SAMPLES, CANDS, batch_size=3)
    torch._dynamo.reset()
    ranker.scoring_cfg.compile = True
    compiled = ranker.score_candidates(SAMPLES, CANDS, batch_size=3)  # two passes of different widths
    np.testing.assert_allclose(compiled, eager, rtol=0, atol=1e-5)
    view = ranker._scoring_view[1]
    assert view is not ranker.base.get_decoder() and view._orig_mod is ranker.base.get_decoder()
    assert getattr(ranker.base.get_decoder(), "_compiled_call_impl", None) is None  # training's decoder: eager
    assert not any("_orig_mod" in k for k in ranker.state_dict())
    again = ranker.score_candidates(SAMPLES[:2], CANDS[:2], batch_size=2)  # the cached view, another shape
    np.testing.assert_allclose(again, eager[:2], rtol=0, atol=1e-5)


def test_fp32_logits_on_cpu_is_the_fp32_gemm():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=True).to(torch.bfloat16)
    h = torch.randn(7, 16, dtype=torch.bfloat16)
    out = fp32_logits(head, h)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.nn.functional.linear(h.float(), head.weight.float(), head.bias.float()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.mm(out_dtype=) is CUDA-only")
def test_fp32_logits_bf16_gemm_on_cuda_matches_the_fp32_gemm():
    torch.manual_seed(0)
    head = torch.nn.Linear(576, 4096, bias=False).to("cuda", torch.bfloat16)
    h = torch.randn(300, 576, device="cuda", dtype=torch.bfloat16)
    out = fp32_logits(head, h)
    ref = h.double() @ head.weight.double().t()  # exact products, float64 sums
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


def test_packed_kernel_with_eager_attention():
    """Eager attention adds the mask to the scores: the packed kernel hands it an additive float mask."""
    ranker = tiny_ranker("sum", kernel="packed")
    ref = naive_scores(ranker, SAMPLES, CANDS, "sum")
    ranker.base.set_attn_implementation("eager")
    np.testing.assert_allclose(ranker.score_candidates(SAMPLES, CANDS, batch_size=3), ref, rtol=0, atol=1e-5)


def _smollm2_users(monkeypatch, n_users=100):
    """SmolLM2 (skipped when absent) and `n_users` synthetic users: history -> last item, 1 + 29 candidates."""
    from recsim.data.synthetic import simulate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = OmegaConf.load(REPO / "recsim/conf/backbone/smollm2_135m.yaml")
    try:
        model = lora_ops.add_lora(load_base_model(cfg, CACHE), cfg.lora)
    except Exception as exc:  # the wheel or its GGUF file is absent on this machine
        pytest.skip(f"SmolLM2 backbone not available: {exc}")
    data = simulate(num_users=n_users, num_items=120, num_categories=6, interests_per_user=2, drift_share=0.5,
                    drift_time=0.7, active_share_after=0.6, min_len=8, max_len=20, seed=0)
    titles = ["<pad>", *data.items["title"]]
    index = {item: i for i, item in enumerate(data.items["item_id"], 1)}
    rng = np.random.default_rng(0)
    samples, cands = [], []
    for user, rows in data.interactions.sort_values("timestamp", kind="stable").groupby("user_id", sort=True):
        seq = [index[i] for i in rows["item_id"]]
        samples.append(Sample(len(samples), tuple(seq[:-1]), seq[-1]))
        cands.append([seq[-1], *rng.choice(np.setdiff1d(np.arange(1, len(titles)), seq), 29, replace=False)])
    cands = np.array(cands)
    assert cands.shape == (n_users, 30)
    prompt = OmegaConf.merge(PROMPT, {"max_history": 5})
    scoring = OmegaConf.create({"normalize": "mean", "max_title_words": None, "max_answer_tokens": 32,
                                "kernel": "packed"})
    return LLMRanker(model, load_tokenizer(cfg, CACHE), titles, prompt, scoring, OPTIM), samples, cands


def _top10(scores):
    return np.argsort(-scores, axis=1, kind="stable")[:, :10]


@pytest.mark.slow
def test_smollm2_packed_equals_kv_repeat(monkeypatch):
    """The pretrained backbone (30 layers, real attention patterns), 32 users of 1 + 29 candidates, fp32.
    (bf16 is not tested here: on CPU its autocast is ~8x slower than fp32, and SmolLM2's bf16 error is the
    size of its top-10 score gaps with either kernel; docs/MEASURED.md has the measurement.)"""
    ranker, samples, cands = _smollm2_users(monkeypatch, n_users=32)
    packed = ranker.score_candidates(samples, cands, batch_size=8)
    ranker.scoring_cfg.kernel = "kv_repeat"
    reference = ranker.score_candidates(samples, cands, batch_size=8)
    np.testing.assert_allclose(packed, reference, rtol=0, atol=1e-4)
    assert (_top10(packed) == _top10(reference)).all(1).mean() >= 0.99


def test_answer_tokens_end_with_eos_and_labels_mask_prompt():
    ranker = tiny_ranker()
    batch = ranker.collate([Sample(0, (1, 2), 3), Sample(0, (1,), 2)])
    eos = ranker.tok.eos_token_id
    for row, labels in zip(batch["input_ids"], batch["labels"]):
        kept = labels[labels != -100].tolist()
        assert kept[-1] == eos and row[-len(kept):].tolist() == kept
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_training_step_changes_only_lora_and_lowers_nll():
    ranker = tiny_ranker(nonzero_b=False)
    lora_ops.set_trainable(ranker.model)
    before = {n: p.detach().clone() for n, p in ranker.model.named_parameters()}
    samples = [Sample(0, (1, 2, 3), 4)] * 8
    batch = ranker.collate(samples)
    nll_before = torch.nn.functional.cross_entropy(**_ce(ranker, batch)).item()
    trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ranker, DataLoader(samples, batch_size=8, collate_fn=ranker.collate))
    nll_after = torch.nn.functional.cross_entropy(**_ce(ranker, batch)).item()
    assert nll_after < nll_before - 0.5
    changed = {n for n, p in ranker.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_pad_to_multiple_of_widens_batches_without_changing_the_loss():
    ranker = tiny_ranker()
    ranker.eval()  # LoRA dropout off: the two passes must see the same network
    samples = [Sample(0, (1, 2, 3), 4), Sample(0, (5,), 6)]
    plain = ranker.collate(samples)
    ranker.pad_to_multiple_of = 16
    padded = ranker.collate(samples)
    width = plain["input_ids"].shape[1]
    assert width % 16 and padded["input_ids"].shape[1] == -(-width // 16) * 16  # rounded up, never down
    assert torch.equal(padded["input_ids"][:, -width:], plain["input_ids"])  # left padding: extra pads in front
    assert int(padded["attention_mask"].sum()) == int(plain["attention_mask"].sum())
    a, b = _ce(ranker, plain), _ce(ranker, padded)
    assert torch.nn.functional.cross_entropy(**a).item() == pytest.approx(torch.nn.functional.cross_entropy(**b).item(), abs=1e-5)


def test_answer_indices_from_collate_pick_the_same_states_as_the_label_mask():
    """collate's host-side answer indices (no device sync) select exactly what the labels' mask selects,
    in the same order, with and without extra padding."""
    ranker = tiny_ranker()
    ranker.eval()
    samples = [Sample(0, (1, 2, 3), 4), Sample(0, (5,), 6), Sample(0, (7, 8), 9)]
    for pad in (None, 8):
        ranker.pad_to_multiple_of = pad
        batch = ranker.collate(samples)
        masked = {k: v for k, v in batch.items() if k not in ("answer_row", "answer_col")}
        with torch.no_grad():
            fast, ref = ranker.answer_logits(batch), ranker.answer_logits(masked)
        assert len(batch["answer_row"]) == sum(len(ranker.answer_ids(s.target)) for s in samples)
        for key in ("logits", "targets", "row"):
            assert torch.equal(fast[key], ref[key]), key


def test_compile_targets_are_the_decoder_blocks_the_ranker_calls():
    """The ranker calls the decoder itself (never the peft model's forward): compiling `model` compiled nothing
    that ran. `trainer.compile` must compile the blocks, in place (state-dict names unchanged)."""
    from recsim.training import CompileModel

    ranker = tiny_ranker()
    names = list(ranker.state_dict())
    blocks = ranker.compile_targets()
    assert blocks == list(ranker.base.get_decoder().layers) and len(blocks) == 4
    CompileModel().setup(None, ranker, "fit")
    assert all(b._compiled_call_impl is not None for b in blocks) and list(ranker.state_dict()) == names


def _ce(ranker, batch):
    with torch.no_grad():
        out = ranker.answer_logits(batch)
    return {"input": out["logits"], "target": out["targets"]}


def test_set_trainable_layers_only():
    ranker = tiny_ranker()
    n = lora_ops.set_trainable(ranker.model, layers={1, 3})
    train = [name for name, p in ranker.model.named_parameters() if p.requires_grad]
    assert train and all(lora_ops.layer_of(x) in {1, 3} and "lora_" in x for x in train)
    assert n == sum(p.numel() for p in ranker.model.parameters() if p.requires_grad)
    assert {lora_ops.layer_of(x) for x in train} == {1, 3}


def test_with_params_runs_other_lora_weights_and_keeps_backward_valid():
    ranker = tiny_ranker()
    anchor = {k: torch.zeros_like(v) for k, v in lora_ops.snapshot(ranker.model).items()}
    before = lora_ops.snapshot(ranker.model)
    samples, cands = [Sample(0, (1, 2), 3)], np.array([[3, 4, 5]])
    inside = ranker.with_params(anchor, ranker.score_candidates, samples, cands)
    with ranker.model.disable_adapter():
        plain = ranker.score_candidates(samples, cands)
    np.testing.assert_allclose(inside, plain, atol=1e-5)  # zero LoRA == no adapter
    assert not np.allclose(inside, ranker.score_candidates(samples, cands))  # ... and the real adapter differs
    assert all(torch.equal(before[k], v) for k, v in lora_ops.snapshot(ranker.model).items())
    # an anchor pass between forward and backward must not invalidate the saved tensors
    lora_ops.set_trainable(ranker.model)
    batch = ranker.collate(samples)
    out = ranker.answer_logits(batch)
    with torch.no_grad():
        ref = ranker.with_params(anchor, ranker.answer_logits, batch)
    (out["logits"] - ref["logits"]).pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ranker.model.parameters())


def test_layer_states_shapes_and_mean_pooling_ignores_padding():
    ranker = tiny_ranker()
    alone = ranker.layer_states([(1, 2)], pooling="mean")
    with_long = ranker.layer_states([(1, 2), tuple(range(1, 12))], pooling="mean")
    assert alone.shape == (4, 1, 32) and with_long.shape == (4, 2, 32)
    torch.testing.assert_close(alone[:, 0], with_long[:, 0], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_loads_offline_and_scores(monkeypatch):
    """The pretrained offline backbone: loads with no network, and prefers the obvious continuation."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = OmegaConf.load(REPO / "recsim/conf/backbone/smollm2_135m.yaml")
    model = lora_ops.add_lora(load_base_model(cfg, CACHE), cfg.lora)
    titles = ["<pad>", "Harry Potter and the Philosopher's Stone", "Harry Potter and the Chamber of Secrets",
              "Harry Potter and the Prisoner of Azkaban", "Stainless Steel Garden Hose Nozzle", "Car Battery Charger"]
    scoring = OmegaConf.create({"normalize": "mean", "max_title_words": None, "max_answer_tokens": 32})
    ranker = LLMRanker(model, load_tokenizer(cfg, CACHE), titles, PROMPT, scoring, OPTIM)
    scores = ranker.score_candidates([Sample(0, (1, 2), 3)], np.array([[3, 4, 5]]))
    assert np.isfinite(scores).all()
    assert scores[0, 0] > scores[0, 1] and scores[0, 0] > scores[0, 2]


def test_parse_ranked_list_dedups_and_keeps_order():
    from recsim.models.prompts import parse_ranked_list

    assert parse_ranked_list(' A || "B" || A ||  || C', "||") == ["A", "B", "C"]


def test_generation_mode_scores_exact_matches_and_counts_invalid(monkeypatch):
    """Generation is stubbed with known text: the positive second, a repeat, and a made-up title."""
    ranker = tiny_ranker()
    samples = [Sample(0, (1, 2), 3, position=2), Sample(1, (4,), 5, position=1)]
    cands = np.array([[3, 6, 7], [5, 8, 9]])
    texts = [f" {TITLES[6]} || {TITLES[3]} || {TITLES[6]} || Not A Real Title", " Nothing || Else"]

    def fake_generate(input_ids, attention_mask, **kw):
        tails = [ranker.tok(t, add_special_tokens=False).input_ids for t in texts]
        width = max(map(len, tails))
        tails = torch.tensor([t + [ranker.tok.eos_token_id] * (width - len(t)) for t in tails])
        return torch.cat([input_ids, tails], dim=1)

    monkeypatch.setattr(ranker.model, "generate", fake_generate)
    gen = OmegaConf.create({"list_length": 5, "separator": "||", "max_new_tokens": 8, "max_title_words": None})
    ranks, stats = ranker.generate_rankings(samples, cands, gen, seed=0)
    assert ranks.tolist() == [1, -1]  # the positive is 2nd of the deduplicated valid list; a miss is -1 (scores 0)
    assert stats == {"generated": 5, "invalid": 3, "empty_lists": 1}


def test_generation_tells_apart_titles_equal_after_the_word_cut(monkeypatch):
    """Items 1 and 9 are both "Velvet Rose Lipstick" at 3 words: the prompt extends them to "... number 1" and
    "... number 9", so a generated "... number 9" is item 9 (today's cut made one overwrite the other)."""
    ranker = tiny_ranker()
    samples = [Sample(0, (2,), 9, position=1)]
    cands = np.array([[9, 1, 3]])
    prompts = []
    text = " Velvet Rose Lipstick number 1 || Velvet Rose Lipstick number 9 || Velvet Coral Lipstick"

    def fake_generate(input_ids, attention_mask, **kw):
        prompts.append(ranker.tok.decode(input_ids[0], skip_special_tokens=True))
        tail = torch.tensor([ranker.tok(text, add_special_tokens=False).input_ids])
        return torch.cat([input_ids, tail], dim=1)

    monkeypatch.setattr(ranker.model, "generate", fake_generate)
    gen = OmegaConf.create({"list_length": 3, "separator": "||", "max_new_tokens": 8, "max_title_words": 3})
    ranks, stats = ranker.generate_rankings(samples, cands, gen, seed=0)
    assert "- Velvet Rose Lipstick number 1\n" in prompts[0] and "- Velvet Rose Lipstick number 9\n" in prompts[0]
    assert "- Velvet Coral Lipstick\n" in prompts[0]  # a title without a clash keeps the cut
    assert ranks.tolist() == [1] and stats == {"generated": 3, "invalid": 0, "empty_lists": 0}


def test_prompt_ids_are_tokenised_once_per_shown_history(monkeypatch):
    ranker = tiny_ranker()
    want = ranker.tok(ranker.prompt_for((1, 2, 3)), add_special_tokens=False).input_ids
    calls = []
    real = ranker.tok.__class__.__call__
    monkeypatch.setattr(ranker.tok.__class__, "__call__", lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    assert ranker.prompt_ids((1, 2, 3)) == want and ranker.prompt_ids([1, 2, 3]) == want
    long = tuple(range(1, 15))  # max_history 10: shows the same 10 titles as its suffix
    assert ranker.prompt_ids(long) == ranker.prompt_ids(long[-10:])
    assert len(calls) == 2  # (1, 2, 3) once, the 10 shown titles once
    assert ranker.sample_length(Sample(0, (1, 2, 3), 4)) == len(want) + len(ranker.answer_ids(4))
