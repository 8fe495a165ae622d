from .compressed import CompressedIndex, CompressedPassage, adapter_fingerprint, adapter_size, compress
from .config import CocomConfig
from .method import CocomMethod
from .modules import CocomLightCompressor, CocomTokens
from .retrieval import Retrieved, query_states, search

__all__ = [
    "CocomConfig",
    "CocomLightCompressor",
    "CocomMethod",
    "CocomPretrainingCollator",
    "CocomTokens",
    "CompressedIndex",
    "CompressedPassage",
    "Retrieved",
    "adapter_fingerprint",
    "adapter_size",
    "compress",
    "query_states",
    "search",
]


def __getattr__(name: str):
    # The pretraining collator lives with the recipe, which imports the trainer (trl): loaded on first use.
    if name == "CocomPretrainingCollator":
        from .recipe import CocomPretrainingCollator

        return CocomPretrainingCollator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
