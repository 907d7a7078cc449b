"""BIGRec's grounding: the model writes an identifier freely (greedy, no trie), and the written text is mapped to
the catalogue by L2 distance between LLM embeddings, nearest first.

    e(x) = h_L(x)[last token]        (the decoder's last layer, final norm applied, at x's last token)
    rank(i) by ||e(generated) - e(identifier_i)||_2

Choices:
- An item's text is `ranker.answer_ids(item)` without its EOS; the generated text is the ids the model wrote,
  up to (without) its first EOS. Both are embedded as token ids: the generated ids are not decoded and
  re-tokenised, so a model that writes an identifier exactly gets that identifier's own embedding.
- Embeddings come from the base model by default (`use_adapter=False`), as BIGRec embeds with the base LLM;
  `use_adapter=True` embeds with the active adapter(s). Queries and items must be embedded the same way.
- A generation that is empty (EOS first) has no text: its row is -1 items at distance inf.
- Distances are L2 (not squared): faiss IndexFlatL2 on CPU (its squared distances square-rooted), torch.cdist
  on a GPU.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch


@contextlib.contextmanager
def _embedding_mode(ranker, use_adapter: bool):
    was_training = ranker.training
    ranker.eval()  # no LoRA dropout in embeddings
    off = contextlib.nullcontext() if use_adapter or not hasattr(ranker.model, "disable_adapter") \
        else ranker.model.disable_adapter()
    try:
        with off:
            yield
    finally:
        ranker.train(was_training)


@torch.no_grad()
def _embed(ranker, sequences: list[list[int]], batch_size: int, use_adapter: bool) -> torch.Tensor:
    """e(x) of each token sequence [n, H] float32; sequences grouped by length so batches carry little padding."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [None] * len(sequences)
    with _embedding_mode(ranker, use_adapter):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = ranker._left_pad([sequences[i] for i in chunk])
            last = ranker._decode(ids, mask).last_hidden_state[:, -1].float()  # [b, H] left padding: last = real
            for i, row in zip(chunk, last):
                out[i] = row
    return torch.stack(out)


def item_embeddings(ranker, items: list[int], batch_size: int, use_adapter: bool = False) -> torch.Tensor:
    """e(identifier text) of each item [n, H] float32, on the ranker's device."""
    if batch_size < 1:
        raise ValueError(f"item_embeddings: batch_size={batch_size} must be >= 1")
    texts = []
    for item in items:
        ids = ranker.answer_ids(int(item))[:-1]  # answer_ids ends with EOS
        if not ids:
            raise ValueError(f"item_embeddings: item {item}'s identifier has no token besides EOS")
        texts.append(ids)
    return _embed(ranker, texts, batch_size, use_adapter)


@torch.no_grad()
def free_generation(ranker, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                    step=None) -> list[list[int]]:
    """Greedy unconstrained continuation of each prompt (token ids), cut before the first EOS.

    `step`: as in `constrained_beam_search` (default `ranker._step`: the active adapter); cached incremental
    decoding over left-padded batches, positions = cumsum(mask) - 1."""
    if max_new_tokens < 1:
        raise ValueError(f"free_generation: max_new_tokens={max_new_tokens} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"free_generation: batch_size={batch_size} must be >= 1")
    step = ranker._step if step is None else step
    eos, pad = ranker.tok.eos_token_id, ranker.tok.pad_token_id
    was_training = ranker.training
    ranker.eval()
    written: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            ids, mask = ranker._left_pad(prompts[start : start + batch_size])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logp, cache = step(ids, mask, positions, None)
            next_pos = positions[:, -1:] + 1
            done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
            tokens = []
            for t in range(max_new_tokens):
                nxt = logp.argmax(-1).masked_fill(done, pad)  # [b]
                tokens.append(nxt)
                done = done | (nxt == eos)
                if t == max_new_tokens - 1 or bool(done.all()):
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                logp, cache = step(nxt[:, None], mask, next_pos, cache)
                next_pos = next_pos + 1
            for row in torch.stack(tokens, 1).tolist():
                written.append(row[: row.index(eos)] if eos in row else row)
    finally:
        ranker.train(was_training)
    return written


def ground(ranker, samples, item_matrix: torch.Tensor, items: list[int], top_k: int, batch_size: int, *,
           max_new_tokens: int | None = None, step=None, use_adapter: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """BIGRec end to end: each sample's prompt (`ranker.prompt_ids(sample.history)`) continued greedily by
    `free_generation` (with `step`, default the active adapter), then `nearest_items`. `max_new_tokens`
    default: the longest identifier `answer_ids` gives over `items` (EOS included)."""
    if max_new_tokens is None:
        max_new_tokens = max(len(ranker.answer_ids(int(i))) for i in items)
    written = free_generation(ranker, [ranker.prompt_ids(s.history) for s in samples], max_new_tokens, batch_size,
                              step=step)
    return nearest_items(ranker, written, item_matrix, items, top_k, batch_size, use_adapter=use_adapter)


def nearest_items(ranker, written: list[list[int]], item_matrix: torch.Tensor, items: list[int], top_k: int,
                  batch_size: int, use_adapter: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The top_k items nearest each written text: (items [B, K] int64, L2 distances [B, K] float), nearest first.

    `written`: generated token ids (`free_generation`'s output); `item_matrix` [n, H]: `item_embeddings(ranker,
    items, ...)` with the same `use_adapter`; `items[j]` is row j's item id. Columns beyond the catalogue's size,
    and rows of empty generations, are -1 at distance inf."""
    if top_k < 1:
        raise ValueError(f"ground: top_k={top_k} must be >= 1")
    if len(items) != len(item_matrix):
        raise ValueError(f"ground: {len(items)} items but item_matrix has {len(item_matrix)} rows")
    B, k = len(written), min(top_k, len(items))
    out_items = np.full((B, top_k), -1, dtype=np.int64)
    out_dist = np.full((B, top_k), np.inf)
    rows = [b for b, ids in enumerate(written) if len(ids) > 0]
    if not rows:
        return out_items, out_dist
    queries = _embed(ranker, [list(written[b]) for b in rows], batch_size, use_adapter)  # [b, H]
    catalogue = np.asarray(items, dtype=np.int64)
    if item_matrix.is_cuda:
        dist = torch.cdist(queries.to(item_matrix.device), item_matrix.float())  # [b, n]
        d, j = dist.topk(k, dim=1, largest=False)
        d, j = d.cpu().numpy(), j.cpu().numpy()
    else:
        import faiss  # imported here: only grounding needs it

        index = faiss.IndexFlatL2(item_matrix.shape[1])
        index.add(np.ascontiguousarray(item_matrix.detach().float().cpu().numpy()))
        d, j = index.search(np.ascontiguousarray(queries.cpu().numpy()), k)
        d = np.sqrt(np.maximum(d, 0.0))  # IndexFlatL2 returns squared distances
    out_items[rows, :k], out_dist[rows, :k] = catalogue[j], d
    return out_items, out_dist
