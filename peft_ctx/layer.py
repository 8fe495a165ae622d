"""The tuner layer shared by all peft_ctx methods: it wraps the model's input embedding once.

Context slots are marked by a boolean ``context_mask`` that travels with ``input_ids``. On the prefill call the
wrapped embedding writes the active adapter's slot embeddings into exactly those positions (LLaVA-style
``masked_scatter``); every other position keeps the base embedding bit for bit. Marking slots by position rather than
by a token id means no embedding resize and no possible collision with a token the user's text contains.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .methods import MERGE_MESSAGE, get_method

# An adapter's companion weight sets (see ContextMethod.companion_roles) sit in PEFT layers as "<adapter>__<role>";
# in the saved file they become "<role>", so an adapter loads under any name.
COMPANION_SEP = "__"


def companion_name(adapter_name: str, role: str) -> str:
    return f"{adapter_name}{COMPANION_SEP}{role}"


class ContextEmbedding(nn.Module, BaseTunerLayer):
    """Wraps the input embedding; holds each adapter's module (projector, virtual tokens, compressor ...)."""

    adapter_layer_names = ("ctx_modules",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ctx_modules = nn.ModuleDict()
        self.configs: dict[str, Any] = {}
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        # (context_mask, inputs) set by ContextModel for the length of one forward / generate call.
        self._pending: Optional[tuple[torch.Tensor, dict[str, Any]]] = None
        self._consumed = False

    def update_layer(self, adapter_name: str, config, model_config: Any) -> None:
        method = get_method(config.method)
        module = method.create_module(config, self.base_layer, model_config)
        weight = self.base_layer.weight
        on_meta = any(p.device.type == "meta" for p in module.parameters())
        # low_cpu_mem_usage creates the module on the meta device; PEFT materialises it when the weights load.
        if weight.device.type != "meta" and not on_meta:
            module.to(weight.device)
        self.ctx_modules[adapter_name] = module
        self.configs[adapter_name] = config
        self.set_adapter(self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(MERGE_MESSAGE)

    def unmerge(self) -> None:
        raise ValueError(MERGE_MESSAGE)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.configs.pop(adapter_name, None)

    def active_method_adapter(self) -> str:
        active = [name for name in self.active_adapters if name in self.ctx_modules]
        if len(active) != 1:
            raise ValueError(
                f"Exactly one peft_ctx adapter must be active to fill context slots, found {self.active_adapters}; "
                "choose one with model.set_adapter(name)."
            )
        return active[0]

    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        embeds = self.base_layer(input_ids, *args, **kwargs)  # [batch, seq, hidden]
        if self._pending is None or self.disable_adapters:
            return embeds
        context_mask, inputs = self._pending  # [batch, prompt_len]
        if input_ids.shape[0] != context_mask.shape[0] or input_ids.shape[1] < context_mask.shape[1]:
            if not self._consumed:
                raise ValueError(
                    f"context_mask has shape {tuple(context_mask.shape)} but input_ids has shape "
                    f"{tuple(input_ids.shape)}; build both with peft_ctx.prepare_inputs (they are padded together)."
                )
            # A KV-cache decoding step: the context lives in the cache already.
            return embeds
        if input_ids.shape[1] > context_mask.shape[1]:
            # generate(use_cache=False) re-reads prompt + generated tokens; the slots are still the prompt's.
            context_mask = torch.nn.functional.pad(context_mask, (0, input_ids.shape[1] - context_mask.shape[1]))
        self._consumed = True
        adapter_name = self.active_method_adapter()
        config = self.configs[adapter_name]
        method = get_method(config.method)
        slots = method.slot_embeddings(self.ctx_modules[adapter_name], context_mask, inputs, embeds.dtype)
        n_slots = int(context_mask.sum())
        if slots.shape != (n_slots, embeds.shape[-1]):
            raise ValueError(
                f"The prompt has {n_slots} context slots but the adapter produced {slots.shape[0]} embeddings of size "
                f"{slots.shape[-1]} (model hidden size {embeds.shape[-1]}); each document needs its slots in the "
                "prompt."
            )
        # Out of place so that gradients reach the adapter module through the scattered rows only.
        return embeds.masked_scatter(context_mask.unsqueeze(-1).to(embeds.device), slots.to(embeds.device))
