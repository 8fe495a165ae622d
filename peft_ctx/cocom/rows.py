"""COCOM's rows in the harness (read through ``CocomMethod.rows_module``; the library never imports this module)."""

from __future__ import annotations

from typing import Any, Optional

from ..harness.rows import Entry, MethodRows, Resources, Target
from .config import CocomConfig
from .convert import PISCO_LINEAGE

# The demo's training per profile (StageSettings fields by stage); the demo profile skips pretraining.
_DEMO_STAGES = {
    "demo": {
        "pretrain": {"steps": 0, "batch_size": 4, "learning_rate": 1e-3, "max_chars": 300},
        "qa": {"steps": 10, "batch_size": 4, "learning_rate": 1e-3},
    },
    "reproduce": {
        "pretrain": {"steps": 300, "batch_size": 4, "learning_rate": 1e-3, "max_chars": 300, "save_steps": 60},
        "qa": {"steps": 120, "batch_size": 4, "learning_rate": 1e-3, "save_steps": 60},
    },
}
# ARC's rows pretrain in the demo too (a frozen decoder reads nothing from a fresh bridge), 20% reconstruction as
# ARC's mix, at a learning rate for a whole encoder (COCOM's 1e-3 is for LoRA and new tensors).
_ARC_PRETRAIN = {"batch_size": 4, "learning_rate": 1e-4, "max_chars": 300, "options": {"autoencode_ratio": 0.2}}
_ARC_STAGES = {
    "demo": {
        "pretrain": {"steps": 40, **_ARC_PRETRAIN},
        "qa": {"steps": 10, "batch_size": 4, "learning_rate": 1e-4},
    },
    "reproduce": {
        "pretrain": {"steps": 300, "save_steps": 60, **_ARC_PRETRAIN},
        "qa": {"steps": 120, "batch_size": 4, "learning_rate": 1e-4, "save_steps": 60},
    },
}
_TRAINS = "compressor + decoder LoRA (COCOM-light: encoder, projection, decoder LoRA)"
_ARC_TRAINS = "ARC's encoder, bridge and continuation state (decoder frozen)"
# ARC-Encoder's setting: its Llama-style encoder and bridge, the decoder frozen (no LoRA).
_ARC = dict(compressor_type="arc", lora_r=0)


def _entry(
    name: str,
    rate: int,
    light: bool = False,
    targets: tuple = (),
    arc: bool = False,
    label: Optional[str] = None,
    **settings: Any,
) -> Entry:
    def make_config(resources: Resources) -> CocomConfig:
        # COCOM-light copies the encoder's weights into the adapter; the config records the encoder's name. ARC's
        # encoder is a Llama-style model: the resources' (the tiny rows') or else the base model's own layers.
        compressor = resources.encoder_name_or_path if light else None
        if arc:
            compressor = resources.llama_encoder_name_or_path or resources.base_model_name_or_path
        return CocomConfig(
            compression_rate=rate,
            compressor=compressor,
            base_model_name_or_path=resources.base_model_name_or_path,
            **(_ARC if arc else {}),
            **settings,
        )

    label = label or (f"ARC (COCOM) pf={rate}" if arc else f"COCOM{'-light' if light else ''} xi={rate}")
    trains, stages = (_ARC_TRAINS, _ARC_STAGES) if arc else (_TRAINS, _DEMO_STAGES)
    return Entry(name, label, make_config, stages=stages, trains=trains, targets=targets)


_HEADLINE = (
    Target(
        "ttft_speedup_vs_rag",
        5.69,
        source="COCOM's 5.69x is decoding time at compression 128; at 16 the paper reports 5.00x",
    ),
)
# The tiny models' COCOM: passages of up to 16 tokens into 4 slots, a rank-2 LoRA.
_TINY = dict(max_passage_tokens=16, lora_r=2)
# The paper's training: 128-token passages at xi = 16, LoRA rank 16 (alpha 32); COCOM-light's compressor BERT-base.
_PAPER = dict(max_passage_tokens=128, lora_r=16, lora_alpha=32)


def _paper_light(resources: Resources) -> CocomConfig:
    # With ``encoder_config`` the compressor is built from that config, without weights (the planner's meta device).
    return CocomConfig(
        compression_rate=16,
        compressor=resources.encoder_name_or_path,
        compressor_config=resources.encoder_config,
        **_PAPER,
    )


ROWS = MethodRows(
    demo=(
        _entry("cocom_xi4", 4),
        _entry("cocom_xi16", 16),
        _entry("cocom_light", 4, light=True),
        # ARC on SmolLM2 with SmolLM2's own layers as the encoder; pooling by 4, a 576 -> 256 -> 576 bridge.
        _entry("cocom_arc", 4, arc=True, bridge_hidden_size=256, max_passage_tokens=128),
        # CLaRa's settings (the PISCO lineage) at x16: 128-token passages into 8 memory tokens and a <SEP> each.
        _entry("cocom_clara", 16, label="COCOM xi=16, CLaRa's settings", memory_tokens_per_passage=8, **PISCO_LINEAGE),
    ),
    benchmark=tuple(
        _entry(name, rate, light, targets, max_passage_tokens=256)
        for name, rate, light, targets in (
            ("cocom_xi4", 4, False, ()),
            ("cocom_xi16", 16, False, _HEADLINE),
            ("cocom_xi128", 128, False, ()),
            ("cocom_light", 4, True, ()),
        )
    )
    # ARC's pooling 8 with its release's 2048-wide bridge; the base model's own layers as the encoder. CLaRa's
    # compression-16 setting: 256-token passages into 16 memory tokens and a <SEP> each.
    + (
        _entry("cocom_arc", 8, arc=True, bridge_hidden_size=2048, max_passage_tokens=256),
        _entry(
            "cocom_clara",
            16,
            label="COCOM xi=16, CLaRa's settings",
            max_passage_tokens=258,
            memory_tokens_per_passage=16,
            **PISCO_LINEAGE,
        ),  # fmt: skip
    ),
    tiny=(
        _entry("cocom", 4, **_TINY),
        _entry("cocom_separate", 4, separate_compressor_adapter=True, **_TINY),
        _entry("cocom_light", 4, light=True, **_TINY),
        _entry("cocom_arc", 4, arc=True, bridge_hidden_size=16, max_passage_tokens=16),
        # CLaRa's setting: fixed memory tokens, <SEP> after each passage, compressor and decoder LoRAs. (Its
        # end-to-end query LoRA is not trained by the recipe, which every tiny row's training tests expect.)
        _entry("cocom_clara", 4, **_TINY, **PISCO_LINEAGE, memory_tokens_per_passage=4),
    ),
    paper=(_entry("cocom", 16, **_PAPER), Entry("cocom_light", "COCOM-light xi=16", _paper_light, trains=_TRAINS)),
)
