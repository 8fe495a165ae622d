from .config import XRAGConfig
from .method import XRAGMethod
from .modules import XRAGProjector

__all__ = ["XRAGConfig", "XRAGMethod", "XRAGParaphraseCollator", "XRAGProjector"]


def __getattr__(name: str):
    # The paraphrase collator lives with the recipe, which imports the trainer (trl): loaded on first use.
    if name == "XRAGParaphraseCollator":
        from .recipe import XRAGParaphraseCollator

        return XRAGParaphraseCollator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
