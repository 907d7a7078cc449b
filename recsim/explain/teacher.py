"""Teacher explanations: an LLM recommender writes a short reason for a (history, item) pair.

The prompt (`explanation.prompt`, conf/method/distill.yaml) shows the user's newest `max_history` items, numbered,
oldest first, as the teacher's own prompts show them (`rec.module.titles`: titles, or codes for a semantic-ID
teacher that shows codes), and the item; the model continues it greedily for at most `max_new_tokens` tokens
(recsim.decoders.grounding.free_generation: cached, batched over left-padded prompts, through the run's method's
`decode_step`, so a multi-adapter teacher writes as itself). The text is cut at EOS and at its first line break and
stripped. Identical prompts are generated once. Greedy decoding draws no random numbers; torch's RNG is still
seeded (`explanation.seed`) around it and restored after.

With `tiny_llama` (random weights) the text is gibberish: good for tests, never an explanation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from recsim.models.prompts import shorten
from recsim.protocols.base import Sample

DEFAULTS_FILE = Path(__file__).resolve().parents[1] / "conf" / "method" / "distill.yaml"


def explanation_settings(cfg=None) -> DictConfig:
    """The explanation settings: `cfg.method.explanation` of a run config, else `cfg` itself (the node, or some of
    its keys), merged over conf/method/distill.yaml's defaults (None: the defaults)."""
    defaults = OmegaConf.load(DEFAULTS_FILE).explanation
    OmegaConf.update(defaults, "seed", 0)  # the file's ${seed} needs a run config around it
    if cfg is None:
        return defaults
    node = OmegaConf.select(cfg, "method.explanation") if "method" in cfg else cfg
    if node is None:
        raise ValueError("explanation settings: this run config has no method.explanation (not a method=distill run); "
                         "pass the settings themselves")
    merged = OmegaConf.merge(defaults, OmegaConf.create(OmegaConf.to_container(node, resolve=True)))
    for key in ("{history}", "{item}"):
        if key not in merged.prompt:
            raise ValueError(f"explanation.prompt={merged.prompt!r}: expected a string containing {key}")
    return merged


def explanation_prompt(history_texts: list[str], item_text: str, settings) -> str:
    lines = "\n".join(f"{i + 1}. {shorten(t, settings.max_title_words)}"
                      for i, t in enumerate(history_texts[-settings.max_history :]))
    return settings.prompt.format(history=lines, item=shorten(item_text, settings.max_title_words))


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


@torch.no_grad()
def generate_explanations(rec, samples: list[Sample], items: list[int], cfg=None, method=None) -> list[str]:
    """The teacher's reason for recommending items[i] to the user of samples[i] (their history), one string each.

    `rec`: an LLMRecommender (e.g. recsim.runs.load_stage(...).rec); `cfg`: explanation settings (see
    `explanation_settings`); `method`: the run's method, whose `decode_step` writes (None: the active adapter)."""
    from recsim.decoders.grounding import free_generation

    if len(samples) != len(items):
        raise ValueError(f"generate_explanations: {len(samples)} samples but {len(items)} items")
    if getattr(rec, "kind", None) != "llm":
        raise ValueError(f"generate_explanations needs an LLM recommender, got kind={getattr(rec, 'kind', None)!r}")
    settings = explanation_settings(cfg)
    module = rec.module
    prompts = [explanation_prompt([module.titles[i] for i in s.history], module.titles[int(item)], settings)
               for s, item in zip(samples, items)]
    distinct = list(dict.fromkeys(prompts))
    ids = [module.tok(p, add_special_tokens=False).input_ids[-settings.max_prompt_tokens :] for p in distinct]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths a batch: little padding
    step = method.decode_step(rec) if method is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(settings.seed))
        written = free_generation(module, [ids[i] for i in order], int(settings.max_new_tokens),
                                  int(settings.batch_size), step=step)
    text = {distinct[i]: first_line(module.tok.decode(w, skip_special_tokens=True)) for i, w in zip(order, written)}
    return [text[p] for p in prompts]
