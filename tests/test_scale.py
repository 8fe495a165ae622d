"""What training at scale relies on, checked on tiny models on the CPU for every method: a bf16 base trains with fp32
adapter tensors, and gradient checkpointing is exact (the same gradients as a plain backward pass, through PEFT's
``enable_input_require_grads`` path (reentrant checkpoints) and non-reentrant ones; COCOM's dtype x reentrancy matrix
with a separate compressor LoRA is in test_cocom.py)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import peft_ctx
from tests.helpers import (
    TINY_ROWS,
    changed,
    encoder_for,
    gradients_apart,
    perturb,
    snapshot,
    tiny_adapter,
    tiny_adapter_config,
    tiny_model,
)

QUESTIONS = ["What colour is the sky?", "Who wrote the letter?"]
PASSAGES = [["The sky was green all day long in the story."], ["The letter was written by Ada in the spring."]]
ANSWERS = ["green", "Ada"]


# Both kinds of checkpoint on llama; PEFT's usual (reentrant) one on gpt2, whose blocks are built differently.
CASES = [(m, "llama", r) for m in TINY_ROWS for r in (True, False)] + [(m, "gpt2", True) for m in TINY_ROWS]


@pytest.mark.parametrize(("method", "arch", "reentrant"), CASES)
def test_checkpointed_gradients_equal_the_plain_ones(method, arch, reentrant, tokenizer, encoder_dir, encoder):
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_adapter(method, arch, tokenizer, encoder_dir)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        inputs = peft_ctx.prepare_inputs(
            model, tokenizer, QUESTIONS, PASSAGES, answers=ANSWERS, encoder=encoder_for(model, encoder)
        )
        model(**inputs).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain and set(plain) == set(checkpointed)
    wrong = gradients_apart(plain, checkpointed)
    assert not wrong, f"{len(wrong)} of {len(plain)} gradients differ, e.g. {wrong[:3]}"


def test_the_gradient_comparison_tolerates_rounding_and_catches_wrong_gradients():
    torch.manual_seed(0)
    want = {"big": torch.randn(8, 8), "small": torch.randn(8) * 1e-2, "zero_in_theory": torch.randn(4) * 1e-12}
    noise = {n: t + 1e-5 * t.abs().max() * torch.randn_like(t) for n, t in want.items()}  # other rounding
    noise["zero_in_theory"] = torch.randn(4) * 1e-11
    assert gradients_apart(want, noise) == []
    assert gradients_apart(want, {**want, "small": want["small"] * 1.5}) == ["small"]
    assert gradients_apart(want, {**want, "big": torch.zeros(8, 8)}) == ["big"]
    assert gradients_apart(want, {n: -t for n, t in want.items()}) == ["big", "small"]


@pytest.mark.parametrize("method", TINY_ROWS)
def test_a_bf16_base_trains_a_step_with_fp32_adapter_tensors(method, tokenizer, encoder_dir, encoder):
    base = tiny_model("llama", tokenizer, initializer_range=0.2).to(torch.bfloat16)
    model = perturb(get_peft_model(base, tiny_adapter_config(method, encoder_dir)))  # the tuner keeps its tensors fp32
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    before = snapshot(model)
    model.train()
    inputs = peft_ctx.prepare_inputs(
        model, tokenizer, QUESTIONS, PASSAGES, answers=ANSWERS, encoder=encoder_for(model, encoder)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    torch.optim.AdamW(trainable, lr=1e-3).step()
    moved = changed(before, model)
    assert moved and not moved & frozen  # adapter parameters changed, the base did not
    assert {p.dtype for p in trainable} == {torch.float32}
