"""What the runner and the methods see of a model: one small interface over the LLM ranker and the
classic sequential models, so a method never branches on the backbone's type."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from recsim.backbones import lora as lora_ops
from recsim.backbones.adapters import Adapters
from recsim.backbones.llm import load_base_model, load_tokenizer, weights_hash
from recsim.items.vocab import build_vocabulary
from recsim.models.llm_ranker import LLMRanker
from recsim.protocols.base import EncodedData, Sample


def package_versions() -> dict:
    import lightning, peft, transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "lightning": lightning.__version__}


def add_item_tokens(tokenizer, base, vocab, seed: int) -> list[int]:
    """Adds the vocabulary's new tokens (semantic-ID codes) to the tokenizer and resizes the base model's embeddings
    (new rows drawn around the old rows' mean, seeded); returns their ids ([] for titles). A new token is a
    whole unit to the tokenizer, so "<a_1><b_2>" tokenises to exactly those two ids."""
    if not vocab.new_tokens:
        return []
    added = tokenizer.add_tokens(list(vocab.new_tokens))
    if added != len(vocab.new_tokens):
        raise RuntimeError(f"item vocabulary: {len(vocab.new_tokens) - added} of its tokens already exist in the "
                           "backbone's tokenizer; they would not be new embedding rows")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        base.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(list(vocab.new_tokens))


class LLMRecommender:
    kind = "llm"
    can_rank_all = False  # scoring every catalogue title per user is not affordable; candidates only

    def __init__(self, cfg, data: EncodedData, cache_dir: str | Path, seed: int):
        self.cfg = cfg
        bb = cfg.backbone
        self.cache_dir = Path(cache_dir)  # method-level caches (EWC's Fisher in a λ sweep)
        self.num_items = data.num_items
        self.tokenizer = load_tokenizer(bb, cache_dir)
        self.vocab = build_vocabulary(cfg, data, cache_dir)  # what prompts show and what the model emits per item
        base = load_base_model(bb, cache_dir, seed=seed)
        self.base_hash = weights_hash(base)
        new_ids = add_item_tokens(self.tokenizer, base, self.vocab, seed)  # before LoRA: peft sees the final vocabulary
        train = cfg.get("item_id", {}).get("train_embeddings", "new_tokens") if new_ids else "none"
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # LoRA's A matrices are drawn at random: seed them
            model = lora_ops.add_lora(base, bb.lora, trainable_tokens=new_ids if train == "new_tokens" else None,
                                      train_embeddings=train == "all")
        self.module = LLMRanker(model, self.tokenizer, self.vocab.prompt_texts, cfg.recipe.prompt, cfg.recipe.scoring,
                                cfg.trainer.base, pad_to_multiple_of=cfg.trainer.get("pad_to_multiple_of"),
                                answers=None if self.vocab.cut_answers else self.vocab.answers)
        self.initial = lora_ops.snapshot(model)

    @property
    def model(self):
        return self.module.model

    @property
    def history_shown(self) -> int:
        """How many of a sample's newest history items the prompt shows."""
        return int(self.cfg.recipe.prompt.max_history)

    def collate(self, samples: list[Sample], width: int | None = None) -> dict:
        return self.module.collate(samples, width)

    def sample_length(self, sample: Sample) -> int:
        return self.module.sample_length(sample)

    def schedule(self, stage_index: int, validated: bool = True):
        """(optimiser settings, batch size) of stage 0's training or of a later update (`validated`: unused)."""
        t = self.cfg.trainer
        return t["base" if stage_index == 0 else "update"], t.batch_size  # t.update is DictConfig.update

    def set_optim(self, optim_cfg) -> None:
        self.module.optim_cfg = optim_cfg

    def set_trainable(self, layers: set[int] | None = None, adapter: str = "default") -> int:
        return lora_ops.set_trainable(self.model, layers, adapter)

    def reset_to_initial(self) -> None:
        lora_ops.load_snapshot(self.model, self.initial)

    def add_loss_term(self, term) -> None:
        self.module.loss_terms.append(term)

    def clear_loss_terms(self) -> None:
        self.module.loss_terms.clear()

    def tracked_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Parameters an update could change: every adapter weight and anything set trainable, and parameters a
        method keeps on the ranker outside the model (SD-LoRA's magnitudes, as `module.<name>`)."""
        tracked = {n: p for n, p in self.model.named_parameters() if "lora_" in n or p.requires_grad}
        tracked.update({f"module.{n}": p for n, p in self.module.named_parameters() if not n.startswith("model.")})
        return tracked

    def score_candidates(self, samples: list[Sample], candidates: np.ndarray, batch_size: int) -> np.ndarray:
        return self.module.score_candidates(samples, candidates, batch_size)

    def save(self, folder: Path) -> None:
        """peft's own adapter format (loadable by other tools) plus what is needed to detect drift."""
        Adapters(self.model).save(folder / "adapter")  # every adapter: "default" in adapter/, others in adapter/<name>
        meta = {"backbone": self.cfg.backbone.name, "source": self.cfg.backbone.source,
                "pretrained": self.cfg.backbone.get("pretrained"), "base_weights_hash": self.base_hash,
                "versions": package_versions()}
        meta["item_vocabulary"] = {"kind": self.vocab.kind, "fingerprint": self.vocab.fingerprint(),
                                   "tokens": len(self.tokenizer)}
        (folder / "adapter" / "recsim_meta.json").write_text(json.dumps(meta, indent=2))
        if self.vocab.new_tokens:  # the grown tokenizer beside the adapter: the stage loads in any tool
            self.tokenizer.save_pretrained(str(folder / "tokenizer"))

    def load(self, folder: Path) -> None:
        meta = json.loads((folder / "adapter" / "recsim_meta.json").read_text())
        if meta["base_weights_hash"] != self.base_hash:
            raise RuntimeError(f"{folder}/adapter was trained on other base weights ({meta['base_weights_hash']} "
                               f"!= {self.base_hash}); refusing to resume on a different backbone")
        saved = meta.get("item_vocabulary", {"kind": "title"})  # stages written before vocabularies: titles
        if saved.get("kind") != self.vocab.kind or saved.get("fingerprint", self.vocab.fingerprint()) != \
                self.vocab.fingerprint():
            raise RuntimeError(f"{folder}/adapter was trained with another item vocabulary ({saved}) than this "
                               f"run's ({self.vocab.kind}, {self.vocab.fingerprint()}): its item tokens would mean "
                               "other items")
        Adapters(self.model).load(folder / "adapter")


class SequentialRecommender:
    """SASRec / GRU4Rec / BPR-MF on the same protocol; scores by dot product, can rank the whole catalogue.

    Their schedule (lr, epochs, batch size, gradient clipping, early stopping) lives in the backbone
    config: it has nothing in common with an LLM's LoRA schedule. Every backbone key that names an
    argument of the model's constructor is passed to it (the others drive training).
    ``backbone.early_stopping: {metric, patience, max_epochs}`` (null: off, train ``epochs``) trains up to
    ``max_epochs``, validating after every epoch; the runner passes the validation samples and
    :meth:`callbacks` to the Trainer.
    """

    kind = "sequential"
    can_rank_all = True

    def __init__(self, cfg, data: EncodedData, seed: int):
        import inspect

        from recsim.models.sequential import collate_samples
        from recsim.models.sequential_module import MODELS, SequentialRecModule, build_sequential

        bb = cfg.backbone
        self.cfg = cfg
        self._collate = collate_samples
        if bb.model not in MODELS:
            raise ValueError(f"backbone.model={bb.model!r}: valid sequential models are {sorted(MODELS)}")
        accepted = set(inspect.signature(MODELS[bb.model]).parameters) - {"num_items"}
        args = {k: bb[k] for k in accepted if k in bb}
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = build_sequential(bb.model, data.num_items, **args)
        stop = bb.get("early_stopping")
        self.module = SequentialRecModule(
            model, loss=bb.loss, lr=bb.lr, weight_decay=bb.weight_decay, seed=seed,
            valid_metric=stop.metric if stop else "MRR@10", grad_clip=bb.get("grad_clip"),
            seen_sequences=data.sequences, length_buckets=bool(bb.get("length_buckets", True)),
        )
        self.initial = {k: v.clone() for k, v in self.module.state_dict().items()}
        self.loss_terms: list = []

    def callbacks(self) -> list:
        """Fresh Lightning callbacks for one fit: early stopping + best-epoch restore, or [] when off."""
        from recsim.models.sequential_module import early_stopping_callbacks

        stop = self.cfg.backbone.get("early_stopping")
        return early_stopping_callbacks(stop.metric, stop.patience) if stop else []

    @property
    def history_shown(self) -> int | None:
        """How many of a sample's newest history items the model reads (None: all of them)."""
        return self.cfg.backbone.get("max_len")

    def schedule(self, stage_index: int, validated: bool = True):
        """With early stopping and a validation split, `max_epochs` is only an upper bound; a fit with no
        validation split to stop on (e.g. a stage whose validation targets lie in its future) trains `epochs`."""
        bb = self.cfg.backbone
        stop = bb.get("early_stopping")
        epochs = stop.max_epochs if stop and validated else bb.epochs
        return OmegaConf.create({"lr": bb.lr, "epochs": epochs, "max_steps": None}), bb.batch_size

    def collate(self, samples):
        return self._collate(samples, self.cfg.backbone.max_len)

    def set_optim(self, optim) -> None:
        self.module.lr = optim["lr"]

    def set_trainable(self, layers=None, adapter=None) -> int:
        for p in self.module.parameters():
            p.requires_grad_(True)
        return sum(p.numel() for p in self.module.parameters())

    def reset_to_initial(self) -> None:
        self.module.load_state_dict(self.initial)

    def add_loss_term(self, term) -> None:
        raise ValueError("this method adds loss terms to an LLM; choose an LLM backbone (backbone.kind=llm), not a classic model")

    def clear_loss_terms(self) -> None:
        pass

    def tracked_parameters(self):
        return dict(self.module.named_parameters())

    def _histories(self, samples):
        return self.collate(samples)["history"]

    def score_candidates(self, samples, candidates: np.ndarray, batch_size: int) -> np.ndarray:
        return self.module.score_candidates(self._histories(samples), torch.as_tensor(candidates)).double().cpu().numpy()

    def score_all(self, samples) -> np.ndarray:
        return self.module.score_all(self._histories(samples)).double().cpu().numpy()

    def save(self, folder: Path) -> None:
        """safetensors, not pickle: a run folder from elsewhere holds data only, never code to run on resume."""
        import safetensors.torch

        safetensors.torch.save_model(self.module, str(folder / "model.safetensors"))  # de-duplicates tied weights

    def load(self, folder: Path) -> None:
        import safetensors.torch

        path = folder / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (a model.pt from an older recsim is never unpickled): "
                                    f"delete {folder} to recompute that stage")
        safetensors.torch.load_model(self.module, str(path), device=str(next(self.module.parameters()).device))
