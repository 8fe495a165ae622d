"""GGUF for llama.cpp: convert an ``export_for_serving`` folder with the converter that ships with llama.cpp.

The converter (``convert_hf_to_gguf.py``) is unpacked into the venv by ``make install``
(``peft_ctx.harness.llama_cpp_build``, beside the llama.cpp binding it builds); it runs in a subprocess because it
brings its own ``gguf`` package. ``q8_0_f16emb`` is q8_0 with the token embedding and output matrices kept f16
(llama-quantize's ``--token-embedding-type f16 --output-tensor-type f16``), quantized from the f16 GGUF by llama.cpp's
own ``llama_model_quantize``. The GGUF lands in the export folder (``model-<outtype>.gguf``), beside the
``peft_ctx_serving.json`` that ``LlamaCppEngine`` reads.

Example::

    peft_ctx.export_for_serving(model, "served", tokenizer=tokenizer)
    engine = peft_ctx.LlamaCppEngine(peft_ctx.serving.to_gguf("served", "bf16"))
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

from .llamacpp import _llama_cpp

# Where `make install` unpacks llama.cpp's converter (the sdist's convert_hf_to_gguf.py and its gguf-py).
CONVERTER_DIR = os.path.join(sys.prefix, "share", "peft_ctx", "llama.cpp")
# What the converter writes itself; and types quantized from one of those: {type: (source type, weight type name)}.
CONVERTED = ("f16", "bf16", "q8_0", "f32")
QUANTIZED = {"q8_0_f16emb": ("f16", "Q8_0")}
OUTTYPES = (*CONVERTED, *QUANTIZED)


def converter_path() -> str:
    """llama.cpp's ``convert_hf_to_gguf.py``: ``$PEFT_CTX_GGUF_CONVERTER``, else the one ``make install`` unpacked."""
    path = os.environ.get("PEFT_CTX_GGUF_CONVERTER") or os.path.join(CONVERTER_DIR, "convert_hf_to_gguf.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"llama.cpp's converter is not at {path}; `make install` (python -m peft_ctx.harness.llama_cpp_build) "
            "unpacks it, or set PEFT_CTX_GGUF_CONVERTER to a convert_hf_to_gguf.py."
        )
    return path


def to_gguf(export_dir: str, outtype: str = "f16", out_file: Optional[str] = None, quiet: bool = True) -> str:
    """Convert a transformers folder (an ``export_for_serving`` export) to one GGUF file; returns its path.

    Args:
        export_dir: the folder ``export_for_serving`` (or ``export_base``) wrote.
        outtype: one of ``OUTTYPES`` (f16, bf16, q8_0, f32, q8_0_f16emb).
        out_file: where the GGUF goes (default: ``export_dir/model-<outtype>.gguf``).
        quiet: keep the converter's output (shown only if it fails).

    An existing GGUF of the same folder and type is kept when it is newer than the folder's weights.

    Example::

        gguf = peft_ctx.serving.to_gguf("served/xrag", "bf16")  # served/xrag/model-bf16.gguf
    """
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
