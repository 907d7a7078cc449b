"""Named LoRA adapters of one peft model: add, copy, freeze, train, activate (several at once), save and load.

A thin layer over a peft `PeftModel`, so that methods with more than one adapter never reach into peft.
Choices:
- `add` creates a LoRA-only adapter (no trainable-token deltas, no modules_to_save, whatever "default" has):
  peft cannot activate two adapters that both hold token deltas or embedding copies, so the item-token
  rows and embedding copies stay with "default".
- `add` and `activate` leave every requires_grad flag as it was (peft's set_adapter makes the active
  adapters trainable and the others frozen; that is undone): what trains is only ever `trainable`'s choice.
- several active adapters: each LoRA layer adds every active adapter's B·A·x·scaling to the base output
  (peft's LoraModel with a list of names), so the model is W0 + Σ_k ΔW_k.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig

from recsim.backbones import lora as lora_ops

NAMES_FILE = "adapter_names.json"  # the names list next to peft's files ("default" at the root, others in subfolders)


class Adapters:
    def __init__(self, model):
        self.model = model  # a peft PeftModel

    def names(self) -> list[str]:
        return list(self.model.peft_config)

    def _check(self, name: str) -> None:
        if name not in self.model.peft_config:
            raise ValueError(f"adapter {name!r} does not exist (adapters: {self.names()})")

    def add(self, name: str, lora_cfg=None, copy_from: str | None = None, seed: int | None = None) -> None:
        """A new inactive, frozen adapter: a fresh LoRA with "default"'s settings (or `lora_cfg`: a peft LoraConfig
        or recsim's backbone.lora with r, alpha, dropout, target_modules), then, with `copy_from`, that adapter's
        weights. `seed`: the RNG of its fresh A matrices (the global RNG is left as it was)."""
        if name in self.model.peft_config:
            raise ValueError(f"adapter {name!r} exists already (adapters: {self.names()})")
        if lora_cfg is None:
            config = copy.deepcopy(self.model.peft_config["default"])
        elif isinstance(lora_cfg, LoraConfig):
            config = copy.deepcopy(lora_cfg)
        else:
            config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                                target_modules=list(lora_cfg.target_modules), task_type="CAUSAL_LM")
        config.trainable_token_indices, config.modules_to_save = None, None  # LoRA only (see the module doc)
        flags = self._flags()
        active = self.active()
        with torch.random.fork_rng():
            if seed is not None:
                torch.manual_seed(seed)
            self.model.add_adapter(name, config)
        self.activate(*active)
        self._restore(flags)
        for p in lora_ops.lora_parameters(self.model, name).values():
            p.requires_grad_(False)
        if copy_from is not None:
            self.copy(copy_from, name)

    def copy(self, src: str, dst: str) -> None:
        """dst's LoRA matrices := src's (same module set and rank required)."""
        self._check(src)
        self._check(dst)
        source = lora_ops.lora_parameters(self.model, src)
        with torch.no_grad():
            for n, p in lora_ops.lora_parameters(self.model, dst).items():
                other = source.get(n.replace(f".{dst}.", f".{src}."))
                if other is None or other.shape != p.shape:
                    raise ValueError(f"adapters {src!r} and {dst!r} differ at {n} (module set or rank): cannot copy")
                p.copy_(other)

    def freeze(self, name: str) -> None:
        self._check(name)
        for p in lora_ops.lora_parameters(self.model, name).values():
            p.requires_grad_(False)

    def trainable(self, name: str, layers: set[int] | None = None) -> int:
        """Only `name`'s parameters (of `layers`, all when None) train; everything else gets requires_grad=False.
        Returns the number of trainable parameters."""
        self._check(name)
        return lora_ops.set_trainable(self.model, layers, name)

    def activate(self, *names: str) -> None:
        """The adapters the forward pass uses; with several, their deltas are summed."""
        if not names:
            raise ValueError("activate needs at least one adapter name")
        for n in names:
            self._check(n)
        flags = self._flags()
        self.model.base_model.set_adapter(list(names) if len(names) > 1 else names[0])
        self.model.active_adapter = names[0]  # PeftModel looks up its config by this name: a string
        self._restore(flags)

    def active(self) -> list[str]:
        return list(self.model.base_model.active_adapters)

    def snapshot(self, name: str) -> dict[str, torch.Tensor]:
        self._check(name)
        return lora_ops.snapshot(self.model, name)

    def load_snapshot(self, name: str, state: dict[str, torch.Tensor]) -> None:
        own = lora_ops.lora_parameters(self.model, name)
        foreign = [k for k in state if k not in own]
        if foreign:
            raise ValueError(f"snapshot tensors {foreign[:3]} are not adapter {name!r}'s")
        lora_ops.load_snapshot(self.model, state)

    def bytes(self, names: list[str] | None = None) -> int:
        """Storage of those adapters' tensors (all adapters when None), in bytes."""
        return sum(p.numel() * p.element_size() for n in (self.names() if names is None else names)
                   for p in lora_ops.lora_parameters(self.model, n).values())

    def save(self, folder: str | Path) -> None:
        """peft's format: "default" in `folder`, every other adapter in `folder/<name>` (adapter_config.json +
        adapter_model.safetensors, keys without the adapter name, as peft writes them), plus the names list.
        The other adapters are written here, not by peft's save_pretrained: with item-token rows on "default"
        peft looks for every saved adapter's token deltas, which LoRA-only adapters do not have (KeyError)."""
        import safetensors.torch

        folder = Path(folder)
        self.model.save_pretrained(str(folder), selected_adapters=["default"])
        for name in self.names():
            if name == "default":
                continue
            sub = folder / name
            sub.mkdir(parents=True, exist_ok=True)
            self.model.peft_config[name].save_pretrained(str(sub))
            tensors = {k.replace(f".{name}.", "."): v.detach().contiguous().cpu()
                       for k, v in lora_ops.lora_parameters(self.model, name).items()}
            safetensors.torch.save_file(tensors, str(sub / "adapter_model.safetensors"))
        (folder / NAMES_FILE).write_text(json.dumps(self.names()) + "\n")

    @staticmethod
    def saved_names(folder: str | Path) -> list[str]:
        """The adapter names `save` wrote into `folder` (["default"] for a folder from before the names list)."""
        listed = Path(folder) / NAMES_FILE
        return json.loads(listed.read_text()) if listed.is_file() else ["default"]

    def load(self, folder: str | Path) -> None:
        """Fills the model's adapters from the folder. Every adapter must exist already (a method re-creates its own
        in `load_state_dict`, before this); one the folder holds that the model lacks is skipped (a shared stage 0
        trained by another method may hold that method's adapters), and one the model has but the folder lacks
        is left as it is (a shared stage 0 has no method-specific adapters)."""
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        folder = Path(folder)
        for name in self.names():
            sub = folder if name == "default" else folder / name
            if not (sub / "adapter_config.json").is_file():
                continue
            if name == "default":
                set_peft_model_state_dict(self.model, load_peft_weights(str(sub)), adapter_name=name)
                continue
            own = lora_ops.lora_parameters(self.model, name)
            saved = load_peft_weights(str(sub))
            state = {}
            for key, value in saved.items():  # peft's key -> this adapter's parameter (".lora_A.weight" -> ".lora_A.<name>.weight")
                target = key.replace(".lora_A.", f".lora_A.{name}.").replace(".lora_B.", f".lora_B.{name}.")
                if target not in own:
                    raise ValueError(f"{sub}: tensor {key} matches no parameter of adapter {name!r}")
                state[target] = value
            missing = sorted(set(own) - set(state))
            if missing:
                raise ValueError(f"{sub}: adapter {name!r} lacks {len(missing)} tensors (e.g. {missing[0]})")
            lora_ops.load_snapshot(self.model, state)

    # requires_grad of every parameter, so that peft's set_adapter changes none of them
    def _flags(self) -> dict[str, bool]:
        return {n: p.requires_grad for n, p in self.model.named_parameters()}

    def _restore(self, flags: dict[str, bool]) -> None:
        for n, p in self.model.named_parameters():
            p.requires_grad_(flags.get(n, False))
