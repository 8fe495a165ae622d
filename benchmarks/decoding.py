"""Which decoding set-up is fastest here, and does it keep the model's answers? Chooses what the benchmarks use.

    python -m benchmarks.decoding [--model smollm2] [--repeats 3] [--threads N]

Compares, in one process and interleaved per repetition, greedy decoding of 30 tokens at batch 1 with weights in
fp32 / bf16 / fp16 (fp32 compute) / dynamic int8 and a static or dynamic KV cache (``peft_ctx.harness.fast``), plus
transformers' own ``generate`` in fp32 for reference, on a text-RAG prompt with 5 documents and on an
instruction-only prompt of about xRAG's length. Accuracy of each lower-precision variant against fp32 is measured on
real text-RAG prompts: greedy answers identical, first tokens identical, the largest last-position logit difference.
The recommendation (what ``benchmarks.run`` uses by default) is the fastest set-up end to end on the 5-document
prompt among those whose first tokens all match fp32's and whose logits stay within ``--max-logit-diff``.
Writes ``benchmarks/results/decoding.json`` and ``decoding.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from peft_ctx.harness.fast import convert_weights, greedy_generate, weight_bytes
from peft_ctx.inference import template_examples
from peft_ctx.prompting import RAG_TEMPLATE, pad_examples, pad_token_id

from .common import DEFAULT_MODEL, load_model, machine, median, resolve_device, set_threads, write_report
from .workload import build_workload

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _inputs(examples, tokenizer, device):
    batch = pad_examples(examples, pad_token_id(tokenizer))
    batch.pop("context_mask")
    return {k: v.to(device) for k, v in batch.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="Model Hub id (offline assets: a local copy), alias or folder."
    )
    parser.add_argument("--repeats", type=int, default=3, help="Timed repetitions after one warm-up.")
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--accuracy-prompts", type=int, default=8, help="Real prompts for the accuracy check.")
    parser.add_argument("--time-bf16", action="store_true", help="Also time bf16 weights (slow on most CPUs).")
    parser.add_argument("--max-logit-diff", type=float, default=1.0, help="Accuracy bound for the recommendation.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--out", default=RESULTS, help="Folder for decoding.json / decoding.md.")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    device = resolve_device("cpu")
    load_start = time.perf_counter()
    fp32, tokenizer = load_model(args.model, device)
    load_s = time.perf_counter() - load_start
    variants, convert_s = {"fp32": fp32}, {}
    for weights in ("bf16", "fp16w", "int8"):
        start = time.perf_counter()
        variants[weights] = convert_weights(copy.deepcopy(fp32), weights)
        convert_s[weights] = time.perf_counter() - start

    n_acc = args.accuracy_prompts
    work = build_workload(tokenizer, RAG_TEMPLATE, n_examples=max(n_acc, 1), max_docs=5)

    def rag(questions, passages=None):
        return template_examples(tokenizer, questions, passages, prompt_template=RAG_TEMPLATE)

    prompts = {
        "rag_5docs": _inputs(rag(work.questions[:1], [work.docs_for(0, 5)]), tokenizer, device),
        "instruction_only": _inputs(rag(work.questions[:1]), tokenizer, device),
    }
    setups = [(w, c) for w in ("fp32", "fp16w") for c in ("static", "dynamic")]
    setups += [("int8", "static"), ("fp32", "generate")]
    if args.time_bf16:  # without native bf16 arithmetic (AVX512-BF16 / AMX) a CPU prefills several times slower
        setups.append(("bf16", "static"))

    def run(weights, cache, inputs):
        model = variants[weights]
        if cache == "generate":
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(
                    **inputs,
                    do_sample=False,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    pad_token_id=pad_token_id(tokenizer),
                )
            return float("nan"), time.perf_counter() - start
        result = greedy_generate(model, inputs, args.new_tokens, cache=cache)
        return result.ttft_s, result.e2e_s

    times = {(w, c, p): [] for w, c in setups for p in prompts}
    for rep in range(args.repeats + 1):  # repetition 0 is the warm-up
        order = setups if rep % 2 == 0 else setups[::-1]  # alternate the order so drift hits all setups alike
        for weights, cache in order:
            for name, inputs in prompts.items():
                ttft, e2e = run(weights, cache, inputs)
                if rep > 0:
                    times[(weights, cache, name)].append((ttft, e2e))
        print(f"decoding: repetition {rep}/{args.repeats} done", flush=True)

    rows = []
    for (weights, cache, name), values in times.items():
        e2e = median(v[1] for v in values)
        ttft = median(v[0] for v in values) if cache != "generate" else None
        rows.append(
            {
                "weights": weights,
                "cache": cache if cache != "generate" else "dynamic (transformers generate)",
                "prompt": name,
                "prompt_tokens": int(prompts[name]["input_ids"].shape[1]),
                "ttft_s": ttft,
                "e2e_s": e2e,
                "decode_ms_per_token": None if ttft is None else 1000 * (e2e - ttft) / (args.new_tokens - 1),
                "weight_bytes": weight_bytes(variants[weights]),
            }
        )

    accuracy = {}
    for weights in ("bf16", "fp16w", "int8"):
        same, first, max_diff = 0, 0, 0.0
        for i in range(n_acc):
            inputs = _inputs(rag([work.questions[i]], [work.docs_for(i, 1)]), tokenizer, device)
            ref = greedy_generate(fp32, inputs, args.new_tokens).tokens
            got = greedy_generate(variants[weights], inputs, args.new_tokens).tokens
            same += int(torch.equal(ref, got))
            first += int(ref[0, 0] == got[0, 0])
            with torch.no_grad():
                a = fp32(**inputs, logits_to_keep=1).logits.float()
                b = variants[weights](**inputs, logits_to_keep=1).logits.float()
            max_diff = max(max_diff, float((a - b).abs().max()))
        accuracy[weights] = {
            "prompts": n_acc,
            "greedy_answers_identical": same,
            "first_token_identical": first,
            "max_abs_logit_diff_last_position": max_diff,
        }
    result = {
        "model": args.model,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": threads,
        "load_s": load_s,
        "convert_weights_s": convert_s,
        "machine": machine(),
        "rows": rows,
        "accuracy_vs_fp32": accuracy,
    }
    result["recommended"] = recommend(rows, accuracy, args.max_logit_diff)
    write_report(args.out, "decoding", result, markdown)
    return result


def recommend(rows: list[dict], accuracy: dict, max_logit_diff: float) -> dict:
    """Fastest end to end on the 5-document prompt among set-ups whose answers hold (our loop only)."""

    def holds(weights: str) -> bool:
        if weights == "fp32":
            return True
        acc = accuracy[weights]
        return (
            acc["first_token_identical"] == acc["prompts"]
            and acc["max_abs_logit_diff_last_position"] <= max_logit_diff
        )

    candidates = [r for r in rows if r["prompt"] == "rag_5docs" and r["ttft_s"] is not None and holds(r["weights"])]
    best = min(candidates, key=lambda r: r["e2e_s"])
    return {
        "weights": best["weights"],
        "cache": best["cache"],
        "rule": f"fastest end to end on rag_5docs among set-ups with all first tokens equal to fp32's and logits "
        f"within {max_logit_diff}",
        "rejected_for_accuracy": sorted(w for w in accuracy if not holds(w)),
    }


def markdown(result: dict) -> str:
    lines = [
        f"Decoding set-ups, {result['model']}, batch 1, {result['new_tokens']} new tokens, median of "
        f"{result['repeats']} runs, {result['threads']} threads, load average at the end "
        f"{result['machine']['load_average']}.",
        "",
        "| weights | cache | prompt | prompt tokens | TTFT s | end-to-end s | decode ms/token | weight MB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        ttft = "-" if r["ttft_s"] is None else f"{r['ttft_s']:.3f}"
        per_token = "-" if r["decode_ms_per_token"] is None else f"{r['decode_ms_per_token']:.1f}"
        lines.append(
            f"| {r['weights']} | {r['cache']} | {r['prompt']} | {r['prompt_tokens']} | {ttft} | {r['e2e_s']:.3f} | "
            f"{per_token} | {r['weight_bytes'] / 1e6:.0f} |"
        )
    lines += [
        "",
        "| weights | greedy answers identical to fp32 | first token identical | max logit diff |",
        "|---|---|---|---:|",
    ]
    for weights, acc in result["accuracy_vs_fp32"].items():
        lines.append(
            f"| {weights} | {acc['greedy_answers_identical']}/{acc['prompts']} | "
            f"{acc['first_token_identical']}/{acc['prompts']} | {acc['max_abs_logit_diff_last_position']:.3f} |"
        )
    rec = result["recommended"]
    lines += [
        "",
        f"Recommended (used by `python -m benchmarks.run`): **{rec['weights']} weights, {rec['cache']} cache** "
        f"({rec['rule']}; rejected for accuracy: {', '.join(rec['rejected_for_accuracy']) or 'none'}).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
