from .config import XRAGConfig
from .method import XRAGMethod
from .modules import XRAGProjector

__all__ = ["XRAGConfig", "XRAGMethod", "XRAGProjector"]
