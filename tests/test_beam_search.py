"""The item trie, trie-constrained beam search (against brute force), and BIGRec's grounding, on the tiny Llama."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from recsim.decoders.beam import constrained_beam_search
from recsim.decoders.grounding import free_generation, ground, item_embeddings, nearest_items
from recsim.decoders.trie import ItemTrie
from recsim.models.llm_ranker import LLMRanker
from recsim.protocols.base import Sample

from conftest import tiny_lora_ranker

EOS = 2  # SmolLM2's tokenizer (tiny_llama): eos = pad = 2; the trie tests only need some token id
TITLES = ["<pad>"] + [f"Velvet {c} Lipstick" for c in ["Rose", "Plum", "Coral", "Nude", "Ruby", "Berry", "Peach", "Wine"]]


@pytest.fixture(scope="module")
def ranker():
    r = tiny_lora_ranker(TITLES)
    assert r.tok.eos_token_id == EOS
    return r.eval()


def sequence_logprob(ranker, prompt, seq) -> float:
    """Teacher forcing, one unpadded forward of prompt + seq: Σ_t log p(seq_t | prompt, seq_<t), in float64."""
    ids = torch.tensor([prompt + seq])
    with torch.no_grad():
        hidden = ranker._decode(ids, torch.ones_like(ids)).last_hidden_state[0]  # [L, H]
        logp = torch.log_softmax(ranker.base.get_output_embeddings()(hidden).float(), -1)
    P = len(prompt)
    return float(sum(logp[P - 1 + t, tok].double() for t, tok in enumerate(seq)))


def exact_top(ranker, prompt, sequences, k, length_penalty=0.0):
    scored = [(sequence_logprob(ranker, prompt, seq) / len(seq) ** length_penalty, item)
              for item, seq in sequences.items()]
    scored.sort(reverse=True)
    return [i for _, i in scored[:k]], [s for s, _ in scored[:k]]


def random_catalogue(n, min_len, max_len, token_range, seed):
    """n distinct sequences of min_len..max_len tokens from a small range (shared prefixes), EOS last."""
    rng = np.random.default_rng(seed)
    seqs, seen = {}, set()
    while len(seqs) < n:
        body = tuple(int(t) for t in rng.integers(*token_range, size=rng.integers(min_len - 1, max_len)))
        if body not in seen:
            seen.add(body)
            seqs[len(seqs) + 1] = list(body) + [EOS]
    return seqs


PROMPTS = [[101, 57, 900], [5, 6, 7, 8, 9, 10, 11], [300 + i for i in range(12)]]  # 3, 7, 12 tokens: left padding


# ---- trie ----------------------------------------------------------------------------------------------------
def test_trie_hand_built():
    seqs = {1: [5, EOS], 2: [5, 7, EOS], 3: [6, 7, EOS], 4: [6, 7, EOS], 5: [5, 7, 8, EOS]}  # 1 prefix of 2; 3 = 4
    trie = ItemTrie(seqs)
    assert trie.collisions == [[3, 4]]
    assert trie.num_nodes == 10 and trie.depth == 4 and trie.num_items == 4
    root = torch.tensor([0])
    assert torch.nonzero(trie.allowed_mask(root, 10)[0]).view(-1).tolist() == [5, 6]
    n5 = trie.advance(root, torch.tensor([5]))
    assert torch.nonzero(trie.allowed_mask(n5, 10)[0]).view(-1).tolist() == [EOS, 7]
    allowed, extends = trie.step_masks(n5, 10)
    assert extends[0, 7] and not extends[0, EOS]  # [5, EOS] is a leaf: it finishes, it does not grow
    assert trie.items_at(trie.advance(n5, torch.tensor([EOS]))).tolist() == [1]  # the prefix item
    assert trie.items_at(n5).tolist() == [-1]  # an inner node ends no item

    def walk(seq):
        node = root
        for t in seq:
            node = trie.advance(node, torch.tensor([t]))
        return node

    assert trie.items_at(walk([5, 7, EOS])).tolist() == [2]
    assert trie.items_at(walk([5, 7, 8, EOS])).tolist() == [5]
    assert trie.items_at(walk([6, 7, EOS])).tolist() == [3]  # a collision keeps the first id
    tokens, items = trie.item_edges(walk([5, 7]))
    assert tokens.tolist() == [[EOS]] and items.tolist() == [[2]]
    # tokens that are not children, and dead nodes, lead nowhere and allow nothing
    assert trie.advance(torch.tensor([0, 0, -1, int(n5)]), torch.tensor([7, 99, 5, 6])).tolist() == [-1, -1, -1, -1]
    assert not trie.allowed_mask(torch.tensor([-1]), 10).any()
    with pytest.raises(ValueError, match="vocab_size 8"):
        trie.allowed_mask(root, 8)
    with pytest.raises(ValueError, match="item 3 has an empty"):
        ItemTrie({1: [4], 3: []})


def test_trie_masks_and_walks_match_python_reference():
    seqs = random_catalogue(80, 1, 6, (10, 16), seed=3)
    trie = ItemTrie(seqs)
    assert trie.collisions == []
    prefixes = {tuple(s[:d]) for s in seqs.values() for d in range(len(s))}
    prefixes = sorted(prefixes)
    nodes = []
    for p in prefixes:
        node = torch.tensor([0])
        for t in p:
            node = trie.advance(node, torch.tensor([t]))
        nodes.append(int(node))
    assert min(nodes) >= 0 and len(set(nodes)) == len(prefixes)  # one node per prefix
    allowed = trie.allowed_mask(torch.tensor(nodes), 20)
    for row, p in zip(allowed, prefixes):
        expected = sorted({s[len(p)] for s in seqs.values() if tuple(s[: len(p)]) == p and len(s) > len(p)})
        assert torch.nonzero(row).view(-1).tolist() == expected
    for item, seq in seqs.items():
        node = torch.tensor([0])
        for t in seq:
            node = trie.advance(node, torch.tensor([t]))
        assert trie.items_at(node).tolist() == [item]


# ---- beam search -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_equals_brute_force_when_nothing_is_pruned(ranker, length_penalty):
    seqs = {1: [120, EOS], 2: [120, 121, EOS], 3: [130, 131, 132, EOS], 4: [130, 140, EOS], 5: [150, 151, 152, EOS],
            6: [120, 121, 122, EOS]}
    trie = ItemTrie(seqs)
    timer = {}
    items, scores, stats = constrained_beam_search(ranker._step, PROMPTS, trie, beam_size=6, top_k=6,
                                                   pad_id=ranker.tok.pad_token_id, length_penalty=length_penalty,
                                                   timer=timer)
    assert items.shape == (3, 6) and items.dtype == np.int64
    for b, prompt in enumerate(PROMPTS):
        want_items, want_scores = exact_top(ranker, prompt, seqs, 6, length_penalty)
        assert items[b].tolist() == want_items
        np.testing.assert_allclose(scores[b], want_scores, rtol=0, atol=1e-5)
    assert stats["steps"] <= trie.depth and set(timer) == {"trie_seconds", "model_seconds", "search_seconds"}


def test_only_real_items_each_once_with_their_true_scores(ranker):
    seqs = random_catalogue(60, 2, 5, (200, 206), seed=0)
    trie = ItemTrie(seqs)
    items, scores, _ = constrained_beam_search(ranker._step, PROMPTS, trie, beam_size=3, top_k=10,
                                               pad_id=ranker.tok.pad_token_id)
    for b, prompt in enumerate(PROMPTS):
        found = [int(i) for i in items[b] if i != -1]
        assert len(found) >= 3 and set(found) <= set(seqs) and len(found) == len(set(found))
        assert (items[b][len(found) :] == -1).all()  # -1 only after the real items
        assert np.all(np.diff(scores[b][: len(found)]) <= 0)
        np.testing.assert_allclose(scores[b][: len(found)], [sequence_logprob(ranker, prompt, seqs[i]) for i in found],
                                   rtol=0, atol=1e-5)


def test_a_model_that_prefers_an_item_returns_it_first(ranker):
    seqs = random_catalogue(40, 2, 4, (200, 230), seed=1)
    favourite = next(i for i, s in seqs.items() if len(s) == 4)
    target = seqs[favourite]

    def biased_step(ids, mask, positions, cache):
        logp, cache = ranker._step(ids, mask, positions, cache)
        depth = mask.shape[1] - max(map(len, PROMPTS))  # tokens already written
        bonus = torch.zeros_like(logp)
        bonus[:, target[depth]] = 20.0
        return torch.log_softmax(logp + bonus, -1), cache

    items, _, _ = constrained_beam_search(biased_step, PROMPTS, ItemTrie(seqs), beam_size=2, top_k=5,
                                          pad_id=ranker.tok.pad_token_id)
    assert (items[:, 0] == favourite).all()
    plain, _, _ = constrained_beam_search(ranker._step, PROMPTS, ItemTrie(seqs), beam_size=2, top_k=5,
                                          pad_id=ranker.tok.pad_token_id)
    assert not (plain[:, 0] == favourite).all()  # the random model alone does not pick it


def test_search_stops_once_no_alive_beam_can_beat_the_pool(ranker):
    seqs = {1: [400, EOS], 2: [410, 411, 412, 413, 414, EOS], 3: [420, 421, 422, 423, 424, EOS]}

    def short_item_step(ids, mask, positions, cache):  # item 1 far likelier than any other first token
        logp, cache = ranker._step(ids, mask, positions, cache)
        bonus = torch.zeros_like(logp)
        bonus[:, [400, EOS]] = 30.0
        return torch.log_softmax(logp + bonus, -1), cache

    items, _, stats = constrained_beam_search(short_item_step, PROMPTS, ItemTrie(seqs), beam_size=3, top_k=1,
                                              pad_id=ranker.tok.pad_token_id)
    assert (items[:, 0] == 1).all() and stats["steps"] == 2 < ItemTrie(seqs).depth


def test_top_k_beyond_beam_size_collects_finished_from_all_expansions(ranker):
    # two chains whose every prefix is an item: 2 beams can grow, and each step finishes one item per beam
    seqs = {}
    for chain in ([310, 311, 312, 313, 314, 315], [320, 321, 322, 323, 324, 325]):
        for d in range(1, len(chain) + 1):
            seqs[len(seqs) + 1] = chain[:d] + [EOS]
    items, scores, _ = constrained_beam_search(ranker._step, PROMPTS, ItemTrie(seqs), beam_size=2, top_k=8,
                                               pad_id=ranker.tok.pad_token_id)
    for b, prompt in enumerate(PROMPTS):
        assert len(set(items[b].tolist())) == 8 and (items[b] > 0).all()
        want_items, want_scores = exact_top(ranker, prompt, seqs, 8)  # no prefix is ever pruned: exact
        assert items[b].tolist() == want_items
        np.testing.assert_allclose(scores[b], want_scores, rtol=0, atol=1e-5)


def test_bad_options_are_named(ranker):
    trie = ItemTrie({1: [5, EOS]})
    with pytest.raises(ValueError, match="length_penalty=-1"):
        constrained_beam_search(ranker._step, PROMPTS, trie, pad_id=2, length_penalty=-1.0)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        constrained_beam_search(ranker._step, [[4], []], trie, pad_id=2)


# ---- grounding -------------------------------------------------------------------------------------------------
def test_grounding_returns_the_item_written_exactly(ranker):
    items = list(range(1, len(TITLES)))
    matrix = item_embeddings(ranker, items, batch_size=3)
    assert matrix.shape == (len(items), 32)
    favourite = 5
    target = ranker.answer_ids(favourite)  # its identifier's tokens, EOS last

    def forced_step(ids, mask, positions, cache):  # greedy decoding then writes exactly `target`
        logp, cache = ranker._step(ids, mask, positions, cache)
        written = 0 if cache is None or ids.shape[1] > 1 else forced_step.calls
        forced_step.calls = written + 1
        bonus = torch.zeros_like(logp)
        bonus[:, target[written]] = 1e4
        return torch.log_softmax(logp + bonus, -1), cache

    forced_step.calls = 0
    samples = [Sample(0, (1, 2, 3), 4), Sample(1, (7,), 8)]
    prompts = [ranker.prompt_ids(s.history) for s in samples]
    assert free_generation(ranker, prompts, 20, 2, step=forced_step) == [target[:-1]] * 2
    forced_step.calls = 0
    got, dist = ground(ranker, samples, matrix, items, top_k=4, batch_size=2, step=forced_step)
    assert got.shape == (2, 4) and (got[:, 0] == favourite).all()
    assert np.all(dist[:, 0] < 1e-4) and np.all(dist[:, 1] > 1e-2) and np.all(np.diff(dist, axis=1) >= 0)


def test_grounding_embeds_with_the_base_model_and_ranks_by_l2(ranker):
    items = list(range(1, len(TITLES)))
    base = item_embeddings(ranker, items, batch_size=4)
    adapted = item_embeddings(ranker, items, batch_size=4, use_adapter=True)
    with ranker.model.disable_adapter(), torch.no_grad():
        ids = torch.tensor([ranker.answer_ids(3)[:-1]])
        direct = ranker._decode(ids, torch.ones_like(ids)).last_hidden_state[0, -1]
    torch.testing.assert_close(base[2], direct, rtol=0, atol=1e-5)
    assert not torch.allclose(base, adapted, atol=1e-3)  # the adapter changes the states: base is a choice
    written = [ranker.answer_ids(i)[:-1][:2] for i in (1, 6)] + [[]]  # partial texts, and one empty generation
    got, dist = nearest_items(ranker, written, base, items, top_k=10, batch_size=2)
    with ranker.model.disable_adapter(), torch.no_grad():
        queries = torch.stack([ranker._decode(torch.tensor([w]), torch.ones(1, len(w), dtype=torch.long))
                               .last_hidden_state[0, -1] for w in written[:2]])
    brute = torch.cdist(queries, base)  # [2, n]
    order = brute.argsort(1).numpy()
    assert (got[:2, : len(items)] == np.asarray(items)[order]).all() and (got[:2, len(items) :] == -1).all()
    np.testing.assert_allclose(dist[:2, : len(items)], np.sort(brute.numpy(), 1), rtol=1e-4, atol=1e-4)
    assert (got[2] == -1).all() and np.isinf(dist[2]).all()


def test_distinct_identifiers_are_never_cut_to_the_answer_token_cap(ranker):
    """Titles told apart only past `scoring.max_answer_tokens` (item_id.dedup=suffix adds words) must stay apart in
    the trie: answers given by the vocabulary are whole, plain titles keep the cap."""
    long = "Oral Care Replacement Brush Heads for Every Electric Toothbrush Model Sold In Stores Today"
    answers = ["<pad>", f" {long} Soft", f" {long} Firm"]
    capped = OmegaConf.create({**OmegaConf.to_container(ranker.scoring_cfg), "max_answer_tokens": 4})
    given = LLMRanker(ranker.model, ranker.tok, answers, ranker.prompt_cfg, capped, ranker.optim_cfg, answers=answers)
    assert len(given.answer_ids(1)) > 5 and given.answer_ids(1) != given.answer_ids(2)
    assert not ItemTrie.from_ranker(given, [1, 2]).collisions
    plain = LLMRanker(ranker.model, ranker.tok, answers, ranker.prompt_cfg, capped, ranker.optim_cfg)
    assert plain.answer_ids(1) == plain.answer_ids(2) and len(plain.answer_ids(1)) == 4 + 1  # cap + EOS
