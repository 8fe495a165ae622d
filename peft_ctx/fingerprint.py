"""What identifies an adapter's embeddings: a digest of its settings and saved tensors, cached while they stand.

The serving export records it (an index or a request is checked against the export it is for), and COCOM's
compressed index records the compressor's part of it.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any, Optional

import torch
from peft.utils import get_peft_model_state_dict

from .layer import COMPANION_SEP

# Config fields that say nothing about the embeddings an adapter builds.
_NOT_FINGERPRINTED = frozenset({"inference_mode", "base_model_name_or_path", "revision", "peft_version"})
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapter_digest(model, adapter_name: str, settings: dict[str, Any], select=sorted) -> str:
    """SHA-256 of ``settings`` and of the adapter's saved tensors whose keys ``select`` picks (in its order): names,
    dtypes, shapes and bytes. The one digest behind ``adapter_fingerprint`` and COCOM's index fingerprint."""
    settings_json = json.dumps(settings, sort_keys=True, default=str)
    marks = (f".{adapter_name}.", f".{adapter_name}{COMPANION_SEP}")
    named = list(model.named_parameters()) + list(model.named_buffers())
    tensors = [(name, t) for name, t in named if any(m in name for m in marks)]
    # Checked at request time: the cached digest stands while none of the adapter's tensors moved or changed in place
    # (version counters move with training steps and loading). Building PEFT's state dict and hashing it costs a
    # fraction of a second; walking the adapter's tensors a few milliseconds.
    key = tuple((n, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype)) for n, t in tensors)
    cache = _FINGERPRINTS.setdefault(model, {})
    slot = (adapter_name, settings_json)
    if cache.get(slot, (None,))[0] == key:
        return cache[slot][1]
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    digest = hashlib.sha256(settings_json.encode())
    for name in select(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    cache[slot] = (key, digest.hexdigest())
    return cache[slot][1]


def adapter_fingerprint(model, adapter_name: Optional[str] = None) -> str:
    """SHA-256 of everything that decides an adapter's embeddings and its served decoder: its method and settings
    (prompt template included) and every tensor it saves (context module, LoRA, companions).

    Equal fingerprints mean embeddings made by one adapter are valid on the other's export."""
    adapter_name = adapter_name or model.active_adapter
    config = model.peft_config[adapter_name]
    settings = {k: v for k, v in config.to_dict().items() if k not in _NOT_FINGERPRINTED}
    return adapter_digest(model, adapter_name, settings)
