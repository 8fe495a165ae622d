from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from ..config import ContextConfig
from ..encoders import POOLINGS
from ..prompting import RAG_TEMPLATE

PROJECTOR_RE = re.compile(r"^mlp(\d+)x_gelu$")


@dataclass
class XRAGConfig(ContextConfig):
    """xRAG: a frozen retriever's document vector, projected by an MLP into ONE token embedding per document.

    Only the projector trains. ``retriever_hidden_size`` must match the encoder's vector size; the other
    ``retriever_*`` fields record which encoder and pooling the adapter was trained with.
    """

    method_name = "xrag"

    retriever_hidden_size: Optional[int] = field(
        default=None, metadata={"help": "Size d_r of the retriever's document vectors (required), e.g. 384."}
    )
    projector_type: str = field(
        default="mlp2x_gelu",
        metadata={"help": "'mlpNx_gelu': N linear layers with GELU between them; the first maps d_r to d."},
    )
    retriever_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Encoder the projector was trained with (folder or Hub id)."}
    )
    retriever_pooling: Optional[str] = field(
        default=None, metadata={"help": "Pooling of that encoder: 'mean', 'cls', 'last_token' or 'max'."}
    )
    retriever_normalize: Optional[bool] = field(
        default=None, metadata={"help": "Whether that encoder's vectors were L2-normalised."}
    )

    def default_prompt_template(self) -> str:
        return RAG_TEMPLATE

    def __post_init__(self):
        super().__post_init__()
        if (
            not isinstance(self.retriever_hidden_size, int)
            or isinstance(self.retriever_hidden_size, bool)
            or (self.retriever_hidden_size < 1)
        ):
            raise ValueError(
                f"retriever_hidden_size={self.retriever_hidden_size!r}: give the encoder's vector size as a positive "
                "int, e.g. XRAGConfig(retriever_hidden_size=encoder.hidden_size)."
            )
        if self.projector_depth < 1:
            raise ValueError(f"projector_type={self.projector_type!r} needs at least one layer, e.g. 'mlp2x_gelu'.")
        if self.retriever_pooling is not None and self.retriever_pooling not in POOLINGS:
            raise ValueError(f"retriever_pooling={self.retriever_pooling!r}; choose one of {', '.join(POOLINGS)}.")

    @property
    def projector_depth(self) -> int:
        match = PROJECTOR_RE.match(str(self.projector_type))
        if match is None:
            raise ValueError(
                f"projector_type={self.projector_type!r} is not supported; use 'mlpNx_gelu' with N >= 1, "
                "e.g. 'mlp2x_gelu' (Linear -> GELU -> Linear)."
            )
        return int(match.group(1))
