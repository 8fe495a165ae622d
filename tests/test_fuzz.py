"""Property tests: any mix of document counts, lengths, padding sides and batch sizes equals one-by-one."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model

import peft_ctx
from tests.helpers import RETRIEVER_DIM, positions, tiny_model

WORDS = ["river", "lighthouse", "report", "who", "when", "1874", "Ada", "spring", "flood", "north", "é", "日本", "?"]

questions = st.lists(st.sampled_from(WORDS), min_size=1, max_size=25).map(" ".join)
example = st.tuples(questions, st.integers(min_value=1, max_value=4), st.integers(min_value=0, max_value=10_000))
batches = st.lists(example, min_size=1, max_size=4)


@pytest.fixture(scope="module")
def xrag(tokenizer):
    model = get_peft_model(
        tiny_model("llama", tokenizer, seed=4), peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM)
    )
    return model.eval()


def vectors(n_docs, seed):
    return torch.randn(n_docs, RETRIEVER_DIM, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=batches, padding_side=st.sampled_from(["left", "right"]))
def test_batched_forward_equals_one_by_one(xrag, tokenizer, batch, padding_side):
    qs = [q for q, _, _ in batch]
    docs = [vectors(n, seed) for _, n, seed in batch]
    inputs = peft_ctx.prepare_inputs(xrag, tokenizer, qs, docs, padding_side=padding_side)
    assert inputs["context_mask"].sum(1).tolist() == [n for _, n, _ in batch]
    with torch.no_grad():
        logits = xrag(**inputs, position_ids=positions(inputs)).logits
        for i, (q, d) in enumerate(zip(qs, docs)):
            one = peft_ctx.prepare_inputs(xrag, tokenizer, [q], [d])
            valid = inputs["attention_mask"][i].bool()
            assert torch.equal(inputs["input_ids"][i][valid], one["input_ids"][0])
            assert torch.equal(inputs["context_mask"][i][valid], one["context_mask"][0])
            expected = xrag(**one).logits[0]
            torch.testing.assert_close(logits[i][valid], expected, atol=1e-4, rtol=1e-4)


PASSAGE = st.lists(st.sampled_from(WORDS), min_size=1, max_size=40).map(" ".join)


@pytest.fixture(scope="module")
def spring(tokenizer):
    model = get_peft_model(tiny_model("gemma", tokenizer, seed=5), peft_ctx.SpringConfig(num_virtual_tokens=6))
    return model.eval()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.lists(st.tuples(questions, st.lists(PASSAGE, min_size=0, max_size=3)), min_size=1, max_size=4),
    k=st.integers(min_value=0, max_value=6),
    padding_side=st.sampled_from(["left", "right"]),
)
def test_spring_batches_with_any_passages_and_k_equal_one_by_one(spring, tokenizer, batch, k, padding_side):
    qs = [q for q, _ in batch]
    docs = [d for _, d in batch]
    inputs = peft_ctx.prepare_inputs(spring, tokenizer, qs, docs, padding_side=padding_side, num_virtual_tokens=k)
    mask = inputs.get("context_mask", torch.zeros_like(inputs["input_ids"], dtype=torch.bool))
    assert mask.sum(1).tolist() == [k if d else 0 for d in docs]
    with torch.no_grad():
        logits = spring(**inputs, position_ids=positions(inputs)).logits
        for i, (q, d) in enumerate(batch):
            one = peft_ctx.prepare_inputs(spring, tokenizer, [q], [d], num_virtual_tokens=k)
            valid = inputs["attention_mask"][i].bool()
            assert torch.equal(inputs["input_ids"][i][valid], one["input_ids"][0])
            torch.testing.assert_close(logits[i][valid], spring(**one).logits[0], atol=1e-4, rtol=1e-4)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=batches)
def test_batched_generation_equals_one_by_one(xrag, tokenizer, batch):
    qs = [q for q, _, _ in batch]
    docs = [vectors(n, seed) for _, n, seed in batch]
    together = peft_ctx.generate(xrag, tokenizer, qs, docs, max_new_tokens=4, batch_size=len(qs))
    alone = [peft_ctx.generate(xrag, tokenizer, [q], [d], max_new_tokens=4)[0] for q, d in zip(qs, docs)]
    assert together == alone


@pytest.fixture(scope="module")
def cocom(tokenizer):
    config = peft_ctx.CocomConfig(compression_rate=3, max_passage_tokens=24, lora_r=4)
    return get_peft_model(tiny_model("qwen2", tokenizer, seed=6), config).eval()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.lists(st.tuples(questions, st.lists(PASSAGE, min_size=1, max_size=3)), min_size=1, max_size=3),
    padding_side=st.sampled_from(["left", "right"]),
)
def test_cocom_batches_with_any_passage_counts_and_lengths_equal_one_by_one(cocom, tokenizer, batch, padding_side):
    qs = [q for q, _ in batch]
    docs = [d for _, d in batch]
    inputs = peft_ctx.prepare_inputs(cocom, tokenizer, qs, docs, padding_side=padding_side)
    with torch.no_grad():
        logits = cocom(**inputs, position_ids=positions(inputs)).logits
        for i, (q, d) in enumerate(batch):
            one = peft_ctx.prepare_inputs(cocom, tokenizer, [q], [d])
            valid = inputs["attention_mask"][i].bool()
            assert torch.equal(inputs["input_ids"][i][valid], one["input_ids"][0])
            assert torch.equal(inputs["context_mask"][i][valid], one["context_mask"][0])
            torch.testing.assert_close(logits[i][valid], cocom(**one).logits[0], atol=1e-4, rtol=1e-4)
