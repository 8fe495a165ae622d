"""Serving tools: convert an ``export_for_serving`` folder to GGUF for llama.cpp, and the engines the harness builds
(llama.cpp on a GGUF, vLLM's server on the export itself).

    python -m peft_ctx.harness.serving gguf EXPORT_DIR [--outtype f16|bf16|q8_0|q8_0_f16emb|f32]
    python -m peft_ctx.harness.serving vllm EXPORT_DIR [--port 8000] [--dtype float32|bfloat16]

The converter is the one that ships with llama.cpp (``convert_hf_to_gguf.py``), unpacked into the venv by
``make install`` (``peft_ctx.harness.llama_cpp_build``); it runs in a subprocess because it brings its own ``gguf``
package. ``q8_0_f16emb`` is q8_0 with the token embedding and output matrices kept f16 (llama-quantize's
``--token-embedding-type f16 --output-tensor-type f16``), quantized from the f16 GGUF by llama.cpp's own
``llama_model_quantize``. The GGUF lands in the export folder (``model-<outtype>.gguf``), beside the
``peft_ctx_serving.json`` that ``LlamaCppEngine`` reads. ``vllm`` serves an export with vLLM's OpenAI-compatible
server (prompt embeddings on) from the venv ``make vllm`` built, in the foreground, until interrupted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional

from ..engines import LlamaCppEngine, VllmEngine, default_dtype
from ..engines.vllm_server import server_command, server_env
from ..serving import export_base, export_for_serving, read_export
from .llama_cpp_build import CONVERTER_DIR
from .vllm_env import vllm_python

# What the converter writes itself; and types quantized from one of those: {type: (source type, weight type name)}.
CONVERTED = ("f16", "bf16", "q8_0", "f32")
QUANTIZED = {"q8_0_f16emb": ("f16", "Q8_0")}
OUTTYPES = (*CONVERTED, *QUANTIZED)
ENGINES = ("torch", "llama.cpp", "vllm")


def converter_path() -> str:
    path = os.environ.get("PEFT_CTX_GGUF_CONVERTER") or os.path.join(CONVERTER_DIR, "convert_hf_to_gguf.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"llama.cpp's converter is not at {path}; `make install` (python -m peft_ctx.harness.llama_cpp_build) "
            "unpacks it, or set PEFT_CTX_GGUF_CONVERTER to a convert_hf_to_gguf.py."
        )
    return path


def to_gguf(export_dir: str, outtype: str = "f16", out_file: Optional[str] = None, quiet: bool = True) -> str:
    """Convert a transformers folder (an ``export_for_serving`` export) to one GGUF file; returns its path.

    An existing GGUF of the same folder and type is kept when it is newer than the folder's weights."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype={outtype!r}; choose one of {', '.join(OUTTYPES)}.")
    out_file = out_file or os.path.join(export_dir, f"model-{outtype}.gguf")
    weights = [os.path.join(export_dir, f) for f in os.listdir(export_dir) if f.endswith(".safetensors")]
    if not weights:
        raise ValueError(f"{export_dir!r} holds no safetensors weights; write it with peft_ctx.export_for_serving.")
    if os.path.isfile(out_file) and os.path.getmtime(out_file) >= max(os.path.getmtime(w) for w in weights):
        return out_file
    tmp = out_file + ".tmp"
    if outtype in QUANTIZED:
        source_type, weights_type = QUANTIZED[outtype]
        quantize(to_gguf(export_dir, source_type, quiet=quiet), tmp, weights_type, keep_embeddings_f16=True)
        os.replace(tmp, out_file)
        return out_file
    command = [sys.executable, converter_path(), export_dir, "--outtype", outtype, "--outfile", tmp]
    result = subprocess.run(command, capture_output=quiet, text=True)
    if result.returncode != 0:
        detail = (result.stderr or "")[-1500:] if quiet else ""
        raise RuntimeError(f"GGUF conversion of {export_dir!r} failed (exit {result.returncode}):\n{detail}")
    os.replace(tmp, out_file)
    return out_file


def quantize(source: str, out_file: str, weights_type: str, keep_embeddings_f16: bool = False) -> str:
    """Quantize the GGUF ``source`` to ``weights_type`` (a llama.cpp LLAMA_FTYPE_MOSTLY_* name: "Q8_0" ...) with
    llama.cpp's ``llama_model_quantize``; ``keep_embeddings_f16``: the token embedding and output matrices stay f16
    (for a model with tied embeddings, one matrix that also computes every logit)."""
    from ..engines import _llama_cpp

    lib, logger = _llama_cpp()
    logger.set_verbose(False)  # llama.cpp logs every tensor it converts
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{weights_type}")
    if keep_embeddings_f16:
        params.token_embedding_type = params.output_tensor_type = lib.GGML_TYPE_F16
    status = lib.llama_model_quantize(source.encode(), out_file.encode(), params)
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source!r} to {weights_type} (status {status}).")
    return out_file


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gguf = sub.add_parser("gguf", help="Convert an export_for_serving folder to GGUF.")
    gguf.add_argument("export_dir")
    gguf.add_argument("--outtype", default="f16", choices=OUTTYPES)
    gguf.add_argument("--outfile", default=None)
    vllm = sub.add_parser("vllm", help="Serve an export_for_serving folder with vLLM (prompt embeddings on).")
    vllm.add_argument("export_dir")
    vllm.add_argument("--host", default="127.0.0.1")
    vllm.add_argument("--port", type=int, default=8000)
    vllm.add_argument(
        "--dtype", default=None, choices=("float32", "bfloat16"), help="default: bf16 where the CPU has it"
    )
    vllm.add_argument("--max_model_len", type=int, default=2048)
    vllm.add_argument("--max_num_seqs", type=int, default=32)
    args = parser.parse_args(argv)
    if args.command == "gguf":
        print(to_gguf(args.export_dir, args.outtype, args.outfile, quiet=False))
        return
    read_export(args.export_dir)  # only a peft_ctx export: its peft_ctx_serving.json says which adapter it serves
    python = vllm_python()
    if python is None:
        raise SystemExit("vLLM's venv is not built: make vllm (or set PEFT_CTX_VLLM_PYTHON to a Python with vLLM).")
    command = server_command(
        python, args.export_dir, args.port, args.dtype or default_dtype(), args.max_model_len, args.max_num_seqs,
        host=args.host, served_model_name=args.export_dir,
    )  # fmt: skip
    print(" ".join(command), flush=True)
    os.execve(python, command, server_env())


if __name__ == "__main__":
    main()
