"""Decoders that rank the whole catalogue from what the model generates: constrained beam search over the prefix
trie of every item's identifier (PESO, D3, TIGER), and BIGRec's grounding of a free generation. Settings:
`recipe.beam`, `recipe.grounding` (recsim/conf/recipe/generative.yaml).

Choices: items the user already interacted with are not removed from the lists (PESO's, D3's and BIGRec's
evaluations do not remove them; the target may be a repeat). The trie and the grounding matrix are built once
per model and kept on the recommender (`rec.decoder_cache`): they depend on the vocabulary and, for grounding,
on the base model only.
"""

from __future__ import annotations


import numpy as np
import torch

from recsim.decoders.base import CatalogueDecoder, ranks_of_lists


def _cache(rec) -> dict:
    if not hasattr(rec, "decoder_cache"):
        rec.decoder_cache = {}
    return rec.decoder_cache


class ConstrainedBeam(CatalogueDecoder):
    """Beam search (`recipe.beam.beam_size`) whose every step may only extend a prefix of a real item's identifier:
    returns the top-K distinct real items by sequence log-probability (recsim.decoders.beam)."""

    name = "beam"

    def top_k(self):
        return int(self.cfg.recipe.beam.top_k)

    def trie(self, rec):
        from recsim.decoders.trie import ItemTrie

        cache = _cache(rec)
        if "trie" not in cache:
            cache["trie"] = ItemTrie.from_ranker(rec.module, list(range(1, rec.num_items + 1)))
            if cache["trie"].collisions:
                raise RuntimeError(f"{len(cache['trie'].collisions)} groups of items share an identifier (e.g. "
                                   f"{cache['trie'].collisions[0]}): the beam could not tell them apart; set "
                                   "item_id.dedup=suffix (titles) or item_id.dedup=colliding (semantic IDs)")
        return cache["trie"].to(rec.module.device)

    @torch.no_grad()
    def rank(self, method, rec, samples, candidates, progress=None):
        from recsim.decoders.beam import constrained_beam_search

        b = self.cfg.recipe.beam
        trie, step, module = self.trie(rec), method.decode_step(rec), rec.module
        was_training = module.training
        module.eval()
        lists, self.timer = [], {}  # seconds in trie ops / model steps / search, for the decode benchmark
        batches = range(0, len(samples), int(b.batch_size))
        for start in progress(batches) if progress else batches:
            chunk = samples[start : start + int(b.batch_size)]
            items, _, _ = constrained_beam_search(step, [module.prompt_ids(s.history) for s in chunk], trie,
                                                  beam_size=int(b.beam_size), top_k=int(b.top_k),
                                                  max_new_tokens=b.get("max_new_tokens"),
                                                  pad_id=module.tok.pad_token_id,
                                                  length_penalty=float(b.length_penalty), device=module.device,
                                                  timer=self.timer)
            lists.append(items)
        module.train(was_training)
        return ranks_of_lists(np.concatenate(lists), samples, rec.num_items, self.top_k())


class Grounding(CatalogueDecoder):
    """BIGRec: greedy free generation, embedded like every item's identifier (last layer, last token), then the
    items nearest in L2 (recsim.decoders.grounding)."""

    name = "grounding"

    def top_k(self):
        return int(self.cfg.recipe.grounding.top_k)

    @torch.no_grad()
    def rank(self, method, rec, samples, candidates, progress=None):
        from recsim.decoders.grounding import ground, item_embeddings

        g = self.cfg.recipe.grounding
        cache = _cache(rec)
        items = list(range(1, rec.num_items + 1))
        if "grounding" not in cache:  # BIGRec embeds with the base model: the same matrix at every stage
            cache["grounding"] = item_embeddings(rec.module, items, int(g.batch_size))
        lists, _ = ground(rec.module, samples, cache["grounding"], items, self.top_k(), int(g.batch_size),
                          max_new_tokens=int(g.max_new_tokens), step=method.decode_step(rec))
        return ranks_of_lists(np.asarray(lists), samples, rec.num_items, self.top_k())
