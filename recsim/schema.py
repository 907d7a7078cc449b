"""Every config value checked before any work: a declarative table of checks per group and option.

`validate(cfg)` runs within a second of `python -m recsim.run` (it needs only omegaconf), before the data
is read or a model is built, and raises one ConfigError listing every bad value as
`method.t=1.5: expected a number in (0, 1]`. `validate_against_data(cfg, num_items)` checks what only the
data can tell (eval.negatives below the catalogue size) right after loading, before any training.

Which table applies is chosen by the option's own discriminator: method.name, stage.name, recipe.name,
dataset.reader, backbone.kind (+ backbone.source / backbone.model), so a table describes one option file.

Choices:
- Unknown keys are left alone, never rejected: other parts of recsim add keys to groups (method.kl.*,
  backbone.early_stopping.*, dataset.title_field ...) and a strict "no unknown key" rule would break
  them until someone adds a row here. Known keys are checked strictly (type and range, null only where
  the table says so); a known key missing from the config is an error.
- An option name without a table here (a method, reader or sequential model registered elsewhere) is
  checked against its registry, imported only then (those imports pull in torch); a stage or recipe
  name without a table is left to its builder, which has no registry to ask.
- Hand-written rather than OmegaConf.structured dataclasses: structured configs type-check but cannot say
  "(0, 1]" or "strictly increasing", and merging one would reject the unknown keys other helpers add.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config value of the wrong type or outside its range; the message lists every such key."""


@dataclass(frozen=True)
class Check:
    ok: Callable[[Any], bool]
    expected: str  # what is allowed, in words: "a number in (0, 1]"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _range(lo, hi, lo_open: bool, hi_open: bool) -> tuple[Callable[[Any], bool], str]:
    above = lambda v: lo is None or (v > lo if lo_open else v >= lo)
    below = lambda v: hi is None or (v < hi if hi_open else v <= hi)
    if lo is not None and hi is not None:
        text = f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f" {'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        text = f" {'<' if hi_open else '<='} {hi}"
    else:
        text = ""
    return (lambda v: above(v) and below(v)), text


def _nullable(check: Check, null: bool) -> Check:
    return Check(lambda v: v is None or check.ok(v), f"null or {check.expected}") if null else check


def number(lo=None, hi=None, *, lo_open=False, hi_open=False, null=False) -> Check:
    inside, text = _range(lo, hi, lo_open, hi_open)
    return _nullable(Check(lambda v: _is_num(v) and inside(v), f"a number{text}"), null)


def integer(lo=None, hi=None, *, null=False) -> Check:
    inside, text = _range(lo, hi, False, False)
    return _nullable(Check(lambda v: _is_int(v) and inside(v), f"an integer{text}"), null)


def boolean(null=False) -> Check:
    return _nullable(Check(lambda v: isinstance(v, bool), "true or false"), null)


def text(null=False) -> Check:
    return _nullable(Check(lambda v: isinstance(v, str) and v != "", "a non-empty string"), null)


def one_of(*options, null=False) -> Check:
    return _nullable(Check(lambda v: isinstance(v, (str, int)) and not isinstance(v, bool) and v in options,
                           f"one of {', '.join(map(str, options))}"), null)


def numbers(lo=None, hi=None, *, lo_open=False, hi_open=False, increasing=False) -> Check:
    inside, text = _range(lo, hi, lo_open, hi_open)
    order = lambda v: not increasing or all(a < b for a, b in zip(v, v[1:]))
    return Check(lambda v: isinstance(v, list) and len(v) > 0 and all(_is_num(x) and inside(x) for x in v)
                 and order(v), f"a non-empty list of numbers{text}" + (", strictly increasing" if increasing else ""))


def integers(lo=None) -> Check:
    inside, text = _range(lo, None, False, False)
    return Check(lambda v: isinstance(v, list) and len(v) > 0 and all(_is_int(x) and inside(x) for x in v),
                 f"a non-empty list of integers{text}")


def strings() -> Check:
    return Check(lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) and x for x in v),
                 "a non-empty list of non-empty strings")


def subset(*options) -> Check:
    return Check(lambda v: isinstance(v, list) and len(v) > 0 and all(x in options for x in v),
                 f"a non-empty list of {', '.join(options)}")


# ------------------------------------------------------------------------------------------ tables

ROOT = {"seed": integer(0), "reuse_base_stage": boolean(), "reuse_base_stage_across_versions": boolean(),
        "paths.data_dir": text(), "paths.cache_dir": text()}

