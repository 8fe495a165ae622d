"""xRAG's rows in the harness (read through ``XRAGMethod.rows_module``; the library never imports this module)."""

from __future__ import annotations

from ..harness.rows import Entry, MethodRows, Resources, Target
from .config import XRAGConfig

# The demo's training per profile (StageSettings fields by stage): stage 1 on short Wikipedia passages, stage 2 with
# the cached top-k teacher.
_DEMO_STAGES = {
    "demo": {
        "paraphrase": {"steps": 20, "batch_size": 8, "learning_rate": 3e-3, "max_chars": 200},
        "instruct": {"steps": 24, "batch_size": 8, "learning_rate": 2e-3, "a_kl": 1.0, "teacher_k": 16},
    },
    "reproduce": {
        "paraphrase": {"steps": 250, "batch_size": 8, "learning_rate": 3e-3, "max_chars": 300, "save_steps": 50},
        "instruct": {
            "steps": 200, "batch_size": 8, "learning_rate": 2e-3, "a_kl": 1.0, "teacher_k": 32, "save_steps": 50
        },
    },
}  # fmt: skip


def _demo_config(resources: Resources) -> XRAGConfig:
    return XRAGConfig(
        base_model_name_or_path=resources.base_model_name_or_path,
        **{**resources.retriever(), "retriever_name_or_path": resources.encoder_name_or_path},
    )


ROWS = MethodRows(
    demo=(Entry("xrag", "xRAG (1 token)", _demo_config, stages=_DEMO_STAGES),),
    benchmark=(
        Entry(
            "xrag",
            "xRAG (1 token / document)",
            lambda resources: XRAGConfig(**resources.retriever()),
            trains="the projector (retriever vectors precomputed)",
            targets=(
                Target(
                    "e2e_speedup_vs_rag",
                    3.53,
                    source="xRAG's 3.53x is a FLOPs ratio; its measured time speed-up is 1.64x (A100, bf16)",
                ),
            ),
        ),
    ),
    tiny=(Entry("xrag", "xRAG", lambda resources: XRAGConfig(**resources.retriever())),),
    # The paper's stage 2: the projector of SFR-Embedding-Mistral's 4096-wide vectors.
    paper=(Entry("xrag", "xRAG", lambda resources: XRAGConfig(**resources.retriever()), trains="the projector"),),
)
