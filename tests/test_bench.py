"""`python -m recsim.bench`: the FLOP model, the vectorised full ranking against the implementation it
replaced, the three benchmarks end to end on tiny settings, and bad `bench.*` values."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from recsim.bench.flops import lora_step_flops

# a 60-user simulation, batches of 4: each benchmark run is seconds of work after the imports
TINY = ["dataset=synthetic", "dataset.simulator.num_users=60", "trainer.batch_size=4", "trainer.progress_bar=false"]


def bench(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "recsim.bench", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def record(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert {"backbone", "dataset", "device", "torch", "transformers", "precision", "batch_size", "compile"} <= set(
        data["config"])
    return data


# ---------------------------------------------------------------------------------------------- FLOPs

def test_flop_formula_by_hand():
    # N = 1000 linear weights, two sequences of real length 3 and 5 (T = 8), M = 3 answer tokens,
    # L = 2 layers, d = 4, V = 10, H = 4:
    #   linear     4 * N * T          = 4 * 1000 * 8           = 32000
    #   attention  6 * L * d * sum n² = 6 * 2 * 4 * (9 + 25)   =  1632
    #   LM head    4 * V * H * M      = 4 * 10 * 4 * 3         =   480
    #   total                                                   = 34112
    assert lora_step_flops(1000, [3, 5], 3, layers=2, d_attn=4, vocab=10, hidden=4) == 34112
    # linear in the batch: two steps' worth of sequences cost the sum of the two steps
    one = lora_step_flops(1000, [3], 1, layers=2, d_attn=4, vocab=10, hidden=4)
    two = lora_step_flops(1000, [5], 2, layers=2, d_attn=4, vocab=10, hidden=4)
    assert one + two == lora_step_flops(1000, [3, 5], 3, layers=2, d_attn=4, vocab=10, hidden=4)


# ------------------------------------------------------------------------------------ full ranking

def ranks_full_reference(scores, targets, exclude):
    """recsim's ranks_full before vectorisation (numpy blocks + a Python loop over users), kept to prove
    the torch version ranks exactly alike: rank = items 1..N at or above the target, minus the target
    itself, minus the masked items at or above it."""
    scores = np.asarray(scores)
    n = len(scores)
    targets = np.asarray(targets, dtype=np.int64)
    target_scores = scores[np.arange(n), targets]
    ranks = (scores[:, 1:] >= target_scores[:, None]).sum(axis=1) - 1
    for row, items in enumerate(exclude or ()):
        ids = np.unique(np.fromiter((int(i) for i in items), dtype=np.int64))
        ids = ids[(ids != 0) & (ids != targets[row])]
        ranks[row] -= int((scores[row, ids] >= target_scores[row]).sum())
    return ranks


@pytest.mark.parametrize("backend", ["numpy", "torch"])  # torch: what a GPU tensor takes; forced here on CPU
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_full_vectorised_equals_reference(seed, backend, monkeypatch):
    import torch

    from recsim.eval import metrics

    rng = np.random.default_rng(seed)
    n, items = 57, 40
    scores = rng.integers(0, 6, size=(n, items + 1)).astype(np.float32)  # 6 levels: ties everywhere
    scores[rng.random(scores.shape) < 0.05] = -np.inf  # -inf ties too: masking must not be done with -inf
    targets = rng.integers(1, items + 1, size=n)
    # histories with padding 0, duplicates, the target itself, and empty rows
    exclude = [rng.integers(0, items + 1, size=rng.integers(0, 12)).tolist() + ([int(t)] if r % 3 == 0 else [])
               for r, t in enumerate(targets)]
    expected = ranks_full_reference(scores, targets, exclude)
    monkeypatch.setattr(metrics, "_FULL_RANK_BLOCK_ELEMENTS", 5 * (items + 1))  # blocks of 5 rows: masks cross blocks
    rank = lambda *args: metrics.ranks_full(*args, backend=backend)
    np.testing.assert_array_equal(rank(scores, targets, exclude), expected)
    np.testing.assert_array_equal(rank(scores, targets), ranks_full_reference(scores, targets, None))
    np.testing.assert_array_equal(rank(scores, targets, [np.array(r) for r in exclude]), expected)
    # a torch tensor (bf16 holds these small integers exactly) and a 0-padded [n, L] history tensor
    width = max(map(len, exclude))
    padded = torch.tensor([row + [0] * (width - len(row)) for row in exclude])
    tensor = torch.from_numpy(scores).to(torch.bfloat16)
    np.testing.assert_array_equal(rank(tensor, torch.from_numpy(targets), padded), expected)


def test_ranks_full_rejects_bad_history_ids():
    from recsim.eval.metrics import ranks_full

    with pytest.raises(ValueError, match=r"exclude\[1\]"):
        ranks_full(np.zeros((2, 4)), [1, 2], [[1], [7]])
    with pytest.raises(ValueError, match=r"exclude\[1\]"):
        ranks_full(np.zeros((2, 4)), [1, 2], np.array([[1, 0], [2, -1]]))
    with pytest.raises(ValueError, match="NaN scores in rows \\[1\\]"):
        ranks_full(np.array([[0.0, 1.0, 2.0], [0.0, np.nan, 2.0]]), [1, 2], backend="torch")


# ------------------------------------------------------------------------------- benchmarks, e2e

def test_train_benchmark_end_to_end(tmp_path):
    out = tmp_path / "train.json"
    proc = bench(["train", "backbone=tiny_llama", *TINY, "bench.steps=2", "bench.warmup=1", f"bench.out={out}"])
    assert "samples/s" in proc.stdout and "MFU" in proc.stdout
    data = record(out)
    f = data["figures"]
    assert data["config"]["backbone"] == "tiny_llama" and data["bench"]["steps"] == 2
    for key in ("seconds", "samples", "samples_per_s", "real_tokens_per_s", "padded_tokens_per_s", "flops",
                "achieved_tflops", "mfu", "peak_mem_mb", "answer_tokens"):
        assert f[key] > 0, key
    assert f["samples"] == 2 * 4 and f["effective_batch_size"] == 4 and len(f["step_seconds"]) == 2
    assert f["samples_per_s"] * f["seconds"] == pytest.approx(f["samples"])
    assert f["real_tokens_per_s"] * f["seconds"] == pytest.approx(f["real_tokens"])
    assert f["real_tokens"] <= f["padded_tokens"]
    # tiny_llama: 4 layers of q 32x32, k and v 32x16 (2 KV heads of 8), o 32x32, gate, up, down 32x64 each
    assert f["model_dims"]["n_linear"] == 4 * (1024 + 512 + 512 + 1024 + 3 * 2048)
    assert f["mfu"] == pytest.approx(f["flops"] / f["seconds"] / (790e12))


def test_train_benchmark_profiles_steps_after_the_timed_ones(tmp_path):
    """bench.profile: the profiled steps come after the timed ones (their count and timing unchanged), and
    the operator tables, the sync report and the summary are written."""
    out, folder = tmp_path / "train.json", tmp_path / "prof"
    bench(["train", "backbone=tiny_llama", *TINY, "bench.steps=2", "bench.warmup=1", "bench.profile_steps=2",
           f"bench.profile={folder}", f"bench.out={out}"])
    f = record(out)["figures"]
    assert f["samples"] == 2 * 4 and len(f["step_seconds"]) == 2
    assert f["profile"]["profiled_steps"] == 2 and f["profile"]["wall_s_per_step"] > 0
    assert f["profile"]["device_busy_s_per_step"] is None  # CPU: no device timeline
    assert f["train_samples_used"] == (1 + 2 + 2) * 4  # the profiled steps drew samples of their own
    table = (folder / "ops_by_host_time.txt").read_text()
    assert "aten::mm" in table or "aten::addmm" in table or "aten::linear" in table
    assert (folder / "host_syncs.txt").read_text() == "none\n"  # no CUDA device, nothing to wait for
    assert json.loads((folder / "summary.json").read_text()) == f["profile"]
    assert (folder / "trace.json").stat().st_size > 0


@pytest.mark.slow  # LLM candidate scoring in its own process: the slowest of the three, over the fast budget
def test_score_benchmark_end_to_end(tmp_path):
    out = tmp_path / "score.json"
    bench(["score", "backbone=tiny_llama", *TINY, "eval.batch_size=3", "bench.users=6", "bench.warmup=1",
           "bench.agreement=true", f"bench.out={out}"])
    f = record(out)["figures"]
    assert (f["users"], f["candidates_per_user"]) == (6, 30)  # 1 + eval.negatives (29)
    assert f["seconds"] > 0 and f["peak_mem_mb"] > 0
    assert f["users_per_s"] * f["seconds"] == pytest.approx(6)
    # on CPU the configured pass is fp32 already: the same scores as the fp32 pass
    agreement = f["agreement"]
    assert agreement["top_k_order_kept"] == 1.0 and agreement["max_abs_diff"] < 1e-6
    assert agreement["fp32_users_per_s"] * agreement["fp32_seconds"] == pytest.approx(6)


def test_top_k_agreement_by_hand():
    from recsim.bench.score import top_k_agreement

    reference = np.array([[0.9, 0.5, 0.1, 0.0], [0.9, 0.5, 0.1, 0.0], [0.9, 0.5, 0.1, 0.0]])
    scores = np.array([[0.8, 0.6, 0.2, 0.0],    # same top-2 in the same order
                       [0.5, 0.9, 0.1, 0.0],    # same set, order swapped
                       [0.9, 0.05, 0.1, 0.0]])  # candidate 2 enters the top-2
    f = top_k_agreement(scores, reference, k=2)
    assert f["top_k_order_kept"] == pytest.approx(1 / 3) and f["top_k_set_kept"] == pytest.approx(2 / 3)
    assert f["max_abs_diff"] == pytest.approx(0.45) and f["k"] == 2
    assert f["mean_abs_diff"] == pytest.approx((0.1 + 0.1 + 0.1 + 0.4 + 0.4 + 0.45) / 12)


def test_fullrank_benchmark_end_to_end(tmp_path):
    out = tmp_path / "fullrank.json"
    bench(["fullrank", "backbone=sasrec", *TINY, "bench.users=20", "bench.warmup=1", f"bench.out={out}"])
    f = record(out)["figures"]
    assert f["mode"] == "model" and f["users"] == 20 and f["items"] > 0 and f["same_ranks"] is True
    assert f["users_per_s"] * f["seconds"] == pytest.approx(20)
    assert f["seconds_on_device"] > 0 and f["peak_mem_mb"] > 0


def test_fullrank_synthetic_scores():
    """bench.synthetic_scores=true: random scores and histories on the device, no data and no model. Called
    in this process (the CLI around it is the one the e2e tests above run), so no Lightning import is paid."""
    import torch

    from conftest import compose
    from recsim.bench.fullrank import synthetic
    from recsim.bench.settings import split_overrides

    settings, rest = split_overrides(["bench.synthetic_scores=true", "bench.users=300", "bench.items=500",
                                      "bench.history_len=7", "bench.warmup=1"])
    f = synthetic(compose(rest), settings, torch.device("cpu"))
    assert (f["mode"], f["users"], f["items"], f["history_len"]) == ("synthetic_scores", 300, 500, 7)
    assert f["seconds"] > 0 and f["users_per_s"] * f["seconds"] == pytest.approx(300)


# --------------------------------------------------------------------------------------- CLI errors

@pytest.mark.parametrize("value, message", [("-1", "bench.steps=-1: expected an integer >= 1"),
                                            ("abc", "bench.steps='abc': expected an integer >= 1")])
def test_bad_bench_value_is_a_clear_error(value, message):
    proc = bench(["train", f"bench.steps={value}"], check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_unknown_bench_key_and_usage():
    proc = bench(["train", "bench.stepz=3"], check=False)
    assert proc.returncode != 0 and "bench.stepz: unknown key" in proc.stderr
    for args in ([], ["nope"]):
        proc = bench(args, check=False)
        assert proc.returncode == 2 and "usage: python -m recsim.bench" in proc.stderr