EVAL = {
    "eval.ks": integers(1), "eval.negatives": integer(1),
    "eval.full_ranking": boolean(), "eval.all_splits": boolean(), "eval.batch_size": integer(1),
    "eval.n_boot": integer(1), "eval.r_metric": text(), "eval.table_metrics": strings(),
    "eval.validation": boolean(), "eval.kl_after_update": boolean(), "eval.kl_samples": integer(1),
    "eval.kl_batch_size": integer(1),
}
DECODER_NAMES = ("candidates", "generation", "beam", "grounding", "l2d_global", "l2d_local",
                 "id_head")  # = recsim.decoders.DECODERS (no torch import here)
LATENT_DECODERS = ("l2d_global", "l2d_local", "id_head")  # they need one hidden state per prompt
# eval.decoders, or eval.modes in configs written before decoders existed (one of the two must be there)
EVAL_DECODERS = {"eval.decoders": subset(*DECODER_NAMES)}
EVAL_MODES = {"eval.modes": subset(*DECODER_NAMES)}

# `decoder=<name>` (conf/decoder/): the chosen decoder's settings, checked by its name; a decoder whose settings
# live in its recipe (recsim.decoders.base.decoder_settings) has an empty table
_MEMORY = {"memory_ratio": number(0, 1, lo_open=True), "memory.samples": one_of("seen", "stage"),
           "memory.save": boolean(), "batch_size": integer(1), "top_k": integer(1, null=True)}
_SEARCH = {"search": one_of("auto", "faiss", "torch"), "index.approximate_above": integer(1, null=True),
           "index.kind": one_of("ivf", "hnsw"), "index.nlist": integer(1, null=True), "index.nprobe": integer(1),
           "index.hnsw_m": integer(2), "index.ef_search": integer(1)}
_DECODER_SETTINGS = {
    "l2d_global": {**_MEMORY, **_SEARCH},
    "l2d_local": {**_MEMORY, **_SEARCH, "m": integer(1), "similarity": one_of("l2", "cosine"),
                  "aggregation": one_of("mean", "count"), "local_fallback": one_of("global", "none")},
    "id_head": {**_MEMORY, "train.epochs": integer(1), "train.lr": number(0, lo_open=True),
                "train.batch_size": integer(1), "train.weight_decay": number(0)}}
DECODER_BY_NAME = {name: {f"decoder.{k}": c for k, c in _DECODER_SETTINGS.get(name, {}).items()}
                   for name in DECODER_NAMES}

OPTIM = {"lr": number(0, lo_open=True), "weight_decay": number(0), "scheduler": one_of("constant", "cosine"),
         "epochs": integer(0), "max_steps": integer(1, null=True)}
# Lightning's accepted precision inputs (lightning.fabric.connector._PRECISION_INPUT)
PRECISIONS = ("16-true", "16-mixed", "bf16-true", "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16",
              "transformer-engine", "transformer-engine-float16")
PRECISION = Check(lambda v: v is None or v in (64, 32, 16) or (isinstance(v, str) and v in PRECISIONS),
                  f"null, 64, 32, 16 or one of {', '.join(PRECISIONS)}")
TRAINER = {
    "trainer.accelerator": one_of("auto", "cpu", "gpu", "cuda", "mps", "tpu"),
    "trainer.precision": PRECISION, "trainer.deterministic": boolean(),
    "trainer.gradient_clip_val": number(0, null=True), "trainer.batch_size": integer(1),
    "trainer.progress_bar": boolean(), "trainer.max_train_samples": integer(1, null=True),
    **{f"trainer.{phase}.{k}": c for phase in ("base", "update") for k, c in OPTIM.items()},
}
# keys added with recsim.training.build_trainer: optional, so configs written before them still validate
TRAINER_OPTIONAL = {
    "trainer.devices": Check(lambda v: v == "auto" or (_is_int(v) and v >= 1)
                             or (isinstance(v, list) and v and all(_is_int(x) and x >= 0 for x in v)),
                             "auto, an integer >= 1 or a list of device indices"),
    "trainer.strategy": text(), "trainer.accumulate_grad_batches": integer(1), "trainer.compile": boolean(),
    "trainer.compile_mode": one_of("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", null=True),
    "trainer.pad_to_multiple_of": integer(1, null=True), "trainer.static_shapes": boolean(),
    "trainer.reuse_freed_memory": boolean(),
    "trainer.group_by_length": boolean(), "trainer.log_every_n_steps": integer(1),
    "trainer.num_nodes": integer(1),
    "trainer.checkpoint_selection.mode": one_of("last", "best_val"),
    "trainer.checkpoint_selection.metric": text(),
    "trainer.checkpoint_selection.every_n_steps": integer(1, null=True),
}

