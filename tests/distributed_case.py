"""The training case the FSDP2 test runs twice: sharded over 2 ranks (tests/fsdp_worker.py) and in one process."""

from __future__ import annotations

import torch
from peft import get_peft_model

import peft_ctx
from tests.helpers import TINY_ROWS, encoder_for, perturb, tiny_adapter_config, tiny_model

QUESTIONS = ["What colour is the sky?", "Who wrote the letter?", "Where did the ship sail?", "When was it built?"]
PASSAGES = [
    ["The sky was green all day long in the story."],
    ["The letter was written by Ada in the spring."],
    ["The ship sailed to the northern island of Vell."],
    ["The tower was built in the year 1204 by masons."],
]
ANSWERS = ["green", "Ada", "Vell", "1204"]
STEPS = 3
LR = 1e-3  # small enough that 3 steps stay near-linear: fp32 reduction-order noise is not amplified
METHOD_NAMES = TINY_ROWS


def build(method: str, tokenizer, encoder_dir: str, base=None):
    """The same starting adapter in every process: a seeded tiny llama, adapter tensors set from a fixed seed (LoRA's
    B starts at zero, which would leave the first steps' other gradients zero), no dropout anywhere (COCOM-light's
    BERT compressor has some; each rank would draw its own masks)."""
    base = tiny_model("llama", tokenizer, initializer_range=0.2) if base is None else base  # or a saved copy of it
    model = get_peft_model(base, tiny_adapter_config(method, encoder_dir))
    for module in model.modules():  # LoRA's dropout, and COCOM-light's BERT's
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "dropout_prob", None), float):
            module.dropout_prob = 0.0
    return perturb(model, seed=1)  # COCOM-light's encoder loads partitioned under a ZeRO-3 init: perturb writes it


def rank_inputs(method: str, model, tokenizer, encoder, rank: int, world: int, step: int) -> dict:
    """Rank ``rank``'s one example at ``step``: each step takes the next ``world`` examples, one per rank."""
    i = (step * world + rank) % len(QUESTIONS)
    return peft_ctx.prepare_inputs(
        model, tokenizer, QUESTIONS[i : i + 1], PASSAGES[i : i + 1], answers=ANSWERS[i : i + 1],
        encoder=encoder_for(model, encoder),
    )  # fmt: skip
