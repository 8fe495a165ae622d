"""Adapters under a sharding engine (FSDP2, DeepSpeed ZeRO-3) or data parallel (DDP): whole shapes, gathered reads,
models loaded unpartitioned, and the gathered save.

Under FSDP2 every parameter is a ``DTensor`` holding this rank's shard; under ZeRO-3 a parameter outside its
module's forward is an empty placeholder. ``save_pretrained`` on such a model writes shards or empty tensors, so the
adapter is gathered first, and only the adapter: a 7B base is never assembled on one rank to save a few MB.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from peft.utils import get_peft_model_state_dict


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """A parameter's whole shape, also for a DeepSpeed ZeRO-3 partition (whose own ``shape`` is ``[0]``)."""
    return getattr(tensor, "ds_shape", tensor.shape)


def partitioned(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The DeepSpeed ZeRO-3 partitioned ones among ``params``."""
    return [p for p in params if hasattr(p, "ds_id")]


@contextlib.contextmanager
def gathered(*params: torch.Tensor) -> Iterator[None]:
    """Whole values of ZeRO-3 partitioned ``params`` inside the block, to read (a model built under
    ``deepspeed.zero.Init`` has them partitioned before any engine gathers them for a forward); a no-op otherwise."""
    parts = partitioned(params)
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=None):
        yield


@contextlib.contextmanager
def unpartitioned_loading() -> Iterator[None]:
    """``from_pretrained`` inside the block loads whole weights even while a DeepSpeed ZeRO-3 run is set up (which
    makes transformers partition every model it loads): for frozen helpers that run outside the engine, such as
    xRAG's retriever."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # transformers without its DeepSpeed integration: nothing partitions
        yield
        return
    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    active = ref() if ref is not None else None
    if active is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(active)


def adapter_keys(model, adapter_name: str = "default") -> list[str]:
    """The keys of ``model.state_dict()`` that ``save_pretrained`` writes for ``adapter_name`` (in state-dict order).

    PEFT renames keys as it selects them, so the selection runs on a state dict whose values are their own
    positions, which survive the renaming.
    """
    keys = list(model.state_dict(keep_vars=True))
    positions = {key: torch.tensor(i) for i, key in enumerate(keys)}
    selected = get_peft_model_state_dict(
        model, state_dict=positions, adapter_name=adapter_name, save_embedding_layers=False
    )
    return [keys[int(value)] for value in selected.values()]


def gathered_adapter_state_dict(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors, whole and on the CPU, under their ``model.state_dict()`` keys, ready for
    ``model.save_pretrained(folder, state_dict=...)`` (or ``peft_ctx.training.save_adapter``).

    Works on a plain model, under DDP, FSDP2 (``DTensor`` parameters) and DeepSpeed ZeRO-3 (partitioned parameters).
    Collective under the sharding engines: every rank must call it, in the same order.

    Example:

    ```py
    >>> state = gathered_adapter_state_dict(model)  # on every rank
    >>> if torch.distributed.get_rank() == 0:
    ...     save_adapter(model, "out", state_dict=state)
    ```
    """
    keys = adapter_keys(model, adapter_name)
    tensors = model.state_dict(keep_vars=True)
    whole: dict[str, torch.Tensor] = {}
    with gathered(*(tensors[key] for key in keys)):  # ZeRO-3 partitions (one collective for all of them)
        for key in keys:
            value = tensors[key].detach()
            if hasattr(value, "full_tensor"):  # an FSDP2 / tensor-parallel DTensor: all-gather its shards
                value = value.full_tensor()
            whole[key] = value.cpu().clone()
    return whole
