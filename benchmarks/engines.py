"""Which engine and weights serve fastest here: torch against llama.cpp (f16 / bf16 / q8_0 / q4_1 GGUF), one run.

    python -m benchmarks.engines [--repeats 5] [--new-tokens 30] [--work build/engines]

The text-RAG prompt of the benchmark profile (5 documents of 180 tokens, 958 tokens with the chat template) and an
xRAG-length prompt (the instruction alone) are decoded greedily at batch 1, interleaved per repetition: the torch
path (``peft_ctx.harness.fast.greedy_generate``, the set-up ``benchmarks/decoding.py`` recommends) and llama.cpp
(``peft_ctx.LlamaCppEngine``) on each GGUF: ``q4_1`` is the asset as shipped (the torch model's weights are its
dequantised values), the others are converted from the torch model's folder with llama.cpp's converter. Per engine:
prefill time of the long prompt, decoding time per token, TTFT and end-to-end time, tokens/s, weight bytes, and
agreement with torch (first token and whole answer on real text-RAG prompts). The recommendation (what
``benchmarks.run --engine llama.cpp`` uses) is the GGUF type with the fastest end-to-end text-RAG time among those
whose first tokens all match torch's. Writes ``benchmarks/results/engines.json`` and ``engines.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import torch

import peft_ctx
from peft_ctx.harness import assets
from peft_ctx.harness.fast import greedy_generate, weight_bytes
from peft_ctx.harness.llama_cpp_build import read_stamp
from peft_ctx.inference import ServingPrompt, template_examples
from peft_ctx.prompting import RAG_TEMPLATE, pad_examples, pad_token_id
from peft_ctx.serving import to_gguf

from .common import DEFAULT_MODEL, load_model, machine, median, set_threads, write_report
from .workload import build_workload

RESULTS = os.path.join(os.path.dirname(__file__), "results")
GGUF_TYPES = ("f16", "bf16", "q8_0", "q8_0_f16emb", "q4_1")
MIN_ANSWER_AGREEMENT = 0.85  # whole greedy answers identical to torch's, for a weight type to be recommended


def _torch_inputs(examples, tokenizer):
    batch = pad_examples(examples, pad_token_id(tokenizer))
    batch.pop("context_mask")
    return batch


def _prompt(example) -> ServingPrompt:
    ids = torch.tensor(example.input_ids)
    return ServingPrompt(input_ids=ids, slot_mask=torch.zeros_like(ids, dtype=torch.bool))


def gguf_files(model_dir: str, work: str, types=GGUF_TYPES) -> dict[str, str]:
    """The GGUF of each weight type: the asset's own Q4_1 file, the rest converted from ``model_dir``."""
    files = {}
    for kind in types:
        if kind == "q4_1":
            files[kind] = assets.smollm2_gguf()
            continue
        os.makedirs(work, exist_ok=True)
        files[kind] = to_gguf(model_dir, kind, out_file=os.path.join(work, f"model-{kind}.gguf"))
    return files


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id (offline: its local copy) or folder.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--accuracy-prompts", type=int, default=8)
    parser.add_argument("--types", nargs="+", default=list(GGUF_TYPES), choices=GGUF_TYPES)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", default=os.path.join("build", "engines"), help="Folder for converted GGUF files.")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    model, tokenizer = load_model(args.model, torch.device("cpu"))
    model_dir = assets.resolve(args.model)
    if "q4_1" in args.types and args.model != DEFAULT_MODEL:
        args.types = [t for t in args.types if t != "q4_1"]  # the shipped Q4_1 file is SmolLM2's
    files = gguf_files(model_dir, args.work, args.types)
    engines = {
        kind: peft_ctx.LlamaCppEngine(path, n_seq_max=1, n_ctx=1536, n_threads=threads) for kind, path in files.items()
    }
    work = build_workload(tokenizer, RAG_TEMPLATE, n_examples=max(args.accuracy_prompts, 1), max_docs=5)
    long_examples = template_examples(
        tokenizer,
        work.questions,
        [work.docs_for(i, 5) for i in range(len(work.questions))],
        prompt_template=RAG_TEMPLATE,
    )
    short_examples = template_examples(tokenizer, work.questions, None, prompt_template=RAG_TEMPLATE)
    prompts = {"rag_5docs": long_examples[0], "instruction": short_examples[0]}
    n = args.new_tokens
    runs: dict[str, dict[str, list]] = {}
    names = ["torch"] + [f"llama.cpp-{k}" for k in engines]

    def once(name, example):
        if name == "torch":
            result = greedy_generate(model, _torch_inputs([example], tokenizer), n)
            return result.ttft_s, result.e2e_s
        engine = engines[name.split("-", 1)[1]]
        start = time.perf_counter()
        engine.generate_prompts([_prompt(example)], n)  # no end token: exactly n tokens, as the torch path
        e2e = time.perf_counter() - start
        return engine.timings.first_token_s[0], e2e

    for name in names:  # warm-up
        for example in prompts.values():
            once(name, example)
    for rep in range(args.repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            for key, example in prompts.items():
                ttft, e2e = once(name, example)
                runs.setdefault(name, {}).setdefault(f"{key}_ttft", []).append(ttft)
                runs[name].setdefault(f"{key}_e2e", []).append(e2e)
    # Agreement with torch on real text-RAG prompts (greedy, stopping at the end token on both sides).
    eos = peft_ctx.inference.eos_ids(model, tokenizer)
    reference = []
    for example in long_examples[: args.accuracy_prompts]:
        out = model.generate(
            **_torch_inputs([example], tokenizer),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=pad_token_id(tokenizer),
        )
        reference.append(out[0, len(example.input_ids) :].tolist())
    reference = [[t for t in ids if t not in eos] for ids in reference]
    rows = []
    for name in names:
        r = runs[name]
        row = {
            "engine": "torch" if name == "torch" else "llama.cpp",
            "weights": "fp32" if name == "torch" else name.split("-", 1)[1],
            "prompt_tokens": len(prompts["rag_5docs"].input_ids),
            "prefill_s": median(r["rag_5docs_ttft"]),
            "decode_s_per_token": (median(r["rag_5docs_e2e"]) - median(r["rag_5docs_ttft"])) / (n - 1),
            "e2e_s": median(r["rag_5docs_e2e"]),
            "instruction_ttft_s": median(r["instruction_ttft"]),
            "instruction_e2e_s": median(r["instruction_e2e"]),
            "runs_s": r,
        }
        row["tokens_per_s"] = n / row["e2e_s"]
        if name == "torch":
            row["weight_bytes"] = weight_bytes(model)
            row["first_token_agreement"] = row["answer_agreement"] = 1.0
        else:
            engine = engines[row["weights"]]
            row["weight_bytes"] = os.path.getsize(engine.model_path)
            got = engine.generate_prompts([_prompt(e) for e in long_examples[: args.accuracy_prompts]], n, eos)
            row["first_token_agreement"] = sum(a[:1] == b[:1] for a, b in zip(reference, got)) / len(got)
            row["answer_agreement"] = sum(a == b for a, b in zip(reference, got)) / len(got)
        rows.append(row)
    torch_row = rows[0]
    for row in rows:
        row["decode_speedup_vs_torch"] = torch_row["decode_s_per_token"] / row["decode_s_per_token"]
        # Per repetition, torch's and this engine's decoding measured close together, so that a drift of the
        # machine's speed between repetitions reaches both (torch's ms/token ranged 63-116 across runs here); the
        # range says how far the load still moved the ratio.
        paired = sorted(
            (te - tt) / (e - t)
            for te, tt, e, t in zip(
                torch_row["runs_s"]["rag_5docs_e2e"], torch_row["runs_s"]["rag_5docs_ttft"],
                row["runs_s"]["rag_5docs_e2e"], row["runs_s"]["rag_5docs_ttft"],
            )
        )  # fmt: skip
        row["decode_speedup_paired"] = {"median": median(paired), "min": paired[0], "max": paired[-1]}
        row["prefill_speedup_vs_torch"] = torch_row["prefill_s"] / row["prefill_s"]
        row["e2e_speedup_vs_torch"] = torch_row["e2e_s"] / row["e2e_s"]
    # 8-bit weights keep first tokens but change about half the whole answers (and SPRING's accuracy by 6 points on
    # 50 questions, benchmarks/results/engine_accuracy_q8_0_f16emb.md): only near-lossless weights are recommended.
    candidates = [
        r for r in rows[1:] if r["first_token_agreement"] == 1.0 and r["answer_agreement"] >= MIN_ANSWER_AGREEMENT
    ]
    best = min(candidates, key=lambda r: r["e2e_s"]) if candidates else None
    fastest_decode = max(rows[1:], key=lambda r: r["decode_speedup_paired"]["median"])
    faithful = max(candidates, key=lambda r: r["decode_speedup_paired"]["median"]) if candidates else None
    fastest_prefill = min(rows[1:], key=lambda r: r["prefill_s"])
    result = {
        "description": "torch vs llama.cpp at batch 1: prefill of the 958-token text-RAG prompt and decoding",
        "model": args.model,
        "new_tokens": n,
        "repeats": args.repeats,
        "threads": threads,
        "llama_cpp_build": read_stamp(),
        "machine": machine(),
        "rows": rows,
        "recommended": None if best is None else {"engine": "llama.cpp", "weights": best["weights"]},
        "targets": {
            "decode_3x": {
                "met": fastest_decode["decode_speedup_paired"]["median"] >= 3.0,
                "best": f"llama.cpp {fastest_decode['weights']}: {_paired(fastest_decode)}",
            },
            "decode_3x_faithful": {
                "met": faithful is not None and faithful["decode_speedup_paired"]["median"] >= 3.0,
                "best": "none" if faithful is None else f"llama.cpp {faithful['weights']}: {_paired(faithful)}",
            },
            "prefill_no_slower": {
                "met": fastest_prefill["prefill_speedup_vs_torch"] >= 1.0,
                "best": f"llama.cpp {fastest_prefill['weights']}: {fastest_prefill['prefill_s']:.2f} s vs torch "
                f"{torch_row['prefill_s']:.2f} s",
            },
        },
    }
    write_report(args.out, "engines", result, markdown)
    if os.path.isdir(args.work) and args.work.startswith("build"):
        shutil.rmtree(args.work, ignore_errors=True)
    return result


def _paired(row: dict) -> str:
    p = row["decode_speedup_paired"]
    return f"{p['median']:.2f}x (paired per repetition; range {p['min']:.2f}-{p['max']:.2f}x)"


def markdown(result: dict) -> str:
    build = result.get("llama_cpp_build", {})
    lines = [
        f"Model `{result['model']}`, batch 1, {result['new_tokens']} generated tokens, median of {result['repeats']} "
        f"interleaved runs, {result['threads']} threads; llama-cpp-python {build.get('version', '?')} "
        f"({build.get('build', 'unknown build')}). Machine: {result['machine'].get('cpu', '?')}.",
        "",
        "| engine | weights | prefill 958 tok (s) | decode ms/token | decode x | decode x paired (range) | prefill x "
        "| e2e (s) | tokens/s | instruction-only e2e (s) | weight MB | first token = torch | answer = torch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['engine']} | {r['weights']} | {r['prefill_s']:.3f} | {1000 * r['decode_s_per_token']:.1f} | "
            f"{r['decode_speedup_vs_torch']:.2f} | {r['decode_speedup_paired']['median']:.2f} "
            f"({r['decode_speedup_paired']['min']:.2f}-{r['decode_speedup_paired']['max']:.2f}) | "
            f"{r['prefill_speedup_vs_torch']:.2f} | {r['e2e_s']:.3f} | "
            f"{r['tokens_per_s']:.1f} | {r['instruction_e2e_s']:.3f} | {r['weight_bytes'] / 1e6:.0f} | "
            f"{r['first_token_agreement']:.0%} | {r['answer_agreement']:.0%} |"
        )
    t = result["targets"]

    def verdict(name):
        return "met" if t[name]["met"] else "NOT met"

    lines += [
        "",
        f"- Decoding with llama.cpp at least 3x faster per token than torch: **{verdict('decode_3x')}** "
        f"({t['decode_3x']['best']}); with weights whose answers agree with torch's on at least "
        f"{MIN_ANSWER_AGREEMENT:.0%} of the prompts: **{verdict('decode_3x_faithful')}** "
        f"({t['decode_3x_faithful']['best']}).",
        f"- Prefill of the 958-token prompt no slower than torch: **{verdict('prefill_no_slower')}** "
        f"({t['prefill_no_slower']['best']}).",
        f"- Recommended for `benchmarks.run --engine llama.cpp`: {result['recommended']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
