"""LoRA through peft, and the few helpers methods need on top of it (layer-wise selection, snapshots)."""

from __future__ import annotations

import re

import torch
from peft import LoraConfig, get_peft_model


def add_lora(model, lora_cfg, trainable_tokens: list[int] | None = None, train_embeddings: bool = False):
    """LoRA on `lora_cfg.target_modules`. `trainable_tokens`: embedding rows (added item tokens) that train with
    the adapter, through peft's trainable-token deltas (tied input/output embeddings stay tied);
    `train_embeddings`: embed_tokens and lm_head train whole (modules_to_save), as PESO's code does."""
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        task_type="CAUSAL_LM",
        trainable_token_indices=list(trainable_tokens) if trainable_tokens else None,
        modules_to_save=["embed_tokens", "lm_head"] if train_embeddings else None,
        ensure_weight_tying=train_embeddings,  # a tied model (SmolLM2, Llama-3.2-1B) keeps one trained copy, not two
    )
    return get_peft_model(model, config)


ADAPTER_TENSORS = ("lora_", "trainable_tokens_delta", "modules_to_save")  # what an adapter holds in peft


def lora_parameters(model, adapter: str = "default") -> dict[str, torch.nn.Parameter]:
    """The adapter's own parameters: its LoRA matrices and, where the item vocabulary trains them, its token
    embedding rows (peft's trainable-token deltas) or whole embedding copies (modules_to_save)."""
    return {n: p for n, p in model.named_parameters()
            if any(t in n for t in ADAPTER_TENSORS) and f".{adapter}." in n + "."}


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_of(param_name: str) -> int | None:
    """Transformer block index of a parameter name (`...layers.7.self_attn...` -> 7), None outside blocks."""
    m = _LAYER.search(param_name)
    return int(m.group(1)) if m else None


def set_trainable(model, layers: set[int] | None = None, adapter: str = "default") -> int:
    """Train only the LoRA parameters of `adapter` (of the given layers, all layers when None).

    Everything else gets requires_grad=False, so it is bit-for-bit unchanged by the update.
    Returns the number of trainable parameters.
    """
    lora = lora_parameters(model, adapter)
    count = 0
    for name, p in model.named_parameters():
        train = name in lora and (layers is None or layer_of(name) in layers)
        p.requires_grad_(train)
        count += p.numel() if train else 0
    return count


def snapshot(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lora_parameters(model, adapter).items()}


@torch.no_grad()
def load_snapshot(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for n, v in state.items():
        params[n].copy_(v)
