from .config import SpringConfig
from .layer import SpringTokens
from .model import SpringMethod

__all__ = ["SpringConfig", "SpringMethod", "SpringTokens"]
