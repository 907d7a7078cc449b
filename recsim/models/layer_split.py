"""A decoder run from one of its blocks on: the hidden state entering block l stands in for blocks < l.

Why: when only blocks >= l train (EvoRec's located layers) and dropout is off, the state entering block l
of a fixed input is the same for the current and the frozen pre-update model, at every step of the
update: blocks < l, the embeddings and every LoRA weight below l do not change. Computing it once per
input and running only blocks >= l afterwards gives the same numbers (up to float round-off from other batch
shapes) at a fraction of the cost.

How, without copying transformers' forward: both passes are the decoder's own forward with `decoder.layers`
set, for the call only, to a slice of its blocks: blocks < l, the state taken by a pre-hook where the final
norm reads it; then blocks >= l with `inputs_embeds` = that state. Checked on transformers 5.24's
LlamaModel.forward: `inputs_embeds` is used as it is (no embedding scale), the causal mask depends on it
only through its shape, dtype and device, the rotary embeddings only on `position_ids` (and the state's
dtype), and the block loop is `for layer in self.layers[: config.num_hidden_layers]`, so a sliced
`layers` runs exactly those blocks. A model whose forward does more with `inputs_embeds` (Gemma
scales it) would not satisfy this: `split_matches` compares one batch against the full pass, and callers
fall back to full passes when it fails.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from recsim.backbones.lora import layer_of


def lowest_trainable_layer(model) -> int | None:
    """The lowest decoder block that holds a trainable parameter of `model`.

    0 when a trainable parameter lies outside the blocks (embeddings, final norm, head): then every block
    sees a changing input. None when nothing trains.
    """
    layers = [layer_of(n) for n, p in model.named_parameters() if p.requires_grad]
    if not layers:
        return None
    return 0 if any(l is None for l in layers) else min(layers)


@contextmanager
def blocks(decoder, start: int, stop: int | None = None):
    """`decoder.layers` is the blocks [start, stop) within the block (then the full list again)."""
    full = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(full)[start:stop])  # the same block objects: same parameters
    try:
        yield
    finally:
        decoder.layers = full


def state_entering(module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state [B, L, H] entering block `layer` in `module._decode(input_ids, attention_mask)`: the
    embeddings and blocks < `layer` run (not the others); the state is taken where the final norm reads it."""
    decoder = module.base.get_decoder()
    held: dict[str, torch.Tensor] = {}
    handle = decoder.norm.register_forward_pre_hook(lambda m, args: held.__setitem__("state", args[0]))
    try:
        with blocks(decoder, 0, layer):
            module._decode(input_ids, attention_mask)
    finally:
        handle.remove()
    return held["state"]


def decode_from(module, layer: int, state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`module._decode(...).last_hidden_state` [B, L, H] of the input whose state entering block `layer` is
    `state` [B, L, H]: blocks >= `layer` and the final norm run, with the position ids `_decode` derives
    from `attention_mask` (the pre-hook saw the same ones)."""
    with blocks(module.base.get_decoder(), layer):
        return module._decode(None, attention_mask, inputs_embeds=state).last_hidden_state


def split_matches(full: torch.Tensor, split: torch.Tensor) -> bool:
    """Whether the split pass reproduced the full one on a batch (the same shapes: equal up to round-off)."""
    scale = float(full.detach().abs().max().clamp(min=1.0))
    return bool(torch.allclose(full.detach().float(), split.detach().float(), rtol=1e-3, atol=1e-3 * scale))
