"""Shared fixtures: where the staged data is, and Hydra composition of the real configs."""

from __future__ import annotations

import os
import recsim  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RECSIM_DATA", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("RECSIM_CACHE", str(REPO / ".cache" / "recsim"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["RECSIM_DATA"])
    if not (path / "amazon_beauty" / "interactions.csv.gz").is_file():
        pytest.skip(f"staged data not found under RECSIM_DATA={path}")
    return path


def compose(overrides: list[str], output_dir: Path | None = None):
    """The config `python -m recsim.run <overrides>` would see, with paths.output_dir set."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="recsim.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir) if output_dir else "unused"
    return cfg


def tiny_lora_ranker(titles: list[str], normalize: str = "sum"):
    """An LLMRanker over the tiny Llama with a LoRA whose B matrices are random (a fresh LoRA is the identity, so
    the adapter would not matter), prompts of up to 10 titles cut to 8 words."""
    import torch
    from omegaconf import OmegaConf

    from recsim.backbones import lora as lora_ops
    from recsim.backbones.llm import load_base_model, load_tokenizer
    from recsim.models.llm_ranker import LLMRanker

    cfg = OmegaConf.load(REPO / "recsim/conf/backbone/tiny_llama.yaml")
    cache = os.environ["RECSIM_CACHE"]
    model = lora_ops.add_lora(load_base_model(cfg, cache, seed=0), cfg.lora)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    prompt = OmegaConf.create({"template": "History:\n{history}\nNext:", "max_history": 10, "max_title_words": 8,
                               "max_prompt_tokens": 512})
    scoring = OmegaConf.create({"normalize": normalize, "max_title_words": None, "max_answer_tokens": 32})
    return LLMRanker(model, load_tokenizer(cfg, cache), titles, prompt, scoring,
                     OmegaConf.create({"lr": 1e-2, "weight_decay": 0}))
