"""The intent router: a request text goes to "recommend" (a top-K list) or "explain" (the list with a reason per
item), the seed's "task routing" (a small classifier sends a query to recommend or explain).

    features   x = MiniLM sentence embedding of the text (`features: minilm`, the default; 384 dims, L2-normalised)
               or signed hashed word 1- and 2-grams (`features: hashed`, `hash_dims` buckets, L2-normalised; no
               encoder needed). The choice is explicit: a missing MiniLM wheel is an error naming
               `router.features=hashed`, never a silent switch to other features.
    model      multinomial logistic regression, p(intent | x) = softmax(W x + b)  (two intents: logistic regression)
    training   the labelled examples of recsim/conf/explain.yaml (`router.examples`: intent -> texts), minimising
               mean cross-entropy + l2 * ||W||^2 by full-batch L-BFGS in float64 from W = 0, b = 0
    route      (argmax intent, its probability)

Deterministic without a seed: nothing is drawn at random (zero start, full batch, fixed iterations; hashed features
use crc32, not Python's per-process salted `hash`), so the same examples give the same router in every process.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

FEATURES = ("minilm", "hashed")


def hashed_ngrams(texts: Sequence[str], dims: int) -> np.ndarray:
    """[n, dims] signed counts of each text's word 1- and 2-grams hashed into `dims` buckets (crc32: the same in
    every process), rows L2-normalised. Words as the explanation metrics tokenise them."""
    from recsim.explain.metrics import tokenize

    out = np.zeros((len(texts), dims), np.float64)
    for row, text in enumerate(texts):
        words = tokenize(text)
        for gram in [*words, *(f"{a} {b}" for a, b in zip(words, words[1:]))]:
            code = zlib.crc32(gram.encode())
            out[row, code % dims] += 1.0 if (code >> 31) & 1 else -1.0  # the sign bit halves collision bias
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)


def featurise(texts: Sequence[str], features: str, hash_dims: int = 4096) -> np.ndarray:
    """[n, d] float64 features of `texts`."""
    texts = [str(t) for t in texts]
    if features == "hashed":
        return hashed_ngrams(texts, hash_dims)
    if features != "minilm":
        raise ValueError(f"router.features={features!r}: expected one of {', '.join(FEATURES)}")
    from recsim.items.embed import embed_texts

    try:
        return embed_texts(texts, "minilm").astype(np.float64)  # [n, 384]
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise ModuleNotFoundError(f"router.features=minilm: {exc}; or route on hashed word n-grams with "
                                  "router.features=hashed") from None


class IntentRouter:
    """A trained router: `route(text) -> (intent, probability)`. Build it with `IntentRouter.fit`."""

    def __init__(self, intents: list[str], weight: np.ndarray, bias: np.ndarray, features: str, hash_dims: int):
        self.intents, self.weight, self.bias = intents, weight, bias  # weight [K, d], bias [K]
        self.features, self.hash_dims = features, hash_dims

    @classmethod
    def fit(cls, examples: Mapping[str, Sequence[str]], features: str = "minilm", l2: float = 1e-3,
            max_iter: int = 200, hash_dims: int = 4096) -> "IntentRouter":
        intents = list(examples)
        if len(intents) < 2 or any(not examples[i] for i in intents):
            raise ValueError(f"router.examples: need >= 2 intents with >= 1 text each, got "
                             f"{ {i: len(examples[i] or []) for i in intents} }")
        texts = [str(t) for i in intents for t in examples[i]]
        labels = torch.tensor([k for k, i in enumerate(intents) for _ in examples[i]])
        x = torch.from_numpy(featurise(texts, features, hash_dims))  # [n, d]
        weight = torch.zeros(len(intents), x.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(len(intents), dtype=torch.float64, requires_grad=True)
        solver = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                                   tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def objective():
            solver.zero_grad()
            # mean cross-entropy of softmax(W x + b) + l2 ||W||^2 (the bias is not shrunk)
            loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, labels) + l2 * weight.square().sum()
            loss.backward()
            return loss

        solver.step(objective)
        return cls(intents, weight.detach().numpy(), bias.detach().numpy(), features, hash_dims)

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """[n, K] p(intent | text), columns in `self.intents` order."""
        logits = featurise(texts, self.features, self.hash_dims) @ self.weight.T + self.bias  # [n, K]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def route(self, text: str) -> tuple[str, float]:
        """The most probable intent of `text` and its probability."""
        p = self.probabilities([text])[0]
        best = int(p.argmax())
        return self.intents[best], float(p[best])


def build_router(cfg) -> IntentRouter:
    """The router `cfg` (explain.yaml's `router` node) describes, trained on its examples."""
    examples = {intent: list(texts) for intent, texts in cfg.examples.items()}
    return IntentRouter.fit(examples, cfg.features, float(cfg.l2), int(cfg.max_iter), int(cfg.hash_dims))
