from __future__ import annotations

import torch
from torch import nn

from ..distributed import full_shape


class SpringTokens(nn.Module):
    """SPRING's whole adapter: N virtual-token embeddings, of which a call uses the first k."""

    def __init__(self, initial: torch.Tensor) -> None:
        super().__init__()
        # The parameter name is unusual on purpose: PEFT re-inserts the adapter name into saved keys by string
        # replacement, so it must not occur elsewhere in a module path (as "weight" or "embeddings" can).
        self.virtual_tokens = nn.Parameter(initial)  # [N, hidden]

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        # Read through forward, so that engines that gather a module's parameters around its forward (DeepSpeed
        # ZeRO-3) hand over whole tokens, not this rank's empty partition.
        return self.virtual_tokens[index]  # [n_slots] -> [n_slots, hidden]

    @property
    def num_virtual_tokens(self) -> int:
        return full_shape(self.virtual_tokens)[0]
