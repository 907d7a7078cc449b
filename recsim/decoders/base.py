"""What a decoder is: a trained model + evaluation samples -> each sample's rank of its target.

A decoder ranks either the sample's 1 + negatives candidates (`pool = "candidates"`: likelihood scoring, the
EvoRec authors' list generation) or the whole catalogue (`pool = "catalogue"`: constrained beam search,
grounding, L2D). Every decoder goes through the method (`method.score_candidates`, `method.generate_rankings`,
`method.decode_step`, `method.decode_hidden`), so a method that combines adapters decodes as itself. `prepare`
runs once per stage before any `rank`; a decoder's own settings come from `decoder_settings`. `rank` returns 0-based ranks
(-1: the target is not in the decoder's list, which every metric scores 0) and counts the runner reports beside
the metrics (`invalid_share`: listed outputs that name no item; `short_list_share`: users whose list is shorter
than asked).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from recsim.eval.metrics import ranks_from_lists, ranks_from_scores

DECODER_CONF = Path(__file__).resolve().parents[1] / "conf" / "decoder"  # the `decoder` config group


def decoder_settings(cfg, name: str) -> DictConfig:
    """A decoder's settings: `cfg.decoder` when the run chose that decoder's group (`decoder=<name>` and its
    overrides), else the defaults of conf/decoder/<name>.yaml (just the name for a decoder without a file). The
    chosen group is merged over the file, so a config saved before a setting existed still has it."""
    path = DECODER_CONF / f"{name}.yaml"
    defaults = OmegaConf.load(path) if path.is_file() else OmegaConf.create({"name": name})
    chosen = cfg.get("decoder")
    if chosen is not None and chosen.get("name") == name:
        return OmegaConf.merge(defaults, chosen)
    return defaults


class Decoder(ABC):
    name = "decoder"
    pool = "candidates"  # "candidates": the sample's 1 + negatives | "catalogue": every item
    llm_only = True

    def __init__(self, cfg):
        self.cfg = cfg

    def pool_label(self) -> str:
        return f"1+{self.cfg.eval.negatives}" if self.pool == "candidates" else "all"

    def ks(self) -> list[int]:
        """The cut-offs this decoder's ranks support (a 3-title list has no HR@10)."""
        return list(self.cfg.eval.ks)

    def prepare(self, method, rec, protocol, stage, stage_dir) -> None:
        """Called once per stage before any `rank`, with the model after that stage and the folder the stage is
        written to (None: nothing is saved): what a decoder derives from the stage's training data (L2D's memory)."""

    @abstractmethod
    def rank(self, method, rec, samples, candidates: np.ndarray, progress=None) -> tuple[np.ndarray, Counter]:
        """0-based rank of each sample's target (-1: not listed) and the counts `count_rows` reports."""

    def count_rows(self, counts: Counter) -> dict[str, float]:
        """Figures reported beside the metrics (metric name -> value) from the summed counts of every group."""
        return {}


class CandidateLikelihood(Decoder):
    """Each candidate's identifier scored by its likelihood after the prompt (recsim.models.llm_ranker); classic
    models score by dot product. Ranks among the 1 + negatives candidates; the target is column 0."""

    name = "candidates"
    llm_only = False

    def rank(self, method, rec, samples, candidates, progress=None):
        step = max(64, self.cfg.eval.batch_size)  # progress in steps of 64 users, or of one pass if passes are larger
        scores = []
        for start in progress(range(0, len(samples), step)) if progress else range(0, len(samples), step):
            scores.append(method.score_candidates(rec, samples[start : start + step], candidates[start : start + step],
                                                  self.cfg.eval.batch_size))
        return ranks_from_scores(np.concatenate(scores)), Counter(users=len(samples))


class ListGeneration(Decoder):
    """The EvoRec authors' evaluation: the prompt carries the (shuffled) candidate titles, the model greedily writes
    a ranked list of titles, matched exactly (recsim.models.llm_ranker.LLMRanker.generate_rankings)."""

    name = "generation"

    def ks(self):
        return [k for k in self.cfg.eval.ks if k <= self.cfg.recipe.generation.list_length]

    def rank(self, method, rec, samples, candidates, progress=None):
        if getattr(rec, "vocab", None) is not None and rec.vocab.emits_codes:
            raise ValueError("eval.decoders=[generation] writes candidate titles: it needs item_id=title "
                             "(use beam for semantic IDs)")
        ranks, stats = method.generate_rankings(rec, samples, candidates, self.cfg.recipe.generation, self.cfg.seed,
                                                self.cfg.eval.batch_size)
        return ranks, Counter(users=len(samples), **stats)

    def count_rows(self, counts):
        return {"invalid_share": counts["invalid"] / max(1, counts["generated"]),
                "no_valid_item_share": counts["empty_lists"] / max(1, counts["users"])}


def ranks_of_lists(lists: np.ndarray, samples, num_items: int, top_k: int) -> tuple[np.ndarray, Counter]:
    """Ranks from catalogue decoders' item lists [n, K] (-1 = no item), with the counts every such decoder reports:
    ids outside the catalogue (`invalid`, which a trie makes impossible: counted, not assumed) and short lists."""
    lists = np.asarray(lists)
    valid = (lists >= 1) & (lists <= num_items)
    invalid = int(((lists != -1) & ~valid).sum())
    cleaned = [[int(i) for i in row[ok]] for row, ok in zip(lists, valid)]
    counts = Counter(users=len(samples), listed=int((lists != -1).sum()), invalid=invalid,
                     short_lists=sum(len(row) < top_k for row in cleaned))
    return ranks_from_lists(cleaned, [s.target for s in samples]), counts


class CatalogueDecoder(Decoder):
    pool = "catalogue"

    @abstractmethod
    def top_k(self) -> int:
        """How many items the decoder lists per user."""

    def ks(self):
        return [k for k in self.cfg.eval.ks if k <= self.top_k()]

    def count_rows(self, counts):
        return {"invalid_share": counts["invalid"] / max(1, counts["listed"]),
                "short_list_share": counts["short_lists"] / max(1, counts["users"])}