LOGGER = {"logger.wandb": boolean()}
WANDB = {"logger.project": text(), "logger.entity": text(null=True),
         "logger.mode": one_of("online", "offline", "disabled", null=True)}

DATASET = {
    "dataset.name": text(), "dataset.reader": text(), "dataset.data_dir": text(null=True),
    "dataset.k_core": integer(0), "dataset.drop_untitled": boolean(), "dataset.max_title_words": integer(1, null=True),
    "dataset.sample_users": integer(1, null=True), "dataset.sample_seed": integer(0, null=True),
}
MONTH = Check(lambda v: isinstance(v, str) and re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", v) is not None,
              "a month written YYYY-MM, e.g. 2017-10")
SIMULATOR = {f"dataset.simulator.{k}": c for k, c in {
    "num_users": integer(1), "num_items": integer(1), "num_categories": integer(1), "interests_per_user": integer(1),
    "drift_share": number(0, 1), "drift_time": number(0, 1, lo_open=True, hi_open=True),
    "active_share_after": number(0, 1), "min_len": integer(1), "max_len": integer(1), "noise": number(0, 1),
    "horizon_days": number(0, lo_open=True), "start_timestamp": integer(0), "seed": integer(0)}.items()}
DATASET_BY_READER = {"amazon2014_staged": {"dataset.folder": text()}, "mcauley2014": {"dataset.category": text()},
                     "amazon2018": {"dataset.category": text()}, "synthetic": SIMULATOR,
                     "recbole": {"dataset.folder": text(), "dataset.atomic_name": text(null=True),
                                 "dataset.title_field": text()},
                     "peso_blocks": {"dataset.folder": text()},
                     "amazon2018_d3": {"dataset.category": text(), **{f"dataset.d3.{k}": c for k, c in {
                         "reviews": one_of("full", "5core"), "window_start": MONTH, "window_end": MONTH,
                         "min_items": integer(1), "earliest_year": integer(1),
                         "max_title_words": integer(1, null=True)}.items()}}}

LORA = {"backbone.lora.r": integer(1), "backbone.lora.alpha": number(0, lo_open=True),
        "backbone.lora.dropout": number(0, 1, hi_open=True), "backbone.lora.target_modules": strings()}
LLM = {"backbone.name": text(), "backbone.source": one_of("tiny", "gguf_package", "hub"),
       "backbone.dtype": one_of("auto", "float32", "bfloat16", "float16", null=True), **LORA}
GGUF = {"backbone.package": text(), "backbone.gguf_file": text(), "backbone.tokenizer_path": text(null=True)}
LLM_BY_SOURCE = {
    "gguf_package": GGUF,
    "tiny": {**GGUF, **{f"backbone.tiny.{k}": integer(1) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "max_positions")}},
    "hub": {"backbone.pretrained": text(), "backbone.local_files_only": boolean()},
}
SEQUENTIAL = {f"backbone.{k}": c for k, c in {
    "name": text(), "model": text(), "hidden": integer(1), "max_len": integer(1), "lr": number(0, lo_open=True),
    "weight_decay": number(0), "loss": one_of("ce", "bpr"), "epochs": integer(1), "batch_size": integer(1)}.items()}
# model-specific constructor arguments (recsim.models.sequential_module.build_sequential)
DROPOUT = number(0, 1, hi_open=True)
MODEL_ARGS = {"sasrec": {"layers": integer(1), "heads": integer(1), "dropout": DROPOUT},
              "gru4rec": {"layers": integer(1), "dropout": DROPOUT}, "bpr_mf": {}}
# backbone.kind: graph (recsim.models.alpharec; encoders restated: this file must not import torch)
VALID_METRIC = Check(lambda v: isinstance(v, str) and re.fullmatch(r"(MRR|NDCG|HR|Recall)@[1-9][0-9]*", v) is not None,
                     "NAME@K with NAME one of MRR, NDCG, HR, Recall and K >= 1, e.g. Recall@20")
