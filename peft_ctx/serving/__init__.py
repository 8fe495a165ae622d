"""Serving: the input-embedding sequences an adapter builds, the model an engine loads, and the engines.

- ``export``: ``prompt_embeds`` (one ``[seq, hidden]`` sequence per question, context slots filled by the adapter),
  ``export_for_serving`` / ``export_base`` (the plain transformers folder an engine loads, with
  ``peft_ctx_serving.json``), ``check_export``.
- ``gguf``: ``to_gguf`` converts an export for llama.cpp with llama.cpp's own converter.
- ``engine``, ``llamacpp``, ``vllm_server``: the engines ``peft_ctx.generate(..., engine=)`` decodes with:
  ``LlamaCppEngine`` (llama.cpp in this process, from a GGUF) and ``VllmEngine`` (vLLM's OpenAI-compatible server of
  an export, ``prompt_embeds`` on), both greedy and batched, refusing an export of another adapter.

From the shell (``python -m peft_ctx.serving --help``)::

    python -m peft_ctx.serving gguf EXPORT_DIR [--outtype f16|bf16|q8_0|q8_0_f16emb|f32]
    python -m peft_ctx.serving vllm EXPORT_DIR [--port 8000] [--dtype float32|bfloat16]

Example::

    peft_ctx.export_for_serving(model, "served", tokenizer=tokenizer)
    engine = peft_ctx.LlamaCppEngine(peft_ctx.serving.to_gguf("served", "f16"))  # or peft_ctx.VllmEngine("served")
    answers = peft_ctx.generate(model, tokenizer, questions, contexts, encoder=encoder, engine=engine)
"""

from .engine import EngineTimings, GreedyEngine
from .export import (
    SERVING_FILE,
    ServingPrompt,
    adapter_digest,
    adapter_fingerprint,
    check_export,
    export_base,
    export_for_serving,
    prompt_embeds,
    read_export,
    serving_prompts,
)
from .gguf import OUTTYPES, quantize, to_gguf
from .llamacpp import LlamaCppEngine
from .vllm_server import VllmEngine, default_dtype, vllm_python

__all__ = [
    "OUTTYPES",
    "SERVING_FILE",
    "EngineTimings",
    "GreedyEngine",
    "LlamaCppEngine",
    "ServingPrompt",
    "VllmEngine",
    "adapter_digest",
    "adapter_fingerprint",
    "check_export",
    "default_dtype",
    "export_base",
    "export_for_serving",
    "prompt_embeds",
    "quantize",
    "read_export",
    "serving_prompts",
    "to_gguf",
    "vllm_python",
]
