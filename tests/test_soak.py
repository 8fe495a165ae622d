"""A bounded soak: a few hundred mixed-size generate calls do not grow memory."""

from __future__ import annotations

import gc
import random

import psutil
import torch
from peft import get_peft_model

import peft_ctx
from tests.helpers import RETRIEVER_DIM, tiny_model


def test_hundreds_of_mixed_generate_calls_do_not_grow_memory(tokenizer):
    model = get_peft_model(tiny_model("qwen2", tokenizer), peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM))
    rng = random.Random(0)
    process = psutil.Process()

    def call():
        batch = rng.randint(1, 4)
        questions = [" ".join(rng.choices(["where", "is", "the", "river", "report", "?"], k=rng.randint(1, 20)))
                     for _ in range(batch)]  # fmt: skip
        docs = [torch.randn(rng.randint(1, 3), RETRIEVER_DIM) for _ in range(batch)]
        answers = peft_ctx.generate(model, tokenizer, questions, docs, max_new_tokens=rng.randint(1, 3))
        assert len(answers) == batch

    for _ in range(30):  # warm-up: allocator pools and caches settle
        call()
    gc.collect()
    layer = model.get_base_model().get_input_embeddings()
    start = process.memory_info().rss
    for _ in range(220):
        call()
    gc.collect()
    grown = process.memory_info().rss - start
    assert layer._pending is None  # no context left behind between calls
    assert grown < 64 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 220 calls"
