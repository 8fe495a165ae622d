from .config import XRAGConfig
from .layer import XRAGProjector
from .model import XRAGMethod

__all__ = ["XRAGConfig", "XRAGMethod", "XRAGProjector"]
