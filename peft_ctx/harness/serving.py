"""The engines the harness builds: an export of the model's active adapter (or of its base, for the baselines) in a
folder the harness owns, converted to GGUF and loaded by llama.cpp, or served by vLLM from the venv ``make vllm``
built. The conversion and the engines themselves are the library's (``peft_ctx.serving``).
"""

from __future__ import annotations

import os
from typing import Optional

from ..serving import OUTTYPES, LlamaCppEngine, VllmEngine, export_base, export_for_serving, to_gguf, vllm_python

__all__ = ["ENGINES", "OUTTYPES", "llama_cpp_engine", "vllm_engine"]

ENGINES = ("torch", "llama.cpp", "vllm")


def _export(model, tokenizer, work_dir: str, name: str, base: bool) -> str:
    """``work_dir/name``: the active adapter's export, or the base model's (``base``); an earlier one is replaced."""
    out = os.path.join(work_dir, name)
    if base:
        return export_base(model, out, tokenizer=tokenizer, overwrite=True)
    return export_for_serving(model, out, tokenizer=tokenizer, overwrite=True)


def llama_cpp_engine(
    model,
    tokenizer,
    work_dir: str,
    name: str,
    *,
    base: bool = False,
    outtype: str = "f16",
    n_seq_max: int = 8,
    n_ctx: int = 2048,
) -> LlamaCppEngine:
    """A llama.cpp engine for the active adapter of ``model`` (``base=True``: for the baselines, on the base model):
    the export (``export_for_serving`` / ``export_base``) in ``work_dir/name``, converted to GGUF, loaded.

    ``work_dir`` belongs to the harness: an earlier export there is replaced."""
    out = _export(model, tokenizer, work_dir, name, base)
    engine = LlamaCppEngine(to_gguf(out, outtype), n_seq_max=n_seq_max, n_ctx=n_ctx)
    if base:
        engine.check_base(model)
    else:
        engine.check_model(model)
    return engine


def vllm_engine(
    model,
    tokenizer,
    work_dir: str,
    name: str,
    *,
    base: bool = False,
    max_num_seqs: int = 8,
    max_model_len: int = 2048,
    dtype: Optional[str] = None,
    url: Optional[str] = None,
) -> VllmEngine:
    """A vLLM engine for the active adapter of ``model`` (``base=True``: the baselines, on the base model): the export
    in ``work_dir/name`` and a server of it in the venv ``make vllm`` built (``url``: a running server of the same
    weights, e.g. the base model's for xRAG and SPRING, which serve on it unchanged). Close it when done."""
    out = _export(model, tokenizer, work_dir, name, base)
    engine = VllmEngine(
        out, url=url, python=vllm_python(), max_num_seqs=max_num_seqs, max_model_len=max_model_len, dtype=dtype
    )
    try:
        engine.check_base(model) if base else engine.check_model(model)
    except ValueError:
        engine.close()
        raise
    return engine
