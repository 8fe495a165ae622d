"""Inference engines that decode the prompts peft_ctx builds: llama.cpp in this process (``LlamaCppEngine``) and
vLLM's OpenAI-compatible server (``VllmEngine``).

An engine receives each question's prompt as ``ServingPrompt`` (token ids, the slot mask and the input-embedding
sequence, ``peft_ctx.serving``) and decodes greedily, batched over sequences. It serves the model that
``export_for_serving`` wrote; the ``peft_ctx_serving.json`` of that export says which adapter's embeddings it takes,
and ``peft_ctx.generate(..., engine=engine)`` refuses any other.

Example::

    engine = peft_ctx.LlamaCppEngine("served/model-f16.gguf")      # or peft_ctx.VllmEngine("served")
    answers = peft_ctx.generate(model, tokenizer, questions, contexts, encoder=encoder, engine=engine)
"""

from .common import EngineTimings, GreedyEngine
from .llamacpp import LlamaCppEngine, _llama_cpp
from .vllm_server import VllmEngine, default_dtype

__all__ = ["EngineTimings", "GreedyEngine", "LlamaCppEngine", "VllmEngine", "_llama_cpp", "default_dtype"]
