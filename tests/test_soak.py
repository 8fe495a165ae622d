"""A bounded soak: a few hundred mixed-size generate calls, switching between methods, do not grow memory."""

from __future__ import annotations

import gc
import random

import psutil
import torch
from peft import get_peft_model

import peft_ctx
from tests.helpers import RETRIEVER_DIM, tiny_model

WORDS = ["where", "is", "the", "river", "report", "lighthouse", "built", "?"]


def test_hundreds_of_mixed_generate_calls_do_not_grow_memory(tokenizer):
    model = get_peft_model(
        tiny_model("qwen2", tokenizer), peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM), adapter_name="xrag"
    )
    model.add_adapter("spring", peft_ctx.SpringConfig(num_virtual_tokens=4))
    model.add_adapter("cocom", peft_ctx.CocomConfig(compression_rate=4, max_passage_tokens=16, lora_r=2))
    model.eval()
    rng = random.Random(0)
    process = psutil.Process()
    layer = model.get_base_model().get_input_embeddings()

    def words(low, high):
        return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))

    def call():
        method = rng.choice(["xrag", "spring", "cocom"])
        model.set_adapter(method)
        batch = rng.randint(1, 4)
        questions = [words(1, 20) for _ in range(batch)]
        if method == "xrag":
            contexts = [torch.randn(rng.randint(1, 3), RETRIEVER_DIM) for _ in range(batch)]
        else:
            contexts = [[words(3, 30) for _ in range(rng.randint(1, 3))] for _ in range(batch)]
        answers = peft_ctx.generate(model, tokenizer, questions, contexts, max_new_tokens=rng.randint(1, 3))
        assert len(answers) == batch

    for _ in range(30):  # warm-up: allocator pools and caches settle
        call()
    gc.collect()
    start = process.memory_info().rss
    for _ in range(200):
        call()
    gc.collect()
    grown = process.memory_info().rss - start
    assert layer._pending is None  # no context left behind between calls
    assert grown < 64 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 200 calls"
