"""SPRING's rows in the harness (read through ``SpringMethod.rows_module``; the library never imports this module)."""

from __future__ import annotations

from ..harness.rows import Entry, MethodRows, Resources
from ..prompting import RAG_TEMPLATE
from .config import SpringConfig

# The demo's SPRING: 8 tokens, inside text RAG's own prompt right before the question, k drawn from 1..8 per batch.
_DEMO_TOKENS = 8
_DEMO_STAGES = {
    "demo": {"qa": {"steps": 12, "batch_size": 4, "learning_rate": 1e-2, "options": {"virtual_tokens_range": [1, 8]}}},
    "reproduce": {
        "qa": {
            "steps": 100, "batch_size": 4, "learning_rate": 1e-2, "options": {"virtual_tokens_range": [1, 8]},
            "save_steps": 50,
        }
    },
}  # fmt: skip


def _demo_config(resources: Resources) -> SpringConfig:
    return SpringConfig(
        num_virtual_tokens=_DEMO_TOKENS,
        base_model_name_or_path=resources.base_model_name_or_path,
        prompt_template=RAG_TEMPLATE.replace("\nQuestion:", "\n{virtual}Question:"),
    )


ROWS = MethodRows(
    demo=(
        Entry(
            "spring",
            "SPRING + RAG",
            _demo_config,
            options={"num_virtual_tokens": _DEMO_TOKENS},
            stages=_DEMO_STAGES,
            trains="the virtual tokens",
        ),
    ),
    benchmark=(
        Entry(
            "spring",
            "SPRING (50 virtual tokens + text)",
            lambda resources: SpringConfig(num_virtual_tokens=50),
            trains="the virtual tokens",
        ),
    ),
    tiny=(Entry("spring", "SPRING", lambda resources: SpringConfig(num_virtual_tokens=4)),),
    paper=(
        Entry("spring", "SPRING", lambda resources: SpringConfig(num_virtual_tokens=50), trains="the virtual tokens"),
    ),
)
