"""A method's state on disk without pickle: tensors into a safetensors file, everything else into JSON.

Loading a pickled file executes whatever code it names, so a run directory copied from elsewhere could
run code on resume; safetensors and JSON hold data only. `save_state(folder, state)` writes
`<prefix>_state.json` and, when the state holds tensors, `<prefix>_tensors.safetensors`; `load_state(folder)`
gives back an equal dict (tensors on the CPU; tuples come back as lists, JSON has no tuple).

A state is a dict with string keys whose values are tensors, JSON values (None, bool, int, float, str)
or lists / dicts of those, nested freely. Anything else (a numpy array, a set, an object) is rejected
with an error naming its key path: convert it in the method's `state_dict` rather than guess here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch
import torch

TENSOR = "__tensor__"  # JSON placeholder {"__tensor__": "<name in the safetensors file>"}


def _split(value, path: str, tensors: dict):
    """The JSON form of `value`, with its tensors moved into `tensors` under their key path."""
    if isinstance(value, torch.Tensor):
        # clone: safetensors refuses tensors that share storage (views, tied weights)
        tensors[path] = value.detach().cpu().contiguous().clone()
        return {TENSOR: path}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"method state key {path}.{bad[0]!r}: keys must be strings (JSON), "
                            f"got {type(bad[0]).__name__}")
        if TENSOR in value:
            raise TypeError(f"method state key {path}.{TENSOR}: this key name is reserved")
        return {k: _split(v, f"{path}.{k}" if path else k, tensors) for k, v in value.items()}
    raise TypeError(f"method state key {path!r}: {type(value).__name__} is neither a tensor nor a JSON value "
                    "(None, bool, int, float, str, list, dict)")


def _join(value, tensors: dict):
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            return tensors[value[TENSOR]]
        return {k: _join(v, tensors) for k, v in value.items()}
    return value


def _paths(folder: Path, prefix: str) -> tuple[Path, Path]:
    return folder / f"{prefix}_state.json", folder / f"{prefix}_tensors.safetensors"


def save_state(folder: str | Path, state: dict, prefix: str = "method") -> None:
    if not isinstance(state, dict):
        raise TypeError(f"a {prefix} state must be a dict, got {type(state).__name__}")
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    plain = _split(state, "", tensors)
    json_path, tensor_path = _paths(folder, prefix)
    if tensors:
        safetensors.torch.save_file(tensors, str(tensor_path))
    elif tensor_path.exists():
        os.remove(tensor_path)  # a stale file from an earlier save must not come back on load
    json_path.write_text(json.dumps(plain, indent=2, allow_nan=True) + "\n")


def load_state(folder: str | Path, prefix: str = "method") -> dict:
    folder = Path(folder)
    json_path, tensor_path = _paths(folder, prefix)
    if not json_path.is_file():
        legacy = " (it has a pickled method.pt from an older recsim, which is never loaded)" \
            if (folder / "method.pt").exists() else ""
        raise FileNotFoundError(f"{json_path} not found{legacy}: delete {folder} to recompute that stage")
    tensors = safetensors.torch.load_file(str(tensor_path)) if tensor_path.is_file() else {}
    return _join(json.loads(json_path.read_text()), tensors)
