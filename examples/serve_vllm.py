"""Serve a peft_ctx adapter with vLLM through prompt embeddings (needs a GPU and `pip install vllm`).

    # 1. once: the model vLLM loads (the base; COCOM: its decoder LoRA merged) and the adapter's fingerprint
    python examples/serve_vllm.py export --adapter out/xrag --out served/xrag
    # 2a. offline: LLM.generate with prompt embeds
    python examples/serve_vllm.py offline --adapter out/xrag --served served/xrag --data cpkc --n 50
    # 2b. the OpenAI-compatible server, then requests with base64 prompt embeddings
    vllm serve served/xrag --enable-prompt-embeds --dtype float32
    python examples/serve_vllm.py client --adapter out/xrag --served served/xrag --url http://localhost:8000

What peft_ctx does here is build the input-embedding sequence of each question (``peft_ctx.prompt_embeds``: the base
token embeddings with the context slots filled by the adapter) and check that the served folder is this adapter's
export (``peft_ctx.check_export``); vLLM then runs an unchanged causal LM on it. vLLM (V1 engine) takes
``{"prompt_embeds": tensor}`` prompts with ``LLM(..., enable_prompt_embeds=True)``, and its completions endpoint takes
``prompt_embeds`` as a base64 string of ``torch.save`` of the tensor.

Status: this script has not been run by peft_ctx's own checks (no GPU was available in the sessions that wrote it);
the embeddings contract it relies on (``base.generate(inputs_embeds=prompt_embeds(...))`` on the exported model is
``peft_ctx.generate``, token for token) is tested in ``tests/test_serving.py``.
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


def embeds_for(model, tokenizer, encoder, qs, contexts):
    return [e.to(torch.float32).cpu() for e in peft_ctx.prompt_embeds(model, tokenizer, qs, contexts, encoder=encoder)]


def offline(args) -> None:
    from vllm import LLM, SamplingParams  # needs a GPU

    model, tokenizer, encoder = load_adapter(args.adapter)
    peft_ctx.check_export(model, args.served)
    qs, contexts, answers = questions(args.data, args.n)
    embeds = embeds_for(model, tokenizer, encoder, qs, contexts)
    llm = LLM(model=args.served, enable_prompt_embeds=True, dtype="float32", gpu_memory_utilization=0.5)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)
    outputs = llm.generate([{"prompt_embeds": e} for e in embeds], params)
    predictions = [o.outputs[0].text.strip() for o in outputs]
    reference = peft_ctx.generate(model, tokenizer, qs, contexts, encoder=encoder, max_new_tokens=args.max_new_tokens)
    agree = sum(a == b for a, b in zip(predictions, reference)) / len(reference)
    print(json.dumps({"vllm": generation_scores(predictions, answers), "agreement_with_torch": agree}, indent=2))


def client(args) -> None:
    model, tokenizer, encoder = load_adapter(args.adapter)
    peft_ctx.check_export(model, args.served)
    qs, contexts, _ = questions(args.data, args.n)
    for question, e in zip(qs, embeds_for(model, tokenizer, encoder, qs, contexts)):
        buffer = io.BytesIO()
        torch.save(e, buffer)
        body = {
            "model": args.served,
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
    for name in ("export", "offline", "client"):
        p = sub.add_parser(name)
        p.add_argument("--adapter", required=True, help="a saved peft_ctx adapter folder")
        if name == "export":
            p.add_argument("--out", required=True)
        else:
            p.add_argument("--served", required=True, help="the folder export wrote")
            p.add_argument("--data", default="cpkc")
            p.add_argument("--n", type=int, default=20)
            p.add_argument("--max_new_tokens", type=int, default=16)
        if name == "client":
            p.add_argument("--url", default="http://localhost:8000")
    args = parser.parse_args()
    if args.command == "export":
        model, tokenizer, _ = load_adapter(args.adapter)
        print(peft_ctx.export_for_serving(model, args.out, tokenizer=tokenizer))
    elif args.command == "offline":
        offline(args)
    else:
        client(args)


if __name__ == "__main__":
    main()
