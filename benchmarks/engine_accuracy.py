"""Does an engine change the answers? Generation accuracy of every trained adapter on torch and on llama.cpp.

    python -m benchmarks.engine_accuracy [--adapters outputs/demo/adapters] [--n 50] [--gguf-type f16]

The evaluation harness's own rows (``peft_ctx.harness.eval``: no retrieval, text RAG, and each adapter served as
its method serves it, COCOM with the decoder LoRA merged) answer the first ``--n`` held-out CPKC test questions
greedily, once with ``model.generate`` and once with ``LlamaCppEngine`` on each row's export. Per row: accuracy
(gold answer contained), EM and F1 on both engines, the change in points, and how many answers are identical. The
target (issue 16): no row's accuracy changes by more than 2 points. Writes ``benchmarks/results/engine_accuracy.json``
and ``engine_accuracy.md``. Nothing here trains; the adapters are those ``make demo`` saved.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_ctx.encoders import Encoder
from peft_ctx.harness import eval as harness
from peft_ctx.harness import metrics
from peft_ctx.harness.assets import SMOLLM2_HUB_ID, resolve
from peft_ctx.harness.data import load_qa

from .common import machine

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", default=os.path.join("outputs", "demo", "adapters"))
    parser.add_argument("--base_model", default=SMOLLM2_HUB_ID)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--max_new_tokens", type=int, default=12)
    parser.add_argument("--gguf-type", default="f16", choices=("f16", "bf16", "q8_0", "q8_0_f16emb"))
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    names = sorted(
        d for d in os.listdir(args.adapters) if os.path.isfile(os.path.join(args.adapters, d, "adapter_config.json"))
    )
    if not names:
        raise SystemExit(f"No saved adapters under {args.adapters}; run make demo first.")
    base_path = resolve(args.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = None
    encoders = {}
    for name in names:
        path = os.path.join(args.adapters, name)
        if model is None:
            model = PeftModel.from_pretrained(base, path, adapter_name=name)
        else:
            model.load_adapter(path, adapter_name=name)
        retriever = getattr(PeftConfig.from_pretrained(path), "retriever_name_or_path", None)
        encoders[name] = Encoder(resolve(retriever)) if retriever else None
    model.eval()
    rows = list(load_qa("cpkc")["test"])[: args.n]
    first = model.peft_config[names[0]]
    runners = [
        harness.TextRunner("no_retrieval", "no retrieval", use_context=False, adapter_config=first),
        harness.TextRunner("rag", "text RAG", use_context=True, adapter_config=first),
    ] + [harness.AdapterRunner(name=n, label=n, adapter_name=n, encoder=encoders[n]) for n in names]
    work = tempfile.mkdtemp(prefix="peft_ctx_engine_accuracy_")
    out_rows = []
    for runner in runners:
        if isinstance(runner, harness.AdapterRunner):
            runner.precompute(model, tokenizer, rows)
            serving = runner.serving(model)
        else:
            serving = contextlib.nullcontext()
        with serving:
            settings = harness.EvalSettings(engine="llama.cpp", engine_dir=work, gguf_type=args.gguf_type)
            engine = harness.make_engine(model, tokenizer, runner, settings)
            answers = {
                name: harness.generate_answers(
                    model, tokenizer, runner, rows, args.max_new_tokens, 8, progress=True, engine=e
                )
                for name, e in (("torch", None), ("llama.cpp", engine))
            }
        scores = {name: metrics.generation_scores(a, [r["answers"] for r in rows]) for name, a in answers.items()}
        row = {
            "method": runner.name,
            "torch": scores["torch"],
            "llama.cpp": scores["llama.cpp"],
            # Rounded: one question of 50 is 2 points, which float subtraction makes 2.0000000000000018.
            "accuracy_change_points": round(100 * (scores["llama.cpp"]["accuracy"] - scores["torch"]["accuracy"]), 6),
            "identical_answers": sum(a == b for a, b in zip(answers["torch"], answers["llama.cpp"])) / len(rows),
        }
        print(row, flush=True)
        out_rows.append(row)
    result = {
        "description": "generation accuracy on torch vs llama.cpp, the harness's rows, CPKC test questions",
        "n_questions": len(rows),
        "gguf_type": args.gguf_type,
        "adapters": args.adapters,
        "machine": machine(),
        "max_new_tokens": args.max_new_tokens,
        "rows": out_rows,
        "target_met": all(abs(r["accuracy_change_points"]) <= 2.0 for r in out_rows),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "engine_accuracy.json"), "w") as f:
        json.dump(result, f, indent=2)
    markdown = report(result, args.max_new_tokens)
    with open(os.path.join(args.out, "engine_accuracy.md"), "w") as f:
        f.write(markdown)
    print(markdown)
    return result


def report(result: dict, max_new_tokens: int) -> str:
    """The markdown table of an engine_accuracy ``result`` and the target's verdict."""
    lines = [
        f"{result['n_questions']} CPKC test questions, greedy, {max_new_tokens} new tokens; llama.cpp on each row's "
        f"{result['gguf_type']} GGUF export; adapters from `{result['adapters']}`.",
        "",
        "| row | accuracy torch | accuracy llama.cpp | change (points) | F1 torch | F1 llama.cpp | same answers |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {100 * r['torch']['accuracy']:.0f}% | {100 * r['llama.cpp']['accuracy']:.0f}% | "
            f"{r['accuracy_change_points']:+.0f} | {100 * r['torch']['f1']:.1f} | {100 * r['llama.cpp']['f1']:.1f} | "
            f"{r['identical_answers']:.0%} |"
        )
    verdict = "met" if result["target_met"] else "NOT met"
    lines += ["", f"- No row's accuracy changes by more than 2 points between engines: **{verdict}**."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
