"""Decoders: a trained model + samples -> ranked items. `eval.decoders` lists which run after every stage.

candidates  likelihood of each of the 1 + negatives candidates' identifiers (TALLRec; classic models: dot product)
generation  the EvoRec authors' ranked list of candidate titles, written greedily and matched exactly
beam        beam search constrained to a prefix trie of every item's identifier, over the whole catalogue
grounding   BIGRec: free generation, then the nearest items in the model's embedding space
"""

from recsim.decoders.base import CandidateLikelihood, Decoder, ListGeneration
from recsim.decoders.catalogue import ConstrainedBeam, Grounding

DECODERS = {cls.name: cls for cls in (CandidateLikelihood, ListGeneration, ConstrainedBeam, Grounding)}


def build_decoder(name: str, cfg) -> Decoder:
    if name not in DECODERS:
        raise ValueError(f"eval.decoders: {name!r} is not one of {', '.join(DECODERS)}")
    return DECODERS[name](cfg)


__all__ = ["DECODERS", "Decoder", "build_decoder"]
