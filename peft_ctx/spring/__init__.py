from .config import SpringConfig
from .method import SpringMethod
from .modules import SpringTokens

__all__ = ["SpringConfig", "SpringMethod", "SpringTokens"]
