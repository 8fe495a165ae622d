"""Serving from the shell: convert an export to GGUF, or serve it with vLLM.

    python -m peft_ctx.serving gguf EXPORT_DIR [--outtype f16|bf16|q8_0|q8_0_f16emb|f32] [--outfile PATH]
    python -m peft_ctx.serving vllm EXPORT_DIR [--port 8000] [--dtype float32|bfloat16] [--python PYTHON]

``gguf`` writes ``EXPORT_DIR/model-<outtype>.gguf`` for ``peft_ctx.LlamaCppEngine`` and prints its path. ``vllm``
runs vLLM's OpenAI-compatible server of an export (prompt embeddings on) in the foreground, until interrupted, with
the Python of the venv ``make vllm`` built (or ``--python`` / ``$PEFT_CTX_VLLM_PYTHON``).
"""

from __future__ import annotations

import argparse
import os

from .export import read_export
from .gguf import OUTTYPES, to_gguf
from .vllm_server import default_dtype, server_command, server_env, vllm_python


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m peft_ctx.serving", description=__doc__.split("\n\n")[0])
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
    vllm.add_argument("--python", default=None, help="the Python with vLLM (default: the venv `make vllm` built)")
    args = parser.parse_args(argv)
    if args.command == "gguf":
        print(to_gguf(args.export_dir, args.outtype, args.outfile, quiet=False))
        return
    read_export(args.export_dir)  # only a peft_ctx export: its peft_ctx_serving.json says which adapter it serves
    python = args.python or vllm_python()
    if python is None:
        raise SystemExit(
            "vLLM's venv is not built: make vllm, or pass --python (or set PEFT_CTX_VLLM_PYTHON): a Python with vLLM."
        )
    command = server_command(
        python, args.export_dir, args.port, args.dtype or default_dtype(), args.max_model_len, args.max_num_seqs,
        host=args.host, served_model_name=args.export_dir,
    )  # fmt: skip
    print(" ".join(command), flush=True)
    os.execve(python, command, server_env())


if __name__ == "__main__":
    main()