GRAPH = {f"backbone.{k}": c for k, c in {
    "name": text(), "model": one_of("alpharec"), "encoder": one_of("minilm"), "hidden": integer(1),
    "mlp_hidden": integer(1), "gcn_layers": integer(0), "tau": number(0, lo_open=True),
    "negatives": Check(lambda v: v == "in_batch" or (_is_int(v) and v >= 1), "an integer >= 1 or in_batch"),
    "max_len": integer(1), "lr": number(0, lo_open=True), "weight_decay": number(0), "grad_clip": number(0, null=True),
    "epochs": integer(1), "batch_size": integer(1), "seed": integer(0, null=True)}.items()}
# backbone.kind: student (recsim.models.student; encoders restated: this file must not import torch)
STUDENT = {f"backbone.{k}": c for k, c in {
    "name": text(), "encoder": one_of("minilm"), "dim": integer(1), "heads": integer(1), "ffn": integer(1),
    "dropout": DROPOUT, "max_len": integer(1), "negatives": integer(1), "lr": number(0, lo_open=True),
    "weight_decay": number(0), "epochs": integer(1), "batch_size": integer(1), "seed": integer(0, null=True),
    **{f"decoder.{d}": integer(1) for d in ("hidden", "layers", "heads", "kv_heads", "intermediate", "max_positions")},
    "decoder.max_text_tokens": integer(2), "decoder.tokenizer.name": text(),
    "decoder.tokenizer.source": one_of("gguf_package", "tiny", "hub")}.items()}
EARLY_STOPPING = {"backbone.early_stopping.metric": VALID_METRIC, "backbone.early_stopping.patience": integer(1),
                  "backbone.early_stopping.max_epochs": integer(1)}

FILTER = {"kind": one_of(*MODEL_ARGS), "hidden": integer(1), "max_len": integer(1), "lr": number(0, lo_open=True),
          "loss": one_of("ce", "bpr"), "epochs": integer(0), "finetune_epochs": integer(0), "batch_size": integer(1)}
METHOD_BY_NAME = {
    "base": {}, "finetune": {}, "retrain": {},
    "evorec": {f"method.{k}": c for k, c in {
        "t": number(0, 1, lo_open=True), "k": integer(0), "lam": number(0), "filter": text(),
        "forget_scope": one_of("window", "all"), "filter_pretrain": one_of("alongside", "in_update"),
        "kl_samples": integer(1), "kl_batch_size": integer(1),
        "locate.rule": one_of("mean_cosine", "vote"), "locate.pooling": one_of("last", "mean"),
        "locate.max_users": integer(1), "kl.positions": one_of("answer", "all"),
        "kl.reduction": one_of("token_mean", "sum"), "forget_backfill": boolean(),
        "kl.cache_frozen": Check(lambda v: v == "auto" or isinstance(v, bool), "auto, true or false")}.items()},
    "ewc": {"method.lam": number(0), "method.fisher_samples": integer(1), "method.fisher_batch_size": integer(1),
            "method.fisher_cache": boolean()},
    "ftkl": {"method.lam": number(0)},
    "lsat": {"method.long_epochs": integer(0), "method.long_samples": integer(1, null=True),
             "method.combine": one_of("ensemble", "merge"), "method.long_term": one_of("retrain", "continue"),
             "method.weight_grid": numbers(0, 1), "method.select_metric": text(), "method.eval_batch_size": integer(1)},
    # recsim.methods.proximal (granularities and reductions restated: this file must not import torch)
    "single_lora": {"method.lr_scale": number(0, lo_open=True, null=True), "method.ce_temperature": number(0, lo_open=True)},
    **{m: {"method.lam": number(0), "method.granularity": one_of("module", "matrix", "layer", "global"),
           "method.reduction": one_of("sum", "mean"), "method.lr_scale": number(0, lo_open=True, null=True),
           "method.ce_temperature": number(0, lo_open=True)} for m in ("peso", "prox_l2")},
    **{m: {"method.lam": number(0), "method.lr_scale": number(0, lo_open=True, null=True),
           "method.ce_temperature": number(0, lo_open=True)} for m in ("prox_output_kl", "prox_orthogonal")},
    # recsim.methods.cumulative
    "sumlora": {"method.form": one_of("plain", "directions"),
                "method.variant": one_of("all", "latest", "all_inherit", "latest_inherit"),
                "method.inherit_init": one_of("increment", "copy")},
    "sdlora": {"method.variant": one_of("all", "latest", "all_inherit", "latest_inherit"),
               "method.inherit_init": one_of("increment", "copy")},
    # recsim.methods.distill
    "distill": {f"method.{k}": c for k, c in {
        "seed": integer(0), "negatives": integer(1), "loss.rec": number(0), "loss.gen": number(0),
        "loss.kl": number(0), "loss.temperature": number(0, lo_open=True), "loss.t_squared": boolean(),
        "teacher_batch_size": integer(1), "explanation.prompt": text(), "explanation.max_history": integer(1),
        "explanation.max_title_words": integer(1, null=True), "explanation.max_prompt_tokens": integer(1),
        "explanation.max_new_tokens": integer(1), "explanation.batch_size": integer(1),
        "explanation.max_samples": integer(1, null=True), "explanation.seed": integer(0),
        "efficiency.enabled": boolean(), "efficiency.requests": integer(1), "efficiency.warmup": integer(0)}.items()},
    "inflora": {"method.variant": one_of("all", "latest"), "method.threshold": number(0, 1, lo_open=True),
                "method.input_samples": integer(1, null=True), "method.input_batch_size": integer(1)},
}

