from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from ..config import ContextConfig, is_int
from ..encoders import POOLINGS
from ..prompting import RAG_TEMPLATE

PROJECTOR_RE = re.compile(r"^mlp(\d+)x_gelu$")
# The official xRAG prompts (Mistral's [INST] format written out as plain text, so use_chat_template=False): the
# evaluation prompt of its eval script, which converted checkpoints get, and its stage-2 training prompt (where
# {question} is the instruction). The official prompt appends "?" to every question.
OFFICIAL_EVAL_TEMPLATE = (
    "[INST] Refer to the background document and answer the questions:\n\nBackground: {context}\n\n"
    "Question: {question}? [/INST] The answer is:"
)
OFFICIAL_TRAIN_TEMPLATE = "[INST] Refer to the background document: {context}\n\n{question} [/INST]"
# The official retriever reads at most this many tokens per chunk; a longer document gets one slot per chunk.
OFFICIAL_CHUNK_TOKENS = 180

# The training recipe's stages, in order (recipe.py runs them; kept here so that the method needs no trainer).
STAGES = ("paraphrase", "instruct")


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
    chunk_tokens: Optional[int] = field(
        default=None,
        metadata={
            "help": "Split a text document into chunks of at most this many retriever tokens, each encoded into its "
            "own vector and slot (official xRAG: 180; train/xrag.py and converted checkpoints use 180). None (the "
            "default, and what adapters saved before this field had): one vector per document, truncated at the "
            "encoder's max_length."
        },
    )
    slot_separator: str = field(
        default="",
        metadata={"help": "Text between the slots of consecutive chunks / documents (the official prompt: ' ')."},
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
        if self.chunk_tokens is not None and (not is_int(self.chunk_tokens) or self.chunk_tokens < 8):
            raise ValueError(
                f"chunk_tokens={self.chunk_tokens!r}; give a chunk size of at least 8 retriever tokens (official: "
                f"{OFFICIAL_CHUNK_TOKENS}), or None for one vector per document."
            )
        if not isinstance(self.slot_separator, str):
            raise ValueError(f"slot_separator={self.slot_separator!r}; give a string, e.g. ' ' or ''.")
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
