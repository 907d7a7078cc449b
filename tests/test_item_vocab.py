"""The item vocabulary: prompt text apart from emitted identifier; code tokens added before LoRA and trained."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from recsim.decoders.base import ranks_of_lists
from recsim.items.vocab import ItemVocabulary, build_vocabulary
from recsim.models.prompts import history_prompt
from recsim.protocols.base import EncodedData, Sample

REPO = Path(__file__).parents[1]


def _data(n_items=4) -> EncodedData:
    titles = ["<pad>"] + [f"Title {i}" for i in range(1, n_items + 1)]
    item_ids = [""] + [str(100 + i) for i in range(1, n_items + 1)]
    seqs = {0: np.array([1, 2, 3]), 1: np.array([2, 4])}
    stamps = {u: np.arange(len(s)) for u, s in seqs.items()}
    return EncodedData("toy", seqs, stamps, titles, item_ids, ["u0", "u1"])


def _index_file(tmp_path: Path) -> Path:
    # items 102 and 103 collide: recsim must tell them apart
    index = {"101": ["<a_1>", "<b_2>"], "102": ["<a_1>", "<b_3>"], "103": ["<a_1>", "<b_3>"], "104": ["<a_0>", "<b_0>"]}
    path = tmp_path / "idx.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump(index, fh)
    return path


def _cfg(tmp_path, item_id: dict, index: Path | None = None):
    dataset = {"name": "toy", "data_dir": str(tmp_path), "semantic_index": index.name if index else None}
    return OmegaConf.create({"item_id": item_id, "dataset": dataset})


def test_title_vocabulary_shows_and_emits_titles(tmp_path):
    vocab = build_vocabulary(_cfg(tmp_path, {"name": "title"}), _data(), tmp_path)
    assert vocab.prompt_texts[2] == vocab.answers[2] == "Title 2"
    assert vocab.new_tokens == [] and vocab.cut_answers and not vocab.emits_codes


def test_released_index_collisions_broken_and_counted(tmp_path):
    index = _index_file(tmp_path)
    vocab = build_vocabulary(_cfg(tmp_path, {"name": "semantic_released", "dedup": "colliding",
                                             "prompt_shows": "code"}, index), _data(), tmp_path)
    assert vocab.answers[1] == "<a_1><b_2>"
    assert vocab.answers[2] != vocab.answers[3] and vocab.answers[2].startswith("<a_1><b_3>")
    assert len(set(vocab.answers[1:])) == 4
    assert vocab.report["collisions"]["items_in_collisions"] == 2
    assert vocab.prompt_texts[4] == vocab.answers[4]  # prompt_shows=code
    assert set(vocab.new_tokens) >= {"<a_0>", "<a_1>", "<b_0>", "<b_2>", "<b_3>"}
    assert vocab.fingerprint() != build_vocabulary(_cfg(tmp_path, {"name": "title"}), _data(), tmp_path).fingerprint()


def test_released_index_without_dataset_key_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="dataset.semantic_index"):
        build_vocabulary(_cfg(tmp_path, {"name": "semantic_released"}), _data(), tmp_path)
    cfg = _cfg(tmp_path, {"name": "semantic_released"})
    cfg.dataset.semantic_index = "missing.json.gz"
    with pytest.raises(Exception, match="missing.json.gz"):
        build_vocabulary(cfg, _data(), tmp_path)


def test_inline_history_prompt():
    assert history_prompt(["<a_1><b_2>", "<a_3><b_4>"], "items {history} next", None, ", ") == \
        "items <a_1><b_2>, <a_3><b_4> next"
    assert history_prompt(["x", "y"], "{history}") == "1. x\n2. y"


def test_catalogue_ranks_count_invalid_and_short_lists():
    samples = [Sample(0, (1,), 3), Sample(1, (2,), 2), Sample(2, (1,), 4)]
    lists = np.array([[2, 3, -1], [9, 2, 1], [1, 2, 3]])  # 9 is outside a 4-item catalogue
    ranks, counts = ranks_of_lists(lists, samples, num_items=4, top_k=3)
    assert ranks.tolist() == [1, 0, -1]  # the invalid id is dropped before ranking: item 2 moves to rank 0
    assert counts["invalid"] == 1 and counts["listed"] == 8 and counts["short_lists"] == 2


def test_code_tokens_added_before_lora_and_trained(tmp_path):
    """The recommender adds the code tokens to the tokenizer, each tokenises to one id, their embedding rows train
    (peft's trainable-token deltas) and the model's vocabulary grew before LoRA was attached."""
    from hydra import compose, initialize_config_dir

    from recsim.models.recommender import LLMRecommender

    index = _index_file(tmp_path)
    with initialize_config_dir(config_dir=str(REPO / "recsim" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["backbone=tiny_llama", "recipe=generative", "item_id=semantic_released",
                                           f"+dataset.semantic_index={index.name}", f"dataset.data_dir={tmp_path}",
                                           f"paths.cache_dir={tmp_path / 'cache'}"])
    rec = LLMRecommender(cfg, _data(), tmp_path / "cache", seed=1)
    tok = rec.tokenizer
    ids = tok("<a_1><b_3><c_1>", add_special_tokens=False).input_ids  # vocab's dedup token is level c
    assert len(ids) == 3 and all(i >= 49152 for i in ids)
    assert rec.model.get_input_embeddings().weight.shape[0] == len(tok)
    answer = rec.module.answer_ids(2)
    assert answer[-1] == tok.eos_token_id and len(answer) == 4  # two codes, the dedup token, EOS
    trainable = {n for n, p in rec.model.named_parameters() if p.requires_grad}
    assert any("trainable_tokens_delta" in n for n in trainable)
    batch = rec.collate([Sample(0, (1, 2), 3)])
    out = rec.module.answer_logits(batch)
    torch.nn.functional.cross_entropy(out["logits"], out["targets"]).backward()
    delta = next(p for n, p in rec.model.named_parameters() if "trainable_tokens_delta" in n)
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_train_embeddings_all_keeps_tied_embeddings_tied():
    """item_id.train_embeddings=all (PESO's code: embed_tokens and lm_head train whole): one trained copy for a
    model whose input and output embeddings are tied, so the two cannot drift apart."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from recsim.backbones.lora import add_lora, lora_parameters

    cfg = LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    lora = OmegaConf.create({"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj"]})
    model = add_lora(LlamaForCausalLM(cfg), lora, train_embeddings=True)
    saved = [n for n in lora_parameters(model) if "modules_to_save" in n]
    assert len(saved) == 1 and "embed_tokens" in saved[0]
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    assert head.weight.data_ptr() == emb.weight.data_ptr()


def test_identical_titles_told_apart_for_the_beam(tmp_path):
    """item_id.dedup=suffix: identical titles (Beauty has dozens) get distinct answers, so a trie can tell them apart;
    the default leaves them as they are (candidate scoring, EvoRec's tables, unchanged)."""
    data = _data()
    data.titles[3] = data.titles[2]  # items 2 and 3 share a title
    cfg = _cfg(tmp_path, {"name": "title", "dedup": "suffix"})
    cfg.recipe = {"scoring": {"max_title_words": 12}}
    vocab = build_vocabulary(cfg, data, tmp_path)
    assert vocab.answers[2] == " Title 2" and vocab.answers[3] == " Title 2 (2)" and not vocab.cut_answers
    assert vocab.report["collisions"]["items_in_collisions"] == 1
    plain = build_vocabulary(_cfg(tmp_path, {"name": "title", "dedup": "none"}), data, tmp_path)
    assert plain.answers[2] == plain.answers[3] and plain.cut_answers
