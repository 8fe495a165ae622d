"""COCOM's side of ``merge_adapter``: its decoder LoRA is the one weight delta a peft_ctx adapter adds to the LLM, so
it can be folded into the base weights (decoding at the base model's speed, the context slots still filled at run
time) and taken back out. ``ContextModel.merge_adapter`` / ``unmerge_adapter`` / ``merged_lora_adapters`` reach these
through the method's hooks; other methods refuse to merge."""

from __future__ import annotations

from typing import Optional

from peft.tuners.lora import LoraLayer
from torch import nn


def lora_layers(model: nn.Module, adapter_name: Optional[str] = None) -> list[LoraLayer]:
    """The LoRA layers in ``model`` (those holding ``adapter_name``'s weights, if given)."""
    return [
        module
        for module in model.modules()
        if isinstance(module, LoraLayer) and (adapter_name is None or adapter_name in module.lora_A)
    ]


def merged_adapters(model: nn.Module) -> set[str]:
    """Adapters whose LoRA weights sit in the base weights now."""
    return {name for layer in lora_layers(model) for name in layer.merged_adapters}


def merge(model: nn.Module, adapter_name: str, safe_merge: bool = False) -> bool:
    """Fold ``adapter_name``'s decoder LoRA into the base weights (its separate compressor LoRA, a companion, stays
    apart: compressing then needs the weights unmerged); False when it has none (``lora_r=0``)."""
    layers = lora_layers(model, adapter_name)
    for layer in layers:
        if adapter_name not in layer.merged_adapters:
            layer.merge(safe_merge=safe_merge, adapter_names=[adapter_name])
    return bool(layers)


def unmerge(model: nn.Module) -> None:
    """Take every merged LoRA back out of the base weights."""
    for layer in lora_layers(model):
        if layer.merged:
            layer.unmerge()
