"""Content diagnostics (``ContextMethod.diagnostics``): does an adapter carry the passage, measured beside controls."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import peft_ctx
from peft_ctx.harness import eval as harness
from peft_ctx.training import StageSettings, train_stage
from peft_ctx.xrag import recipe as xrag_recipe
from tests.helpers import tiny_model

PASSAGES = [
    "The red lighthouse on Skerry Point was built in 1871.",
    "Ada Obi wrote the river report for the town council.",
    "The mill by the bridge grinds barley every autumn.",
    "Seven ferries cross the bay between the two harbours.",
]


def test_xrag_paraphrase_from_the_right_vector_beats_another_passages_once_trained(tokenizer, encoder, tmp_path):
    model = get_peft_model(
        tiny_model("llama", tokenizer, initializer_range=0.2), peft_ctx.XRAGConfig(**encoder.describe())
    )
    method = peft_ctx.get_method("xrag")
    before = method.diagnostics(model.eval(), tokenizer, PASSAGES, encoder=encoder)
    assert set(before) == {
        "paraphrase_nll", "paraphrase_token_accuracy", "paraphrase_nll_wrong_passage",
        "paraphrase_token_accuracy_wrong_passage",
    }  # fmt: skip
    assert abs(before["paraphrase_nll"] - before["paraphrase_nll_wrong_passage"]) < 0.1  # untrained: no difference
    # Texts a tiny random model can learn to write from one slot in a few steps.
    texts = [f"{word} " * 6 for word in ("red", "blue", "green", "black")]
    dataset, index = xrag_recipe.encode_documents([{"text": t} for t in texts], encoder, "paraphrase")
    collator = xrag_recipe.collator(
        model.active_peft_config, tokenizer, "paraphrase", padding_side="left", vector_index=index
    )
    settings = StageSettings(steps=40, batch_size=4, learning_rate=5e-2, warmup_ratio=0.0)
    train_stage(
        model, tokenizer, dataset, settings, output_dir=str(tmp_path), name="xRAG paraphrase", collator=collator
    )
    after = method.diagnostics(model.eval(), tokenizer, texts, encoder=encoder)
    # The projector has learned which vector is which text: another passage's vector falls behind by nats.
    assert after["paraphrase_nll"] < after["paraphrase_nll_wrong_passage"] - 1.0


def test_cocom_autoencoding_diagnostics_and_the_no_context_baseline(tokenizer):
    config = peft_ctx.CocomConfig(compression_rate=4, max_passage_tokens=32, lora_r=2)
    model = get_peft_model(tiny_model("llama", tokenizer), config).eval()
    found = peft_ctx.get_method("cocom").diagnostics(model, tokenizer, PASSAGES)
    for suffix in ("", "_wrong_passage", "_no_context"):
        assert 0 < found[f"autoencode_nll{suffix}"] and 0 <= found[f"autoencode_token_accuracy{suffix}"] <= 1
    # The no-context row is the base model alone: one start token, then the passage (and EOS), as plain text.
    base = tiny_model("llama", tokenizer).eval()
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    losses = []
    for text in PASSAGES:
        ids = tokenizer(text, add_special_tokens=False).input_ids[:32] + [tokenizer.eos_token_id]
        with torch.no_grad():
            losses.append(base(input_ids=torch.tensor([[start, *ids]]), labels=torch.tensor([[-100, *ids]])).loss)
    # One batch of four: the diagnostic's mean over tokens, the per-passage losses weighted by their lengths.
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids[:32]) + 1 for t in PASSAGES]
    expected = sum(loss.item() * n for loss, n in zip(losses, lengths)) / sum(lengths)
    assert found["autoencode_nll_no_context"] == pytest.approx(expected, rel=1e-4)


def test_the_harness_reports_diagnostics_for_compressing_methods_only(tokenizer, encoder):
    rows = [
        {"id": str(i), "question": f"Question {i}?", "answer": "yes", "answers": ["yes"], "contexts": [p],
         "choices": [], "label": -1}
        for i, p in enumerate(PASSAGES)
    ]  # fmt: skip
    settings = harness.EvalSettings(
        max_new_tokens=2, batch_size=2, timing_examples=0, diagnostic_passages=3, show_progress=False
    )
    xrag = get_peft_model(tiny_model("llama", tokenizer), peft_ctx.XRAGConfig(**encoder.describe())).eval()
    result = harness.evaluate_runner(
        xrag, tokenizer, harness.AdapterRunner("xrag", "xRAG", encoder=encoder), rows, settings
    )
    assert result["diagnostics"]["paraphrase_nll"] > 0
    spring = get_peft_model(tiny_model("llama", tokenizer), peft_ctx.SpringConfig(num_virtual_tokens=2)).eval()
    result = harness.evaluate_runner(spring, tokenizer, harness.AdapterRunner("spring", "SPRING"), rows, settings)
    assert "diagnostics" not in result
    with pytest.raises(ValueError, match="diagnostic_passages=1"):
        harness.EvalSettings(diagnostic_passages=1)
