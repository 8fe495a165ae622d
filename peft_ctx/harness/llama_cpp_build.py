"""Build llama.cpp's Python binding (llama-cpp-python) from its sdist for the CPU this machine has, once per venv.

    python -m peft_ctx.harness.llama_cpp_build [--force] [--portable]

``make install`` runs this. The build enables the instruction sets ``/proc/cpuinfo`` lists (AVX2, AVX-512, VNNI,
BF16; AMX only with ``--amx``) rather than ``-march=native``, which produced a library that died with "Illegal
instruction" on one of these machines. After the build a subprocess loads a real GGUF and decodes with tokens and
with embeddings; if that dies, the next build of ``LADDER`` (AVX2 only) replaces it. A stamp in the venv records the
version and the flags, so the build runs again only when they change (another CPU, another version). The
converter that ships with llama.cpp (``convert_hf_to_gguf.py`` with its ``gguf-py`` and ``conversion`` folders) is
unpacked next to the stamp for ``python -m peft_ctx.serving gguf``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile

from ..serving.engine import cpu_flags
from ..serving.gguf import CONVERTER_DIR

VERSION = "0.3.36"
PACKAGE = f"llama-cpp-python=={VERSION}"
STAMP = os.path.join(sys.prefix, ".peft-ctx-llama-cpp.json")
# /proc/cpuinfo flag -> ggml's CMake option.
X86_OPTIONS = {
    "sse4_2": "GGML_SSE42",
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "bmi2": "GGML_BMI2",
    "avx_vnni": "GGML_AVX_VNNI",
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
    "amx_tile": "GGML_AMX_TILE",
    "amx_int8": "GGML_AMX_INT8",
    "amx_bf16": "GGML_AMX_BF16",
}
PORTABLE = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2")
NO_AMX = tuple(flag for flag in X86_OPTIONS if not flag.startswith("amx"))
# Tried in order until one passes the smoke test. AMX is left out unless asked for (--amx): a build with it died with
# "invalid opcode" in libggml-cpu (in llama_decode) on a Firecracker VM whose CPU lists AMX, while the same build
# without AMX ran; ggml uses AMX only for quantized matrix products in the prefill.
LADDER = (("this CPU's instruction sets (no AMX)", NO_AMX), ("portable AVX2", PORTABLE))
WITH_AMX = ("this CPU's instruction sets with AMX", tuple(X86_OPTIONS))
# Only what the binding needs: no server, tools, examples or multimodal library.
COMMON = ["-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF"]


def cmake_args(wanted: tuple[str, ...] = tuple(X86_OPTIONS)) -> list[str]:
    """ggml's options for the instruction sets in ``wanted`` that this CPU lists; the rest off."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return COMMON  # llama.cpp's own native detection on other CPUs
    flags = cpu_flags()
    enabled = [X86_OPTIONS[f] for f in wanted if f in flags]
    disabled = [opt for flag, opt in X86_OPTIONS.items() if opt not in enabled]
    return ["-DGGML_NATIVE=OFF"] + [f"-D{o}=ON" for o in enabled] + [f"-D{o}=OFF" for o in disabled] + COMMON


