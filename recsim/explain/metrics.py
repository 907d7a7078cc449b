"""How close an explanation is to a reference text (the teacher's): BLEU-4, ROUGE-L and MiniLM embedding cosine.

Each score compares surface text or one sentence vector; none says whether an explanation is true of the user or
the item, and none is BERTScore (the figure the seed reports beside BLEU-4): a result row names the function that
made it (`METRICS`).

One tokenisation for BLEU and ROUGE-L (`tokenize`): lower-cased, tokens are the runs of word characters
(Unicode letters, digits, underscore); whitespace and punctuation only separate tokens and are never tokens
themselves ("It's great!" -> it, s, great). The embedding cosine reads the raw text (MiniLM has its own tokenizer).

Written here rather than taken from a library: torchmetrics' BLEU returns 0 whenever some n-gram order has no
match even with `smooth=True` (so short sentences cannot be smoothed), and nltk / sacrebleu are not installed.
tests/test_explain_text.py checks these functions against torchmetrics where its definitions agree.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

WORD = re.compile(r"\w+")
SMOOTHING = ("none", "method1")

METRICS = {  # result name -> what the number is
    "bleu4_corpus": "BLEU-4 over the corpus (Papineni et al. 2002: pooled clipped n-gram counts, uniform weights, "
                    "brevity penalty; unsmoothed)",
    "bleu4_sentence": "mean over pairs of sentence BLEU-4 (Chen & Cherry 2014 smoothing method 1, epsilon 0.1)",
    "rougeL_f": "mean over pairs of ROUGE-L F-measure (LCS of tokens; beta = 1, F1, unless stated)",
    "minilm_cosine": "mean over pairs of the cosine of all-MiniLM-L6-v2 sentence embeddings (not BERTScore)",
}


def tokenize(text: str) -> list[str]:
    """The tokens BLEU and ROUGE-L count: lower-cased runs of word characters; punctuation and whitespace split."""
    return WORD.findall(str(text).lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _as_reference_lists(references) -> list[list[str]]:
    """Each hypothesis's references: a string is one reference, a list of strings several."""
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _bleu_counts(hypothesis: str, references: list[str], max_n: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(clipped matches per order, hypothesis n-grams per order, hypothesis length, closest reference length)."""
    hyp = tokenize(hypothesis)
    refs = [tokenize(r) for r in references]
    if not refs:
        raise ValueError("BLEU: a hypothesis without any reference")
    matches, totals = np.zeros(max_n), np.zeros(max_n)
    for n in range(1, max_n + 1):
        counts = _ngrams(hyp, n)
        most = Counter()  # an n-gram is credited at most as often as one reference holds it (the "clipping")
        for ref in refs:
            most |= _ngrams(ref, n)
        matches[n - 1] = sum(min(c, most[g]) for g, c in counts.items())
        totals[n - 1] = sum(counts.values())
    # r: the reference length closest to the hypothesis's, the shorter one on a tie (Papineni et al.; NLTK)
    closest = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    return matches, totals, len(hyp), closest


def _bleu(matches: np.ndarray, totals: np.ndarray, hyp_len: int, ref_len: int, smoothing: str,
          epsilon: float) -> float:
    """BLEU = BP * exp(mean_n log p_n) over the orders n the hypothesis has (totals_n > 0), p_n = matches_n /
    totals_n, BP = 1 if c > r else exp(1 - r/c). Orders longer than the hypothesis are left out of the mean
    (sacrebleu's "effective order"), so a 3-word text equal to its reference scores 1, not 0."""
    if smoothing not in SMOOTHING:
        raise ValueError(f"BLEU smoothing={smoothing!r}: expected one of {', '.join(SMOOTHING)}")
    if hyp_len == 0 or matches[0] == 0:
        return 0.0  # no word in common: 0 whatever the smoothing (as NLTK)
    had = totals > 0
    matches, totals = matches[had], totals[had]
    if smoothing == "method1":
        matches = np.where(matches == 0, epsilon, matches)  # Chen & Cherry 2014, method 1: p_n = eps / l_n if m_n = 0
    elif (matches == 0).any():
        return 0.0
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return float(brevity * math.exp(np.log(matches / totals).mean()))  # uniform weights w_n = 1 / (orders used)


def sentence_bleu(hypothesis: str, references: str | Sequence[str], max_n: int = 4, smoothing: str = "method1",
                  epsilon: float = 0.1) -> float:
    """BLEU-4 of one hypothesis against its reference(s), in [0, 1]: modified (clipped) n-gram precisions for
    n = 1..4 with uniform weights, geometric mean, brevity penalty against the closest reference length; a
    hypothesis shorter than 4 tokens uses the orders it has (effective order).

    Smoothing (default Chen & Cherry's method 1, epsilon = 0.1, as NLTK's SmoothingFunction().method1): an order
    with no match counts epsilon matches, so one missing 4-gram does not zero a short sentence; `smoothing="none"`
    is Papineni's definition. It measures word-sequence overlap with the reference, not whether the text is right,
    fluent or about the item; a paraphrase can score near 0."""
    return _bleu(*_bleu_counts(hypothesis, _as_reference_lists([references])[0], max_n), smoothing, epsilon)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], max_n: int = 4,
                smoothing: str = "none", epsilon: float = 0.1) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002): matches and n-gram totals summed over all pairs first, the brevity
    penalty from the summed lengths (c = sum of hypothesis lengths, r = sum of closest reference lengths), then one
    BLEU; not the mean of sentence BLEUs. Unsmoothed by default (the corpus pools enough n-grams); an order no
    hypothesis is long enough to have is left out.
    `references[i]`: the reference text of hypothesis i, or a list of them. Word-sequence overlap only."""
    hypotheses, references = list(hypotheses), _as_reference_lists(references)
    if len(hypotheses) != len(references):
        raise ValueError(f"BLEU: {len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("BLEU of an empty corpus")
    matches, totals, c, r = np.zeros(max_n), np.zeros(max_n), 0, 0
    for hyp, refs in zip(hypotheses, references):
        m, t, h_len, r_len = _bleu_counts(hyp, refs, max_n)
        matches, totals, c, r = matches + m, totals + t, c + h_len, r + r_len
    return _bleu(matches, totals, c, r, smoothing, epsilon)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (in order, not necessarily contiguous) of two token lists."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(hypothesis: str, reference: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure (Lin 2004) of one hypothesis against one reference, in [0, 1]:
    P = LCS / |hypothesis|, R = LCS / |reference|, F = (1 + beta^2) P R / (R + beta^2 P).

    beta = 1 (F1) by default, as the rouge-score package and torchmetrics compute it; Lin's paper sets beta large
    (recall only), which `beta` gives. It rewards the reference's words in the reference's order, nothing else."""
    hyp, ref = tokenize(hypothesis), tokenize(reference)
    common = lcs_length(hyp, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(hyp), common / len(ref)
    return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


def mean_rouge_l(hypotheses: Sequence[str], references: Sequence[str], beta: float = 1.0) -> float:
    """ROUGE-L F-measure averaged over (hypothesis, reference) pairs."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"ROUGE-L: {len(hypotheses)} hypotheses for {len(references)} references (need >= 1 pair)")
    return float(np.mean([rouge_l(h, r, beta) for h, r in zip(hypotheses, references)]))


def embedding_cosines(hypotheses: Sequence[str], references: Sequence[str], batch_size: int = 64,
                      device: str = "cpu") -> np.ndarray:
    """[n] cosine similarity of each pair's all-MiniLM-L6-v2 sentence embeddings (recsim.items.embed: mean-pooled,
    L2-normalised, so the cosine is the dot product), in [-1, 1].

    One vector per text: meaning-level closeness of the two texts as MiniLM sees it, insensitive to wording that
    BLEU punishes. It is not BERTScore (no token-level greedy matching, no IDF weights, no baseline rescaling), and
    a fluent text about something else can still score well above 0."""
    from recsim.items.embed import embed_texts

    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"embedding cosine: {len(hypotheses)} hypotheses for {len(references)} references "
                         "(need >= 1 pair)")
    vectors = embed_texts([*hypotheses, *references], "minilm", batch_size=batch_size, device=device)  # [2n, 384]
    hyp, ref = vectors[: len(hypotheses)], vectors[len(hypotheses):]
    return (hyp * ref).sum(axis=1).astype(np.float64)


def explanation_scores(hypotheses: Sequence[str], references: Sequence[str], beta: float = 1.0,
                       embeddings: bool = True) -> dict[str, float]:
    """Every score of `METRICS` for explanations against reference texts (one reference each); `embeddings=False`
    leaves out the MiniLM cosine (no encoder to load)."""
    hypotheses, references = list(hypotheses), list(references)
    scores = {"bleu4_corpus": corpus_bleu(hypotheses, references),
              "bleu4_sentence": float(np.mean([sentence_bleu(h, r) for h, r in zip(hypotheses, references)])),
              "rougeL_f": mean_rouge_l(hypotheses, references, beta)}
    if embeddings:
        scores["minilm_cosine"] = float(embedding_cosines(hypotheses, references).mean())
    return scores
