from __future__ import annotations

from torch import nn


class XRAGProjector(nn.Module):
    """The modality projector: Linear(d_r -> d) -> GELU -> Linear(d -> d) [-> GELU -> Linear(d -> d) ...]."""

    def __init__(self, retriever_hidden_size: int, hidden_size: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(retriever_hidden_size, hidden_size)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        self.projector = nn.Sequential(*layers)

    def forward(self, vectors):
        return self.projector(vectors)  # [n_docs, d_r] -> [n_docs, hidden]
