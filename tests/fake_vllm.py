"""A stand-in for ``python -m vllm.entrypoints.openai.api_server``: the OpenAI completions endpoint as vLLM streams it.

``install(folder)`` writes a ``vllm`` package into ``folder`` whose server module runs ``serve()`` below, so that a
test puts the folder on PYTHONPATH and ``VllmEngine`` starts, uses and stops it like the real server, without vLLM.
The answer to a prompt of n positions is ``[100 + n, 101, 102, 2, 103]`` cut at ``max_tokens`` and at the first of
``stop_token_ids`` once ``min_tokens`` are out (the stop token included, as vLLM streams it). Every request body is
appended to ``$FAKE_VLLM_LOG`` (JSON lines) with the prompt embeddings decoded: the tests read what the engine sent.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANSWER = (101, 102, 2, 103)


def answer(n_positions: int, max_tokens: int, stop: list[int], min_tokens: int) -> list[int]:
    out = []
    for token in (100 + n_positions, *ANSWER)[:max_tokens]:
        out.append(token)
        if token in stop and len(out) >= min_tokens:
            break
    return out


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {})
        elif self.path == "/v1/models":
            self._json(200, {"data": [{"id": self.server.model_name}]})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        import torch

        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        record = dict(body)
        if "prompt_embeds" in body:
            embeds = torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"])), weights_only=True)
            record["prompt_embeds"] = embeds.tolist()
            n = embeds.shape[0]
        else:
            n = len(body["prompt"])
        if os.environ.get("FAKE_VLLM_LOG"):
            with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
                f.write(json.dumps(record) + "\n")
        if n > self.server.max_model_len:
            self._json(
                400, {"error": {"message": f"This model's maximum context length is {self.server.max_model_len}"}}
            )
            return
        tokens = answer(n, body["max_tokens"], body.get("stop_token_ids") or [], body.get("min_tokens", 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for token in tokens:
            chunk = {"choices": [{"index": 0, "text": "", "token_ids": [token]}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


def serve(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--max-model-len", type=int, default=2048)
    args, _ = parser.parse_known_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        sys.exit(f"no model at {args.model}")
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.model_name = args.served_model_name or args.model
    server.max_model_len = args.max_model_len
    with open(os.path.join(os.environ.get("FAKE_VLLM_PIDS", os.devnull)), "a") as f:
        f.write(f"{os.getpid()}\n")
    server.serve_forever()


def install(folder: str) -> None:
    """A ``vllm`` package in ``folder`` whose ``vllm.entrypoints.openai.api_server`` serves with this module."""
    openai = os.path.join(folder, "vllm", "entrypoints", "openai")
    os.makedirs(openai, exist_ok=True)
    for part in ("vllm", "vllm/entrypoints", "vllm/entrypoints/openai"):
        open(os.path.join(folder, part, "__init__.py"), "w").close()
    with open(os.path.join(openai, "api_server.py"), "w") as f:
        f.write("import sys\nfrom tests.fake_vllm import serve\n\nserve(sys.argv[1:])\n")


@contextlib.contextmanager
def serving(folder: str):
    """Inside the block, a ``VllmEngine`` (and ``vllm_python()``) starts this stand-in instead of vLLM; yields the
    file where each stand-in server writes its pid."""
    import pytest

    install(folder)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pids = os.path.join(folder, "pids")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join([folder, root]))
        env.setenv("PEFT_CTX_VLLM_PYTHON", sys.executable)
        env.setenv("FAKE_VLLM_PIDS", pids)
        yield pids
