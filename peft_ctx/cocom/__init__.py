from .compressed import CompressedIndex, CompressedPassage, adapter_fingerprint, adapter_size, compress
from .config import CocomConfig
from .method import CocomMethod
from .modules import CocomLightCompressor, CocomTokens

__all__ = [
    "CocomConfig",
    "CocomLightCompressor",
    "CocomMethod",
    "CocomPretrainingCollator",
    "CocomTokens",
    "CompressedIndex",
    "CompressedPassage",
    "adapter_fingerprint",
    "adapter_size",
    "compress",
]


def __getattr__(name: str):
    # The pretraining collator lives with the recipe, which imports the trainer (trl): loaded on first use.
    if name == "CocomPretrainingCollator":
        from .recipe import CocomPretrainingCollator

        return CocomPretrainingCollator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