STAGE_BY_NAME = {
    "two_period": {"stage.t_quantiles": numbers(0, 1, lo_open=True, hi_open=True, increasing=True),
                   "stage.history_window": integer(1)},
    "stages": {"stage.first_share": number(0, 1, lo_open=True, hi_open=True),
               "stage.window_shares": numbers(0, 1, lo_open=True, hi_open=True), "stage.history_window": integer(1)},
    "leave_one_out": {"stage.history_window": integer(1)},
    "peso_blocks": {"stage.history_window": integer(1), "stage.min_block_interactions": integer(1)},
    "global_split": {"stage.shares": numbers(0, 1, lo_open=True, hi_open=True), "stage.history_window": integer(1)},
}

# teacher.* (method=distill's teacher run); optional: configs written before it have no teacher
TEACHER = {"teacher.run_dir": text(null=True), "teacher.stage": integer()}

# stage.holdout_* (recsim.protocols.holdout), every protocol; optional: configs written before them hold out nobody
STAGE_OPTIONAL = {"stage.holdout_users": number(0, 1, hi_open=True), "stage.holdout_seed": integer(0)}

_RECIPE = {f"recipe.{k}": c for k, c in {
    "prompt.template": text(), "prompt.max_history": integer(1), "prompt.max_title_words": integer(1, null=True),
    "prompt.max_prompt_tokens": integer(1), "scoring.normalize": one_of("mean", "sum"),
    "scoring.max_title_words": integer(1, null=True), "scoring.max_answer_tokens": integer(1),
    "generation.list_length": integer(1), "generation.separator": text(), "generation.max_new_tokens": integer(1),
    "generation.max_title_words": integer(1, null=True)}.items()}
GENERATIVE = {f"recipe.{k}": c for k, c in {
    "prompt.item_separator": Check(lambda v: v is None or isinstance(v, str), "null or a string"),
    "beam.beam_size": integer(1), "beam.top_k": integer(1), "beam.length_penalty": number(),
    "beam.max_new_tokens": integer(1, null=True), "beam.batch_size": integer(1),
    "grounding.max_new_tokens": integer(1), "grounding.top_k": integer(1), "grounding.batch_size": integer(1)}.items()}
RECIPE_BY_NAME = {"candidate_ranking": _RECIPE, "generative": {**_RECIPE, **GENERATIVE}}
# keys added later: optional, so configs written before them still validate (the code reads them with a default)
_RECIPE_OPTIONAL = {
    "recipe.scoring.kernel": one_of("packed", "kv_repeat"),  # = recsim.models.llm_ranker.SCORING_KERNELS
    "recipe.scoring.autocast": Check(lambda v: v in (True, False, "auto"), "auto, true or false"),
    "recipe.scoring.fp32": boolean(), "recipe.scoring.compile": boolean(),
    "recipe.scoring.pad_to_multiple_of": Check(lambda v: v == "auto" or v is None or (type(v) is int and v >= 1),
                                               "auto, null or an integer >= 1"),
    "recipe.prompt.item_separator": Check(lambda v: v is None or isinstance(v, str), "null or a string")}
RECIPE_OPTIONAL_BY_NAME = {"candidate_ranking": _RECIPE_OPTIONAL, "generative": _RECIPE_OPTIONAL}

