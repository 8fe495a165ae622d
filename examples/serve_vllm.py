"""Serve a peft_ctx adapter with vLLM through prompt embeddings: on a CPU (vLLM's CPU build, ``make vllm``) or a GPU.

    # 1. once: the model vLLM loads (the base; COCOM: its decoder LoRA merged) and the adapter's fingerprint
    python examples/serve_vllm.py export --adapter out/xrag --out served/xrag
    # 2a. the engine: peft_ctx starts vLLM's OpenAI-compatible server on the export, sends every question's input
    #     embeddings, compares the answers with the torch path's, and stops the server
    python examples/serve_vllm.py engine --adapter out/xrag --served served/xrag --data cpkc --n 50
    # 2b. a server of your own, and plain HTTP requests with base64 prompt embeddings
    .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model served/xrag --enable-prompt-embeds \\
        --dtype float32 --enforce-eager --port 8000          # GPU: vllm serve served/xrag --enable-prompt-embeds
    python examples/serve_vllm.py client --adapter out/xrag --served served/xrag --url http://127.0.0.1:8000

What peft_ctx does here is build the input-embedding sequence of each question (``peft_ctx.prompt_embeds``: the base
token embeddings with the context slots filled by the adapter) and check that the served folder is this adapter's
export (``peft_ctx.check_export``); vLLM then runs an unchanged causal LM on it. Its completions endpoint takes
``prompt_embeds`` as a base64 string of ``torch.save`` of the ``[seq, hidden]`` tensor (no chat template is applied to
embeddings: peft_ctx's already hold it). vLLM runs in a Python of its own (it pins another transformers): the engine
finds the venv ``make vllm`` built, or ``$PEFT_CTX_VLLM_PYTHON``; on a GPU machine point that to a Python with
``pip install vllm``. ``tests/test_vllm.py`` runs steps 1, 2a and 2b on the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import urllib.request

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_ctx
from peft_ctx.harness.assets import resolve
from peft_ctx.harness.data import load_qa
from peft_ctx.harness.metrics import generation_scores
from peft_ctx.serving import vllm_python


def load_adapter(adapter: str, dtype=torch.float32):
    config = peft_ctx.ContextConfig.from_pretrained(adapter)
    base_path = resolve(config.base_model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    model = PeftModel.from_pretrained(base, adapter).eval()
    encoder_name = getattr(config, "retriever_name_or_path", None)
    encoder = peft_ctx.Encoder(resolve(encoder_name)) if encoder_name else None
    return model, tokenizer, encoder


def questions(data: str, n: int):
    rows = list(load_qa(data)["test"])[:n]
    return [r["question"] for r in rows], [r["contexts"][:1] for r in rows], [r["answers"] for r in rows]


def engine(args) -> None:
    model, tokenizer, encoder = load_adapter(args.adapter)
    qs, contexts, answers = questions(args.data, args.n)
    with peft_ctx.VllmEngine(args.served, python=vllm_python(), dtype=args.dtype) as server:
        predictions = peft_ctx.generate(
            model, tokenizer, qs, contexts, encoder=encoder, max_new_tokens=args.max_new_tokens, engine=server
        )
    reference = peft_ctx.generate(model, tokenizer, qs, contexts, encoder=encoder, max_new_tokens=args.max_new_tokens)
    agree = sum(a == b for a, b in zip(predictions, reference)) / len(reference)
    print(json.dumps({"vllm": generation_scores(predictions, answers), "same_answer_as_torch": agree}, indent=2))


def client(args) -> None:
    model, tokenizer, encoder = load_adapter(args.adapter)
    peft_ctx.check_export(model, args.served)
    qs, contexts, _ = questions(args.data, args.n)
    with urllib.request.urlopen(f"{args.url}/v1/models") as response:
        served_name = json.load(response)["data"][0]["id"]
    for question, e in zip(qs, peft_ctx.prompt_embeds(model, tokenizer, qs, contexts, encoder=encoder)):
        buffer = io.BytesIO()
        torch.save(e.to(torch.float32).cpu(), buffer)
        body = {
            "model": served_name,
            "prompt_embeds": base64.b64encode(buffer.getvalue()).decode(),
            "max_tokens": args.max_new_tokens,
            "temperature": 0.0,
        }
        request = urllib.request.Request(
            f"{args.url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request) as response:
            print(question, "->", json.load(response)["choices"][0]["text"].strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("export", "engine", "client"):
        p = sub.add_parser(name)
        p.add_argument("--adapter", required=True, help="a saved peft_ctx adapter folder")
        if name == "export":
            p.add_argument("--out", required=True)
        else:
            p.add_argument("--served", required=True, help="the folder export wrote")
            p.add_argument("--data", default="cpkc")
            p.add_argument("--n", type=int, default=20)
            p.add_argument("--max_new_tokens", type=int, default=16)
        if name == "engine":
            p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 where the CPU has it)")
        if name == "client":
            p.add_argument("--url", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    if args.command == "export":
        model, tokenizer, _ = load_adapter(args.adapter)
        print(peft_ctx.export_for_serving(model, args.out, tokenizer=tokenizer))
    elif args.command == "engine":
        engine(args)
    else:
        client(args)


if __name__ == "__main__":
    main()
