"""The real pretrained assets (SmolLM2-135M-Instruct, all-MiniLM-L6-v2): slow, run with --runslow."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_ctx

pytestmark = pytest.mark.slow


def test_the_frozen_base_answers_with_and_without_text_documents(smollm2, minilm):
    base, tokenizer = smollm2
    model = get_peft_model(base, peft_ctx.XRAGConfig(**minilm.describe()))
    try:
        plain = peft_ctx.generate_baseline(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12)
        assert "Paris" in plain[0]
        rag = peft_ctx.generate_baseline(
            model,
            tokenizer,
            ["Who designed the Skerry Point lighthouse?"],
            [["The Skerry Point lighthouse was designed by the engineer Mara Velton in 1874."]],
            max_new_tokens=16,
        )
        assert "Velton" in rag[0]
    finally:
        model.unload()


def test_xrag_on_smollm2_batches_saves_and_reloads_exactly(smollm2, minilm, tmp_path):
    base, tokenizer = smollm2
    model = get_peft_model(base, peft_ctx.XRAGConfig(**minilm.describe()))
    try:
        assert minilm.hidden_size == 384 and minilm.normalize and minilm.pooling == "mean"
        questions = ["Who designed the lighthouse?", "When did the river flood?"]
        docs = [["The lighthouse was designed by Mara Velton."], ["The river flooded in 1911.", "It rained a lot."]]
        batched = peft_ctx.generate(model, tokenizer, questions, docs, encoder=minilm, max_new_tokens=8)
        single = [peft_ctx.generate(model, tokenizer, [q], [d], encoder=minilm, max_new_tokens=8)[0]
                  for q, d in zip(questions, docs)]  # fmt: skip
        assert batched == single
        inputs = peft_ctx.prepare_inputs(model, tokenizer, questions, docs, encoder=minilm)
        with torch.no_grad():
            expected = model(**inputs).logits
        model.save_pretrained(tmp_path)
    finally:
        base = model.unload()
    reloaded = PeftModel.from_pretrained(base, tmp_path)
    try:
        with torch.no_grad():
            assert torch.equal(reloaded(**inputs).logits, expected)
    finally:
        reloaded.unload()