ITEM_ID_BY_NAME = {  # optional as a whole: configs written before item vocabularies existed mean item_id=title
    "title": {"item_id.dedup": one_of("none", "suffix")},
    "semantic": {f"item_id.{k}": c for k, c in {
        "method": one_of("rqvae", "rkmeans"), "levels": integer(1, 26), "codebook_size": integer(2),
        "encoder": one_of("minilm", "backbone"), "seed": integer(0), "dedup": one_of("colliding", "all"),
        "prompt_shows": one_of("code", "title"), "train_embeddings": one_of("new_tokens", "all", "none"),
        "rqvae.e_dim": integer(1), "rqvae.epochs": integer(1), "rqvae.lr": number(0, lo_open=True),
        "rqvae.beta": number(0), "rkmeans.niter": integer(1)}.items()},
    "semantic_released": {f"item_id.{k}": c for k, c in {
        "dedup": one_of("colliding", "all"), "prompt_shows": one_of("code"),
        "train_embeddings": one_of("new_tokens", "all", "none")}.items()},
}


def _registry(kind: str) -> dict:
    """Names registered outside this file; imported only for a name without a table (heavy imports)."""
    if kind == "method":
        from recsim.methods import METHODS

        return METHODS
    if kind == "reader":
        from recsim.data.load import READERS

        return READERS
    from recsim.models.sequential_module import MODELS

    return MODELS


# ------------------------------------------------------------------------------------------ checking

_ABSENT = object()  # the key is not in the config (or is ???)
_UNRESOLVED = object()  # the key is there but its interpolation fails (already reported)


