"""peft_ctx: RAG context compression (xRAG, SPRING, COCOM) as ordinary PEFT adapters.

``import peft_ctx`` registers the adapter type with PEFT, after which ``get_peft_model``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` handle peft_ctx adapters like any other.
"""

from . import _registration
from .cocom import CocomConfig, CompressedIndex, adapter_size, compress
from .config import ContextConfig
from .encoders import Encoder
from .hub import load, push_to_hub
from .index import load_vectors, save_vectors
from .inference import generate, generate_baseline, prepare_inputs
from .spring import SpringConfig
from .tuner import ContextEmbedding, ContextModel
from .version import __version__
from .xrag import XRAGConfig

_registration.register(ContextConfig, ContextModel)

__all__ = [
    "CocomConfig",
    "CompressedIndex",
    "ContextConfig",
    "ContextEmbedding",
    "ContextModel",
    "Encoder",
    "SpringConfig",
    "XRAGConfig",
    "__version__",
    "adapter_size",
    "compress",
    "generate",
    "generate_baseline",
    "load",
    "load_vectors",
    "prepare_inputs",
    "push_to_hub",
    "save_vectors",
]
