"""The memory planner (benchmarks/planner.py): exact parameter counts from a config, and an activation fit that
predicts a tiny model it was not fitted on."""

from __future__ import annotations

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, MistralConfig

from benchmarks import planner
from tests.helpers import RETRIEVER_DIM

TINY = dict(
    vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
)  # fmt: skip


def test_meta_device_counts_equal_the_real_models():
    counts = planner.count_parameters(TINY, RETRIEVER_DIM)
    base = AutoModelForCausalLM.from_config(MistralConfig(**TINY))
    assert counts["base"] == sum(p.numel() for p in base.parameters())
    resources = planner.paper_resources(RETRIEVER_DIM)
    assert set(planner.paper_rows()) >= {"xrag", "spring", "cocom", "cocom_light"}
    for name, row in planner.paper_rows().items():
        model = get_peft_model(AutoModelForCausalLM.from_config(MistralConfig(**TINY)), row.make_config(resources))
        assert counts[name] == sum(p.numel() for p in model.parameters() if p.requires_grad), name


def test_workload_tokens_are_the_tokens_through_the_decoder_layers(tokenizer, encoder, encoder_dir):
    rows = planner.paper_rows()
    tokens = {name: planner.workload_tokens(rows[name], tokenizer, encoder, encoder_dir) for name in rows}
    n, passages, qa = planner.PASSAGES, planner.PASSAGES * planner.PASSAGE_TOKENS, 2 * planner.QUESTION_TOKENS
    template = 60  # each method's own prompt template around them (40-55 tokens here)
    # xRAG: one slot per passage; SPRING: the passages as text beside its 50 tokens; COCOM: 8 slots each (128 / 16),
    # after compressing every passage with the LLM itself (COCOM-light's BERT compressor is not a decoder layer).
    assert n + qa <= tokens["xrag"] <= n + qa + template
    assert passages + 50 + qa <= tokens["spring"] <= passages + 50 + qa + template
    assert 8 * n + qa <= tokens["cocom_light"] <= 8 * n + qa + template
    assert passages + 8 * n <= tokens["cocom"] - tokens["cocom_light"] <= passages + 8 * n + 3 * n


def test_the_activation_fit_predicts_a_held_out_tiny_model(tokenizer, encoder, encoder_dir):
    torch.manual_seed(0)
    fits = {}
    for tiny in (planner.Tiny(64, 128), planner.Tiny(64, 512), planner.Tiny(128, 320)):
        fits[tiny.hidden, tiny.intermediate] = planner.per_layer_bytes_per_token(
            planner.paper_rows()["spring"], tiny, tokenizer, encoder, encoder_dir
        )
    m = torch.tensor([[64.0, 128.0], [64.0, 512.0]], dtype=torch.float64)
    a, b = torch.linalg.solve(m, torch.tensor([fits[64, 128], fits[64, 512]], dtype=torch.float64)).tolist()
    assert a > 0 and b > 0
    assert abs(a * 128 + b * 320 - fits[128, 320]) / fits[128, 320] < 0.05
