"""Document vectors encoded once, offline, stored as safetensors with what produced them."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors.torch import save_file

from .checkpoints import read_tagged_safetensors

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
    tensors, meta = read_tagged_safetensors(path, "document vectors")
    if _KEY not in tensors:
        raise ValueError(f"{path} holds no {_KEY!r} tensor; it was not written by peft_ctx.save_vectors.")
    return tensors[_KEY], meta
