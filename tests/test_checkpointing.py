"""Gradient checkpointing is exact for every method: the same gradients as a plain backward pass, through PEFT's
``enable_input_require_grads`` path (reentrant checkpoints) and non-reentrant ones. COCOM's dtype x reentrancy matrix
with a separate compressor LoRA is in test_cocom.py."""

from __future__ import annotations

import pytest
import torch

import peft_ctx
from tests.test_serving import METHODS, _build, _encoder

QUESTIONS = ["What colour is the sky?", "Who wrote the letter?"]
PASSAGES = [["The sky was green all day long in the story."], ["The letter was written by Ada in the spring."]]
ANSWERS = ["green", "Ada"]


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_checkpointed_gradients_equal_the_plain_ones(method, arch, reentrant, tokenizer, encoder_dir, encoder):
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = _build(method, arch, tokenizer, encoder_dir)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        inputs = peft_ctx.prepare_inputs(
            model, tokenizer, QUESTIONS, PASSAGES, answers=ANSWERS, encoder=_encoder(method, encoder)
        )
        model(**inputs).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain and set(plain) == set(checkpointed)
    wrong = [n for n in plain if not torch.allclose(plain[n], checkpointed[n], rtol=1e-4, atol=1e-6)]
    assert not wrong, f"{len(wrong)} of {len(plain)} gradients differ, e.g. {wrong[:3]}"
