"""The item vocabulary: what the prompt shows for an item, kept apart from what the model emits for it.

`item_id=title` (TALLRec, BIGRec, EvoRec): the prompt shows titles and the model writes the title.
`item_id=semantic` (TIGER, PESO): the model writes the item's semantic ID, code tokens such as
`<a_12><b_3><c_200><d_5>` built by recsim (RQ-VAE or residual k-means over item-text embeddings,
recsim.items.semantic); `item_id=semantic_released`: the PESO authors' released index (its blocks carry no
titles, so there is nothing for recsim to embed). The prompt shows the items as `item_id.prompt_shows` says:
their titles, or their code strings.

The code tokens are new to the tokenizer: they are added (`tokenizer.add_tokens`) and the embedding matrix is
resized *before* LoRA is attached, so peft sees the final vocabulary; `item_id.train_embeddings` says which
embedding rows train with the adapter (`new_tokens`: only the added rows, through peft's
`trainable_token_indices`; `all`: embed_tokens and lm_head whole, as PESO's code does; `none`). Items whose
identifiers collide get a disambiguating token (`dedup`), and the collisions are counted in `report`.
`fingerprint()` joins every cache key that depends on what the model emits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from recsim.protocols.base import EncodedData

log = logging.getLogger(__name__)
KINDS = ("title", "semantic", "semantic_released")


@dataclass
class ItemVocabulary:
    kind: str
    prompt_texts: list[str]  # [N + 1] what the prompt shows for item i (index 0: padding)
    answers: list[str]  # [N + 1] what the model emits for item i (a title, or its code tokens joined)
    new_tokens: list[str] = field(default_factory=list)  # tokens to add to the tokenizer (code tokens)
    report: dict = field(default_factory=dict)  # collisions, codebook usage per level
    cut_answers: bool = True  # titles are cut to scoring.max_title_words; code strings never

    @property
    def emits_codes(self) -> bool:
        return self.kind != "title"

    def fingerprint(self) -> str:
        h = hashlib.sha1(json.dumps([self.kind, self.answers, self.prompt_texts, self.new_tokens]).encode())
        return h.hexdigest()[:16]


def build_vocabulary(cfg, data: EncodedData, cache_dir: str | Path) -> ItemVocabulary:
    """The vocabulary `cfg.item_id` describes for the whole catalogue of `data` (never a user sample: an item's
    identifier must not depend on who was sampled)."""
    item_cfg = cfg.get("item_id") or {"name": "title"}
    kind = item_cfg.get("name", "title")
    if kind not in KINDS:
        raise ValueError(f"item_id.name={kind!r} is not one of: {', '.join(KINDS)}")
    if kind == "title":
        dedup = item_cfg.get("dedup", "none")
        if dedup in (None, "none"):  # identical titles stay identical (candidate scoring never needs them apart)
            return ItemVocabulary("title", list(data.titles), list(data.titles))
        if dedup != "suffix":
            raise ValueError(f"item_id.dedup={dedup!r}: expected none or suffix for item_id=title")
        from recsim.models.prompts import distinct_titles

        # the answers as the ranker would cut them, each told apart: more words, else " (2)", " (3)"...
        cut = cfg.recipe.scoring.get("max_title_words") if cfg.get("recipe") else None
        shown = distinct_titles([str(t) for t in data.titles[1:]], cut)
        plain = [" ".join(str(t).split()[:cut]) if cut else str(t) for t in data.titles[1:]]
        report = {"collisions": {"items_in_collisions": sum(a != b for a, b in zip(shown, plain))}}
        return ItemVocabulary("title", list(data.titles), ["<pad>", *(" " + t for t in shown)], report=report,
                              cut_answers=False)
    from recsim.items import semantic

    if kind == "semantic_released":
        index = read_released_index(cfg.dataset)
        ids = semantic.from_released_index(index, data.item_ids[1:])
    else:
        emb = item_embeddings(cfg, [str(t) for t in data.titles[1:]], Path(cache_dir))
        method = item_cfg.get("method", "rqvae")
        settings = {k: _plain(item_cfg.get(k)) for k in ("method", "levels", "codebook_size", "seed", "encoder", method)}
        ids = semantic.semantic_ids_cached(emb, Path(cache_dir), settings, method=method,
                                           levels=int(item_cfg.get("levels", 4)),
                                           codebook_size=int(item_cfg.get("codebook_size", 256)),
                                           seed=int(item_cfg.get("seed", 0)),
                                           **dict(_plain(item_cfg.get(method)) or {}))  # item_id.rqvae / .rkmeans
    dedup = item_cfg.get("dedup", "colliding")
    codes = ["".join(ids.tokens(i, dedup)) for i in range(len(ids.codes))]
    shows = item_cfg.get("prompt_shows", "code")
    if shows not in ("code", "title"):
        raise ValueError(f"item_id.prompt_shows={shows!r}: expected code or title")
    answers = ["<pad>", *codes]
    prompts = answers if shows == "code" else list(data.titles)
    report = {"method": ids.method, "levels": ids.levels, "codebook_size": ids.codebook_size, "dedup": dedup,
              "collisions": ids.collisions, "usage": ids.usage, "distinct_answers": len(set(codes)),
              "items": len(codes)}
    if len(set(codes)) != len(codes):  # dedup must make every item's identifier unique
        raise RuntimeError(f"item_id: {len(codes) - len(set(codes))} items still share an identifier after dedup={dedup}")
    log.info("item vocabulary %s: %d items, %d in collisions (broken by a suffix token), usage %s", kind, len(codes),
             ids.collisions.get("items_in_collisions", 0), [round(u["share"], 3) for u in ids.usage])
    return ItemVocabulary(kind, prompts, answers, ids.vocabulary(dedup), report, cut_answers=False)


def item_embeddings(cfg, titles: list[str], cache_dir: Path):
    """Item-text embeddings [N, d] for recsim's own semantic IDs, cached by the texts and the encoder.
    `item_id.encoder`: minilm (the offline all-MiniLM-L6-v2 wheel) or backbone (the run's own base LLM, mean of
    its last hidden states, as PESO's authors embedded with Llama-3.2-1B)."""
    import numpy as np

    from recsim.items.embed import embed_texts, item_text

    encoder = cfg.item_id.get("encoder", "minilm")
    texts = [item_text(t) for t in titles]
    tag = encoder if encoder != "backbone" else f"backbone-{cfg.backbone.name}"
    key = hashlib.sha1(json.dumps([tag, texts]).encode()).hexdigest()[:16]
    path = cache_dir / "item_embeddings" / f"{key}.npy"
    if path.is_file():
        return np.load(path)
    if encoder == "backbone":
        from recsim.backbones.llm import load_base_model, load_tokenizer

        emb = embed_texts(texts, encoder="backbone", model=load_base_model(cfg.backbone, cache_dir),
                          tokenizer=load_tokenizer(cfg.backbone, cache_dir))
    elif encoder == "minilm":
        emb = embed_texts(texts, encoder="minilm")
    else:
        raise ValueError(f"item_id.encoder={encoder!r}: expected minilm or backbone")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npy")
    np.save(tmp, emb)
    tmp.replace(path)
    return emb


def read_released_index(dataset_cfg) -> dict[str, list[str]]:
    """The PESO authors' item -> semantic-ID index named by `dataset.semantic_index` (relative to data_dir)."""
    import gzip

    from recsim.data.load import default_data_dir
    from recsim.data.schema import DataFileError

    name = dataset_cfg.get("semantic_index")
    if not name:
        raise ValueError(f"item_id=semantic_released needs dataset.semantic_index (dataset {dataset_cfg.name!r} has "
                         "none): only PESO's released blocks (dataset=peso_cds, peso_games) ship an index")
    path = Path(dataset_cfg.get("data_dir") or default_data_dir()) / name
    if not path.is_file():
        raise DataFileError(f"{path} not found: PESO's released index (github.com/hsyoo32/peso, folder data/); see "
                            "shared/data/peso_blocks/README.md")
    try:
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise DataFileError(f"{path}: not a readable (gzip) JSON index ({exc})") from exc


def _plain(value):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
