"""The FLOP model of one LoRA training step of the LLM ranker, for MFU figures that compare across machines.

Only the formula is pure (:func:`lora_step_flops`); :func:`model_dims` reads the numbers it needs off the
model once, so the formula can be checked by hand on tiny inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def lora_step_flops(n_linear: int, lengths: Sequence[int], answer_tokens: int, *, layers: int, d_attn: int,
                    vocab: int, hidden: int) -> int:
    """FLOPs of one optimiser step of a frozen-base LoRA fit of a causal LM, on real (non-pad) tokens.

    FLOPs = 4·N·T + 6·L·d·Σᵢ nᵢ² + 4·V·H·M, where
      * N = `n_linear`: weights of every nn.Linear inside the decoder layers (the frozen base's q/k/v/o and
        MLP projections); T = Σᵢ nᵢ, the real tokens of the step. A matmul costs 2 FLOPs per weight and
        token forward, and the backward pass computes only the activation gradients (another 2·N·T): the
        base is frozen, so it has no weight gradients. LoRA's own A/B matrices are NOT counted (r = 8 adds
        well under 1% of N); neither are norms, rotary embeddings, softmax or biases (no multiply-adds).
      * attention, per layer and sequence of real length n: causal QKᵀ and AV are n²·d/2 multiply-adds
        each over the lower triangle, i.e. 2·n²·d FLOPs forward (d = `d_attn` = query heads × head dim).
        Both operands of each are activations that need gradients, so the backward runs two matmuls per
        forward one (dQ and dK, dP and dV): 3 × 2·n²·d = 6·n²·d per layer; L = `layers`.
      * the LM head at the answer positions only (the ranker projects just the positions that predict
        answer tokens): forward 2·V·H per position plus the gradient back to the hidden state 2·V·H,
        over M = `answer_tokens` positions of the step.
    `lengths`: the real length nᵢ of every sequence of the step (all micro-batches of an accumulated step).
    """
    tokens = sum(lengths)
    attention = 6 * layers * d_attn * sum(n * n for n in lengths)
    return 4 * n_linear * tokens + attention + 4 * vocab * hidden * answer_tokens


@dataclass(frozen=True)
class ModelDims:
    n_linear: int  # weights of the decoder layers' nn.Linear modules (LoRA's excluded)
    layers: int
    d_attn: int  # query heads × head dim
    vocab: int
    hidden: int


def model_dims(module) -> ModelDims:
    """The dimensions `lora_step_flops` needs, read off an LLMRanker (a peft model around a causal LM).

    peft wraps each targeted projection in a LoRA layer whose `base_layer` is the original nn.Linear and
    whose `lora_A` / `lora_B` hold nn.Linear too: those are skipped by name, so N is the frozen base's."""
    import torch

    base = module.base
    decoder = base.get_decoder()
    n_linear = sum(m.weight.numel() for layer in decoder.layers for name, m in layer.named_modules()
                   if isinstance(m, torch.nn.Linear) and "lora_" not in name)
    config = base.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    vocab, hidden = base.get_output_embeddings().weight.shape
    return ModelDims(n_linear=int(n_linear), layers=len(decoder.layers), d_attn=int(heads * head_dim),
                     vocab=int(vocab), hidden=int(hidden))