def _show(value) -> str:
    """The value as a YAML/command-line reader writes it; strings quoted so that `abc` and `1` differ."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value) if isinstance(value, str) else str(value)


class _Checker:
    def __init__(self, cfg: DictConfig):
        self.cfg, self.errors = cfg, []

    def get(self, key: str):
        """The resolved plain value at `key`, _ABSENT when missing; an unresolvable value is an error."""
        try:
            value = OmegaConf.select(self.cfg, key, default=_ABSENT, throw_on_resolution_failure=True)
        except Exception as exc:  # an interpolation that cannot resolve is as bad as a wrong value
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.errors.append(f"{key}: cannot be resolved ({reason})")
            return _UNRESOLVED
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        return value

    def table(self, table: dict[str, Check], required: bool = True, prefix: str = "") -> None:
        for key, check in table.items():
            value = self.get(prefix + key)
            if value is _UNRESOLVED:
                continue
            if value is _ABSENT:
                if required:
                    self.errors.append(f"{prefix}{key} is missing: expected {check.expected}")
            elif not check.ok(value):
                self.bad(prefix + key, value, check.expected)

    def bad(self, key: str, value, expected: str) -> None:
        if value is _UNRESOLVED:
            return  # reported where it failed to resolve
        self.errors.append(f"{key}={_show(value)}: expected {expected}")

    def option(self, key: str, tables: dict, registry: str | None = None) -> dict:
        """The table of the option named at `key`; an unknown name is checked against its registry."""
        name = self.get(key)
        if isinstance(name, str) and name in tables:
            return tables[name]
        if name is _UNRESOLVED:
            return {}
        if name is _ABSENT or not isinstance(name, str) or not name:
            self.bad(key, None if name is _ABSENT else name, f"one of {', '.join(tables)}")
        elif registry is not None:
            known = _registry(registry)
            if name not in known:
                self.bad(key, name, f"one of {', '.join(sorted(known))}")
        return {}


METRIC = re.compile(r"(HR|NDCG|Recall)@(\d+)|MRR")


def config_errors(cfg: DictConfig) -> list[str]:
    """Every bad value of `cfg`, one line each (empty when the config is good)."""
    c = _Checker(cfg)
    for table in (ROOT, EVAL, TRAINER, LOGGER, DATASET):
        c.table(table)
    c.table(EVAL_DECODERS if c.get("eval.decoders") is not _ABSENT or c.get("eval.modes") is _ABSENT else EVAL_MODES)
    if c.get("item_id") is not _ABSENT:
        c.table(c.option("item_id.name", ITEM_ID_BY_NAME))
    if c.get("decoder") not in (_ABSENT, None):
        if c.get("decoder.name") in DECODER_BY_NAME:
            c.table(DECODER_BY_NAME[c.get("decoder.name")])
        else:
            name = c.get("decoder.name")
            c.bad("decoder.name", None if name is _ABSENT else name, f"one of {', '.join(DECODER_NAMES)}")
    c.table(TRAINER_OPTIONAL, required=False)
    if c.get("logger.wandb") is True:
        c.table(WANDB)
    c.table(c.option("dataset.reader", DATASET_BY_READER, "reader"))

    kind = c.get("backbone.kind")
    if kind == "llm":
        c.table(LLM)
        c.table(c.option("backbone.source", LLM_BY_SOURCE))
    elif kind == "sequential":
        c.table(SEQUENTIAL)
        c.table({f"backbone.{k}": v for k, v in c.option("backbone.model", MODEL_ARGS, "sequential").items()})
    elif kind == "graph":
        c.table(GRAPH)
        if c.get("backbone.early_stopping") not in (None, _ABSENT):  # null or absent: early stopping off
            c.table(EARLY_STOPPING)
    elif kind == "student":
        c.table(STUDENT)
    else:
        c.bad("backbone.kind", kind, "one of llm, sequential, graph, student")
    if c.get("teacher") is not _ABSENT:
        c.table(TEACHER)

    method = c.get("method.name")
    c.table(c.option("method.name", METHOD_BY_NAME, "method"))
    if method == "evorec":
        filters = c.get("method.filters")
        if not isinstance(filters, dict) or not filters:
            c.bad("method.filters", filters, "a mapping of filter name -> filter settings")
            filters = {}
        for name in filters:
            prefix = f"method.filters.{name}."
            c.table(FILTER, prefix=prefix)
            c.table(MODEL_ARGS.get(c.get(prefix + "kind"), {}), prefix=prefix)
        if c.get("method.filter") not in filters:
            c.bad("method.filter", c.get("method.filter"), f"one of the keys of method.filters ({', '.join(filters)})")

    stage = c.get("stage.name")
    if stage in STAGE_BY_NAME:
        c.table(STAGE_BY_NAME[stage])
        c.table(STAGE_OPTIONAL, required=False)
    else:
        c.bad("stage.name", stage, f"one of {', '.join(STAGE_BY_NAME)}")
    if c.get("recipe.name") in RECIPE_BY_NAME:
        c.table(RECIPE_BY_NAME[c.get("recipe.name")])
        c.table(RECIPE_OPTIONAL_BY_NAME.get(c.get("recipe.name"), {}), required=False)
    if not c.errors:
        _cross_checks(c)
    return c.errors


def _cross_checks(c: _Checker) -> None:
    """Relations between keys, once every key has its own type (so these can compare freely)."""
    g = c.get
    ks = g("eval.ks")
    for key, names in (("eval.r_metric", [g("eval.r_metric")]), ("eval.table_metrics", g("eval.table_metrics"))):
        for name in names:
            m = METRIC.fullmatch(name)
            if not m or (m.group(2) and int(m.group(2)) not in ks):
                c.bad(key, name, f"HR@K, NDCG@K or Recall@K with K in eval.ks={ks}, or MRR")
    decoders = g("eval.decoders") if g("eval.decoders") is not _ABSENT else g("eval.modes")
    if g("decoder") not in (_ABSENT, None) and g("decoder.name") not in decoders:
        decoders = [*decoders, g("decoder.name")]  # a chosen decoder group runs too (recsim.runner.eval_decoders)
    latent = [d for d in decoders if d in LATENT_DECODERS]
    if latent and g("method.name") == "lsat" and g("method.combine") == "ensemble":
        c.bad("method.combine", "ensemble", f"merge with the latent decoders {', '.join(latent)}: LSAT's ensemble "
              "fuses two adapters' predictions, not hidden states")
    if "generation" in decoders and g("recipe.generation.list_length") is not _ABSENT:
        if g("recipe.generation.list_length") > g("eval.negatives") + 1:
            c.bad("recipe.generation.list_length", g("recipe.generation.list_length"),
                  f"at most the number of candidates, eval.negatives + 1 = {g('eval.negatives') + 1}")
    for name in ("beam", "grounding"):
        if name in decoders and g(f"recipe.{name}") is _ABSENT:
            c.bad("eval.decoders", decoders, f"a list whose {name} has its settings: recipe.{name} is missing "
                  "(recipe=generative has them)")
    if "beam" in decoders and g("recipe.beam") is not _ABSENT:
        top = g("recipe.beam.top_k")
        for key, names in (("eval.r_metric", [g("eval.r_metric")]), ("eval.table_metrics", g("eval.table_metrics"))):
            for name in names:
                m = METRIC.fullmatch(name)
                if m and m.group(2) and int(m.group(2)) > top:
                    c.bad(key, name, f"a cut-off <= recipe.beam.top_k={top} (the beam lists {top} items)")
    if g("recipe.name") in RECIPE_BY_NAME and "{history}" not in g("recipe.prompt.template"):
        c.bad("recipe.prompt.template", g("recipe.prompt.template"), "a string containing {history}")
    if g("stage.name") == "stages" and g("stage.first_share") + sum(g("stage.window_shares")) > 1 + 1e-9:
        c.bad("stage.window_shares", g("stage.window_shares"),
              f"shares summing to at most 1 - stage.first_share = {1 - g('stage.first_share'):.6g}")
    if g("stage.name") == "global_split" and (len(g("stage.shares")) != 3 or abs(sum(g("stage.shares")) - 1) > 1e-9):
        c.bad("stage.shares", g("stage.shares"), "three shares (train, valid, test) summing to 1")
    if g("dataset.reader") == "amazon2018_d3" and g("dataset.d3.window_start") >= g("dataset.d3.window_end"):
        c.bad("dataset.d3.window_start", g("dataset.d3.window_start"),
              f"a month before dataset.d3.window_end={g('dataset.d3.window_end')!r}")
    if g("dataset.reader") == "synthetic":
        s = g("dataset.simulator")
        if s["max_len"] < s["min_len"]:
            c.bad("dataset.simulator.max_len", s["max_len"], f"an integer >= dataset.simulator.min_len={s['min_len']}")
        if 2 * s["interests_per_user"] > s["num_categories"]:
            c.bad("dataset.simulator.num_categories", s["num_categories"],
                  f"an integer >= 2 * dataset.simulator.interests_per_user = {2 * s['interests_per_user']} "
                  "(drifted users get as many new, disjoint categories)")
    heads = [("backbone.", g("backbone.model") if g("backbone.kind") == "sequential" else None)]
    if g("method.name") == "evorec":
        heads += [(f"method.filters.{n}.", f["kind"]) for n, f in g("method.filters").items()]
    for prefix, model in heads:
        if model == "sasrec" and g(prefix + "hidden") % g(prefix + "heads"):
            c.bad(prefix + "heads", g(prefix + "heads"), f"a divisor of {prefix}hidden={g(prefix + 'hidden')}")
    if g("method.name") == "distill":
        run_dir = g("teacher.run_dir") if g("teacher") is not _ABSENT else None
        if g("backbone.kind") == "student" and run_dir is None:
            c.bad("teacher.run_dir", None, "the folder of a finished recsim run of an LLM recommender (method=distill "
                  "distils it)")
        if run_dir is not None and g("backbone.kind") != "student":
            c.bad("backbone.kind", g("backbone.kind"), "student with method=distill (backbone=student)")
        for key in ("{history}", "{item}"):
            if key not in g("method.explanation.prompt"):
                c.bad("method.explanation.prompt", g("method.explanation.prompt"), f"a string containing {key}")
    if g("backbone.kind") == "student":
        for inner, outer in (("backbone.heads", "backbone.dim"), ("backbone.decoder.kv_heads", "backbone.decoder.heads"),
                             ("backbone.decoder.heads", "backbone.decoder.hidden")):
            if g(outer) % g(inner):
                c.bad(inner, g(inner), f"a divisor of {outer}={g(outer)}")
    if g("backbone.kind") == "llm" and g("backbone.source") == "tiny":
        t = g("backbone.tiny")
        if t["hidden_size"] % t["num_heads"]:
            c.bad("backbone.tiny.num_heads", t["num_heads"],
                  f"a divisor of backbone.tiny.hidden_size={t['hidden_size']}")
        if t["num_heads"] % t["num_kv_heads"]:
            c.bad("backbone.tiny.num_kv_heads", t["num_kv_heads"],
                  f"a divisor of backbone.tiny.num_heads={t['num_heads']}")


def _raise(errors: list[str]) -> None:
    if errors:
        raise ConfigError(f"{len(errors)} bad config value(s):\n  " + "\n  ".join(errors))


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming every bad key, its value and what is allowed; None when the config is good."""
    _raise(config_errors(cfg))


def validate_against_data(cfg: DictConfig, num_items: int) -> None:
    """What only the loaded data can tell, checked before any training: every user needs `eval.negatives`
    unseen items, so the catalogue must be larger than that."""
    negatives = cfg.eval.negatives
    if negatives >= num_items:
        _raise([f"eval.negatives={negatives}: expected an integer < the catalogue size ({num_items} items of "
                f"dataset {cfg.dataset.name!r})"])
