"""Reading other projects' checkpoints safely: safetensors, or torch files with ``weights_only=True`` only."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterable

import torch
from safetensors import safe_open


def load_tensor_file(path: str) -> dict[str, torch.Tensor] | torch.Tensor:
    """A ``.pt`` / ``.bin`` file's tensors, refusing anything that is not plain tensors (never unpickles code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path} contains Python objects other than tensors; peft_ctx loads checkpoints only with "
            f"torch.load(weights_only=True) and will not unpickle it ({str(exc).splitlines()[0]})."
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"Cannot read {path} as a torch tensor file: {exc}") from exc


def read_tagged_safetensors(path: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a safetensors file peft_ctx wrote (``save_vectors``, ``CompressedIndex.save``) and the JSON it
    keeps under the ``peft_ctx`` metadata key; a file that cannot be read gives a ValueError naming it and ``what``
    it should hold."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = json.loads((f.metadata() or {}).get("peft_ctx", "{}"))
            return {key: f.get_tensor(key) for key in f.keys()}, metadata
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"Cannot read {what} from {path}: {exc}") from exc
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError":  # safetensors' own error type is not exported by every version
            raise ValueError(f"{path} is not a valid safetensors file ({exc}).") from exc
        raise


def _weight_files(checkpoint_dir: str) -> list[str]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(checkpoint_dir, index_name)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            return sorted({os.path.join(checkpoint_dir, name) for name in weight_map.values()})
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(checkpoint_dir, name)
        if os.path.isfile(path):
            return [path]
    raise ValueError(
        f"No weights in {checkpoint_dir}: expected model.safetensors, pytorch_model.bin or a sharded index "
        "(model.safetensors.index.json)."
    )


def read_checkpoint_tensors(checkpoint_dir: str, wanted: callable) -> dict[str, torch.Tensor]:
    """The tensors of a (possibly sharded) full-model checkpoint whose key satisfies ``wanted``, read lazily."""
    out: dict[str, torch.Tensor] = {}
    for path in _weight_files(checkpoint_dir):
        if path.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        if wanted(key):
                            out[key] = f.get_tensor(key)
            except Exception as exc:
                raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
        else:
            state = load_tensor_file(path)
            if not isinstance(state, dict):
                raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
            out.update({k: v for k, v in state.items() if wanted(k)})
    return out


def checkpoint_keys(checkpoint_dir: str) -> Iterable[str]:
    """Every tensor name of a (possibly sharded) checkpoint, without reading safetensors data."""
    keys: list[str] = []
    for path in _weight_files(checkpoint_dir):
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                keys.extend(f.keys())
        else:
            keys.extend(load_tensor_file(path))
    return keys
