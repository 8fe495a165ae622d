"""peft_ctx: RAG context compression (xRAG, SPRING, COCOM) as ordinary PEFT adapters.

``import peft_ctx`` registers the adapter type with PEFT, after which ``get_peft_model``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` handle peft_ctx adapters like any other.
"""

from . import _registration, local_copies

# The methods register as they are imported; this order is the order of the demo's and the benchmarks' rows.
from .xrag import XRAGConfig

# isort: split
from .spring import SpringConfig

# isort: split
from .cocom import CocomConfig, CompressedIndex, adapter_size, compress

# isort: split
from .config import ContextConfig
from .converting import convert
from .distributed import gathered_adapter_state_dict
from .encoders import Encoder
from .inference import generate, generate_baseline, prepare_inputs
from .layer import ContextEmbedding
from .methods import ContextMethod, get_method, register_method, registered_methods
from .model import ContextModel
from .serving import LlamaCppEngine, VllmEngine, check_export, export_for_serving, prompt_embeds
from .vectors import load_vectors, save_vectors
from .version import __version__

_registration.register(ContextConfig, ContextModel)

__all__ = [
    "CocomConfig",
    "CompressedIndex",
    "ContextConfig",
    "ContextEmbedding",
    "ContextMethod",
    "ContextModel",
    "Encoder",
    "LlamaCppEngine",
    "VllmEngine",
    "SpringConfig",
    "XRAGConfig",
    "__version__",
    "adapter_size",
    "check_export",
    "compress",
    "convert",
    "export_for_serving",
    "gathered_adapter_state_dict",
    "generate",
    "generate_baseline",
    "get_method",
    "load",
    "local_copies",
    "load_vectors",
    "prepare_inputs",
    "prompt_embeds",
    "push_to_hub",
    "register_method",
    "registered_methods",
    "save_vectors",
]


def __getattr__(name: str):
    # The Hub functions (huggingface_hub's upload client, model cards) load on first use, not with the adapter type.
    if name in ("load", "push_to_hub"):
        from . import hub

        return getattr(hub, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
