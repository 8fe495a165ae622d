"""Document vectors encoded once, offline, stored as safetensors with what produced them."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_KEY = "vectors"


def save_vectors(
    path: str, vectors: torch.Tensor, encoder=None, metadata: Optional[dict] = None, overwrite: bool = False
) -> None:
    """Write ``vectors`` ([n_docs, d_r]) to a safetensors file, recording the encoder that made them."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    if vectors.dim() != 2:
        raise ValueError(f"vectors must be [n_docs, dim], got shape {tuple(vectors.shape)}.")
    meta = dict(metadata or {})
    if encoder is not None:
        meta.update(encoder.describe())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    save_file({_KEY: vectors.detach().float().cpu().contiguous()}, tmp, metadata={"peft_ctx": json.dumps(meta)})
    os.replace(tmp, path)  # a half-written file never takes the real name


def load_vectors(path: str) -> tuple[torch.Tensor, dict]:
    """Read vectors written by ``save_vectors``; returns (vectors [n_docs, d_r], metadata)."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("peft_ctx", "{}"))
            if _KEY not in f.keys():
                raise ValueError(f"{path} holds no {_KEY!r} tensor; it was not written by peft_ctx.save_vectors.")
            return f.get_tensor(_KEY), meta
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"Cannot read document vectors from {path}: {exc}") from exc
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError":
            raise ValueError(f"{path} is not a valid safetensors file ({exc}).") from exc
        raise
