from .config import CocomConfig
from .index import CompressedIndex, CompressedPassage, adapter_fingerprint, adapter_size, compress
from .layer import CocomLightCompressor, CocomTokens
from .model import CocomMethod
from .training import CocomPretrainingCollator

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