def build_ladder(portable: bool = False, amx: bool = False) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The builds to try in order: AVX2 only with ``portable``; AMX first with ``amx``; else ``LADDER``."""
    if portable:
        return LADDER[-1:]
    return (WITH_AMX,) + LADDER if amx else LADDER


def read_stamp() -> dict:
    """What the last build recorded (version, flags, which rung of ``LADDER``); empty before any build."""
    try:
        with open(STAMP) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def smoke_test(gguf: str | None) -> tuple[bool, str]:
    """Load the binding in a fresh process; with a GGUF, decode from tokens and from embeddings."""
    code = (
        "import ctypes, sys\n"
        "import llama_cpp\n"
        "from llama_cpp import _logger\n"
        "_logger.set_verbose(False)\n"
        "print(llama_cpp.llama_print_system_info().decode())\n"
        "path = sys.argv[1] if len(sys.argv) > 1 else None\n"
        "if path:\n"
        "    llama_cpp.llama_backend_init()\n"
        "    model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())\n"
        "    ctx = llama_cpp.llama_init_from_model(model, llama_cpp.llama_context_default_params())\n"
        "    n = llama_cpp.llama_model_n_embd(model)\n"
        "    batch = llama_cpp.llama_batch_init(8, 0, 1)\n"
        "    for i, t in enumerate([1, 504, 3458, 282, 4649, 314]):\n"
        "        batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1\n"
        "        batch.seq_id[i][0], batch.logits[i] = 0, 0\n"
        "    batch.logits[5], batch.n_tokens = 1, 6\n"
        "    assert llama_cpp.llama_decode(ctx, batch) == 0\n"
        "    embd = llama_cpp.llama_batch_init(1, n, 1)\n"
        "    for j in range(n): embd.embd[j] = 0.01\n"
        "    embd.pos[0], embd.n_seq_id[0], embd.seq_id[0][0], embd.logits[0], embd.n_tokens = 6, 1, 0, 1, 1\n"
        "    assert llama_cpp.llama_decode(ctx, embd) == 0\n"
        "    print('decoded with tokens and embeddings')\n"
    )
    args = [sys.executable, "-c", code] + ([gguf] if gguf else [])
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    ok = result.returncode == 0
    detail = result.stdout.strip() if ok else f"exit {result.returncode}: {result.stderr.strip()[-400:]}"
    return ok, detail


def _sdist(cache: str) -> str:
    found = glob.glob(os.path.join(cache, f"llama_cpp_python-{VERSION}.tar.gz"))
    if found:
        return found[0]
    os.makedirs(cache, exist_ok=True)
    subprocess.check_call(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", cache]
    )
    return glob.glob(os.path.join(cache, f"llama_cpp_python-{VERSION}.tar.gz"))[0]


def _build(sdist: str, args: list[str]) -> None:
    env = dict(os.environ, CMAKE_ARGS=" ".join(args), CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    print(f"peft_ctx: building {PACKAGE} (5-15 minutes on 2 cores)\n  CMAKE_ARGS={env['CMAKE_ARGS']}", flush=True)
    subprocess.check_call(
        [sys.executable, "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", sdist], env=env
    )
    # The binding's own run-time dependencies (small; numpy and jinja2 are there already).
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "diskcache>=5.6.1", "jinja2>=2.11.3"])


def _unpack_converter(sdist: str) -> None:
    root = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    keep = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/", "LICENSE")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(root) and m.name[len(root) :].startswith(keep)]
            tar.extractall(tmp, members=members, filter="data")
        if os.path.isdir(CONVERTER_DIR):
            shutil.rmtree(CONVERTER_DIR)
        shutil.copytree(os.path.join(tmp, root), CONVERTER_DIR)


def _asset_gguf() -> str | None:
    try:
        from . import assets

        return assets.smollm2_gguf()
    except Exception:  # the asset is optional here: the smoke test then only loads the library
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="Build again even if the stamp matches.")
    parser.add_argument("--portable", action="store_true", help="Build for AVX2 only (no AVX-512 / AMX).")
    parser.add_argument("--amx", action="store_true", help="Try a build with AMX first (where the CPU lists it).")
    default_cache = os.path.join(os.environ.get("PEFT_CTX_CACHE", "~/.cache/peft_ctx"), "sdist")
    parser.add_argument("--cache", default=default_cache, help="Where the sdist is kept.")
    args = parser.parse_args(argv)
    cache = os.path.expanduser(args.cache)
    ladder = build_ladder(args.portable, args.amx)
    requested = cmake_args(ladder[0][1])
    gguf = _asset_gguf()
    stamp = read_stamp()
    if not args.force and os.path.isfile(os.path.join(CONVERTER_DIR, "convert_hf_to_gguf.py")):
        if stamp.get("version") == VERSION and stamp.get("requested") == requested:
            ok, detail = smoke_test(gguf)
            if ok:
                print(f"peft_ctx: llama-cpp-python {VERSION} is built for this CPU ({stamp.get('build')} build).")
                return 0
            print(f"peft_ctx: the installed llama-cpp-python fails here ({detail}); building again.")
    sdist = _sdist(cache)
    tried: set[tuple[str, ...]] = set()
    for build, wanted in ladder:
        used = cmake_args(wanted)
        if tuple(used) in tried:
            continue  # this CPU lists none of what the step drops
        tried.add(tuple(used))
        _build(sdist, used)
        ok, detail = smoke_test(gguf)
        if ok:
            break
        print(f"peft_ctx: the {build} build failed its smoke test ({detail}); trying the next one.")
    if not ok:
        print(f"peft_ctx: llama-cpp-python does not run on this machine: {detail}", file=sys.stderr)
        return 1
    _unpack_converter(sdist)
    with open(STAMP, "w") as f:
        json.dump({"version": VERSION, "requested": requested, "cmake_args": used, "build": build}, f)
    print(f"peft_ctx: llama-cpp-python {VERSION} built ({build}); {detail.splitlines()[0] if detail else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
