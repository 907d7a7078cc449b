"""Trie-constrained beam search: every user's beams decoded together, one batched model step per token, the
trie's allowed-token mask applied to the log-probs on the device before each top-k, so only real items come out.

Per step t (hypotheses of t tokens, score s = Σ log p(token) so far):
    lp = log p(· | prompt, prefix), -inf outside the trie's children of the prefix's node     # [N, V]
    finished: every (beam, token) whose token ends an item, score (s + lp) / (t + 1)^α        # into the pool
    alive:    the W best (beam, token) by s + lp among tokens whose child can still grow        # next beams
A user stops once its pool holds top_k items that no alive beam can beat, or at max_new_tokens.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch

from recsim.decoders.trie import ItemTrie


@contextmanager
def _clock(stats: dict, key: str, sync: bool):
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    yield
    if sync:
        torch.cuda.synchronize()
    stats[key] += time.perf_counter() - start


def _reorder(cache, rows: torch.Tensor):
    # transformers' Cache (DynamicCache in 4.x and 5.x): index_select of every layer's keys and values on dim 0
    if not hasattr(cache, "reorder_cache"):
        raise TypeError(f"constrained_beam_search: the step's cache ({type(cache).__name__}) has no reorder_cache; "
                        "`step` must return a transformers Cache")
    cache.reorder_cache(rows)
    return cache


@torch.no_grad()
def constrained_beam_search(step, prompts: list[list[int]], trie: ItemTrie, *, beam_size: int = 10, top_k: int = 10,
                            max_new_tokens: int | None = None, pad_id: int, length_penalty: float = 0.0, device=None,
                            timer: dict | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Top-`top_k` items per prompt by beam search over `trie`: (items [B, top_k] int64, scores [B, top_k] float64,
    stats). Items are ordered by score, best first; -1 (score -inf) where fewer real items were found.

    `step(input_ids [N, T], attention_mask [N, T_total], position_ids [N, T], cache) -> (log-probs [N, V], cache)`
    is `LLMRanker._step` (or a method's step that runs its own adapters); `cache` is None on the first call.
    Prompts are left-padded with `pad_id`, positions = cumsum(mask) - 1 clamped at 0, as in `ensemble_generate`.

    Choices:
    - Score: the sum of the item's token log-probs (EOS included) divided by length^length_penalty (length in
      tokens; 0 = the plain sum, as D3 decodes). length_penalty < 0 is refused: the stopping bound needs >= 0.
    - Finished hypotheses: at every step, every expansion of every alive beam by a token that ends an item (its
      EOS) goes to the user's pool, whether or not it would have ranked among the W best expansions; the pool
      keeps the top_k best. So top_k may exceed beam_size, and the pool is exact over all expansions of the beams
      the search kept. Such an expansion never takes an alive slot unless its node has children (only possible
      when a sequence without EOS is a prefix of another): the W alive beams are the W best expansions whose
      node can still grow.
    - Each item has one path in the trie and alive beams are distinct paths, so an item enters a user's pool at
      most once; items are trie items only.
    - Exactness: with beam_size >= the number of items no prefix is ever pruned, so the result is the exact
      top_k by sequence log-prob.
    - Stopping: a user leaves the batch (its rows are dropped from the cache) once the k-th score of its pool is
      >= the best alive score / max_new_tokens^length_penalty, which bounds what any alive beam can still reach
      (log-probs are <= 0 and lengths <= max_new_tokens); everything stops at max_new_tokens (default trie.depth).
    - Selection runs in float32 (the [N, V] block); the kept scores are summed in float64.
    - `timer` (a dict): trie_seconds (masks, lookups), model_seconds (the step) and search_seconds (selection,
      cache reordering) are added to it, with CUDA synchronised around each part; without it nothing is
      synchronised and the stats' seconds are host time only.
    """
    if beam_size < 1:
        raise ValueError(f"constrained_beam_search: beam_size={beam_size} must be >= 1")
    if top_k < 1:
        raise ValueError(f"constrained_beam_search: top_k={top_k} must be >= 1")
    if length_penalty < 0:
        raise ValueError(f"constrained_beam_search: length_penalty={length_penalty} must be >= 0")
    max_new = trie.depth if max_new_tokens is None else int(max_new_tokens)
    if max_new < 1:
        raise ValueError(f"constrained_beam_search: max_new_tokens={max_new_tokens} must be >= 1")
    if not prompts:
        return np.zeros((0, top_k), dtype=np.int64), np.zeros((0, top_k)), {"steps": 0, "hypotheses": 0}
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"constrained_beam_search: prompts[{b}] is empty")
    dev = torch.device(device) if device is not None else trie.device
    trie = trie.to(dev)
    sync = timer is not None and dev.type == "cuda"
    stats = {"steps": 0, "hypotheses": 0, "trie_seconds": 0.0, "model_seconds": 0.0, "search_seconds": 0.0}
    B, W, K = len(prompts), beam_size, top_k
    neg_inf = float("-inf")

    width = max(map(len, prompts))
    inputs = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=dev)  # [B, T]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)  # [B, T]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
    next_pos = positions[:, -1:] + 1  # [rows, 1]

    # alive hypotheses of the active users: [A, w] (w = 1 at the root, then W)
    users = torch.arange(B, device=dev)  # [A] batch index of each active user
    nodes = torch.zeros(B, 1, dtype=torch.long, device=dev)
    score = torch.zeros(B, 1, dtype=torch.float64, device=dev)
    pool_score = torch.full((B, K), neg_inf, dtype=torch.float64, device=dev)
    pool_item = torch.full((B, K), -1, dtype=torch.long, device=dev)
    hypotheses = torch.zeros((), dtype=torch.long, device=dev)
    cache = None
    for t in range(max_new):
        with _clock(stats, "model_seconds", sync):
            logp, cache = step(inputs, mask, positions, cache)
            logp = logp.float()  # [A*w, V]
        stats["steps"] += 1
        A, w = nodes.shape
        V = logp.shape[-1]
        flat_nodes, flat_score = nodes.view(-1), score.view(-1)  # [A*w]
        with _clock(stats, "trie_seconds", sync):
            allowed, extends = trie.step_masks(flat_nodes, V)  # [A*w, V] each
            logp = logp.masked_fill(~allowed, neg_inf)
            end_token, end_item = trie.item_edges(flat_nodes)  # [A*w, F]
        with _clock(stats, "search_seconds", sync):
            # finished: (s + lp) / (t + 1)^α for every expansion that ends an item
            end_score = (flat_score[:, None] + logp.gather(1, end_token.clamp(min=0)).double()) / (t + 1) ** length_penalty
            end_score = end_score.masked_fill(end_item < 0, neg_inf).view(A, -1)  # [A, w*F]
            hypotheses += (end_item >= 0).sum()
            merged_score = torch.cat([pool_score[users], end_score], 1)
            merged_item = torch.cat([pool_item[users], end_item.view(A, -1)], 1)
            top_score, top_at = merged_score.topk(K, dim=1)  # [A, K]
            pool_score[users], pool_item[users] = top_score, merged_item.gather(1, top_at)

            # alive: the W best s + lp among tokens that can still grow
            grow = (flat_score.float()[:, None] + logp.masked_fill(~extends, neg_inf)).view(A, w * V)
            best, at = grow.topk(min(W, w * V), dim=1)  # [A, W]
            rows = torch.arange(A, device=dev)[:, None] * w + at // V  # [A, W] parent row in logp / the cache
            token = at % V  # [A, W]
            new_score = flat_score[rows] + logp[rows, token].double()
            dead = best == neg_inf
            new_score = new_score.masked_fill(dead, neg_inf)
        with _clock(stats, "trie_seconds", sync):
            new_nodes = trie.advance(flat_nodes[rows.view(-1)], token.view(-1)).view(rows.shape)
            new_nodes = new_nodes.masked_fill(dead, -1)
        if t == max_new - 1:
            break
        with _clock(stats, "search_seconds", sync):
            # a user is done when no alive beam can beat the k-th item of its pool
            bound = new_score.max(1).values / max_new ** length_penalty  # [A]
            done = pool_score[users, K - 1] >= bound
            if bool(done.all()):
                break
            keep = (~done).nonzero().squeeze(1)  # [A']
            users, nodes, score = users[keep], new_nodes[keep], new_score[keep]
            keep_rows = rows[keep].view(-1)  # [A' * W]
            cache = _reorder(cache, keep_rows)
            mask = torch.cat([mask[keep_rows], torch.ones_like(mask[keep_rows, :1])], 1)
            positions = next_pos[keep_rows]
            next_pos = positions + 1
            inputs = token[keep].view(-1, 1)
    pool_item = pool_item.masked_fill(pool_score == neg_inf, -1)
    stats["hypotheses"] = int(hypotheses)
    if timer is not None:
        for key in ("trie_seconds", "model_seconds", "search_seconds"):
            timer[key] = timer.get(key, 0.0) + stats[key]
    return pool_item.cpu().numpy(), pool_score.cpu().numpy(), stats
