"""Decoders: a trained model + samples -> ranked items. `eval.decoders` lists which run after every stage.

candidates  likelihood of each of the 1 + negatives candidates' identifiers (TALLRec; classic models: dot product)
generation  the EvoRec authors' ranked list of candidate titles, written greedily and matched exactly
beam        beam search constrained to a prefix trie of every item's identifier, over the whole catalogue
grounding   BIGRec: free generation, then the nearest items in the model's embedding space
l2d_global  L2D-G: the prompt's last hidden state against each item's mean state over the training samples
l2d_local   L2D-L: the same against item means inside the state's M nearest training samples
id_head     the L2D paper's ID classification head: a linear classifier over items on that hidden state
(settings of the last three: conf/decoder/<name>.yaml, or `decoder=<name>` with overrides; `decoder_settings`)
"""

from recsim.decoders.base import CandidateLikelihood, Decoder, ListGeneration, decoder_settings
from recsim.decoders.catalogue import ConstrainedBeam, Grounding
from recsim.decoders.id_head import IDHead
from recsim.decoders.latent import L2DGlobal, L2DLocal

DECODERS = {cls.name: cls for cls in (CandidateLikelihood, ListGeneration, ConstrainedBeam, Grounding, L2DGlobal,
                                      L2DLocal, IDHead)}


def build_decoder(name: str, cfg) -> Decoder:
    if name not in DECODERS:
        raise ValueError(f"eval.decoders: {name!r} is not one of {', '.join(DECODERS)}")
    return DECODERS[name](cfg)


__all__ = ["DECODERS", "Decoder", "build_decoder", "decoder_settings"]
