from .compressed import CompressedIndex, CompressedPassage, adapter_fingerprint, adapter_size, compress
from .config import CocomConfig
from .method import CocomMethod
from .modules import CocomLightCompressor, CocomTokens
from .recipe import CocomPretrainingCollator

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
