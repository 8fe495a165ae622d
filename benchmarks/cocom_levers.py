"""COCOM's levers for small models (issue 24): one learning curve per training recipe, side by side.

    python -m benchmarks.cocom_levers [--levers plain,residual] [--rate 4] [--pretrain_steps 300] [--qa_steps 120]
        [--points 64,256,1024] [--resume]

Every lever is a COCOM adapter on the frozen SmolLM2-135M-Instruct, trained by COCOM's own recipe
(``peft_ctx.cocom.recipe``: auto-encoding + continuation pretraining, then QA on the training questions) with one
thing changed. Pretraining reads the Wikipedia paragraphs and the training questions' passages, shuffled together
(``peft_ctx.harness.data.pretraining_passages``: no passage of a validation or test question). At each point of its
curve (training examples seen, over both stages; 0 = untrained) the harness's probe (``peft_ctx.harness.curves``)
scores choice accuracy on the first ``--n_val`` validation questions with their own and with another question's
passage, and auto-encoding token accuracy on ``--n_passages`` validation passages with their own and another
passage's context embeddings. Never the test split: the test table is the demo's (``make reproduce``), for the
lever this benchmark picks. Results: ``--output`` (JSON, every record) and a markdown table and plot beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.ceiling import choice_row
from peft_ctx.cocom import CocomConfig, recipe
from peft_ctx.harness import assets, curves, demo
from peft_ctx.harness import eval as harness
from peft_ctx.harness.data import load_corpus, load_qa, pretraining_passages
from peft_ctx.methods import TrainingData
from peft_ctx.training import StageSettings

# name -> (CocomConfig fields, StageSettings fields for both stages, what it tests)
LEVERS = {
    "plain": ({}, {}, "COCOM as make reproduce trains it (compressor's last hidden states are the embeddings)"),
    "residual": (
        {"residual_pooling": True},
        {},
        "pooled token embeddings + a learned correction that starts at zero",
    ),
    "residual_lr1e-4": (
        {"residual_pooling": True},
        {"learning_rate": 1e-4},
        "residual pooling, learning rate 1e-4 (PISCO's) instead of 1e-3",
    ),
    "residual_frozen": (
        {"residual_pooling": True, "lora_r": 0},
        {},
        "residual pooling with the LLM frozen (ARC-style: only the correction and memory tokens train)",
    ),
    "tokens_frozen": (
        {"residual_pooling": True, "residual_source": "tokens", "lora_r": 0},
        {},
        "residual pooling whose correction reads the frozen LLM's own token states pooled per run (ARC-style)",
    ),
    "tokens_frozen_margin": (
        {"residual_pooling": True, "residual_source": "tokens", "lora_r": 0},
        {"a_margin": 1.0},
        "tokens_frozen + the wrong-passage margin (1 nat per answer token, weight 1) in QA",
    ),
    "tokens_frozen_margin_only": (
        {"residual_pooling": True, "residual_source": "tokens", "lora_r": 0},
        {"a_margin": 1.0, "a_nll": 0.0},
        "tokens_frozen trained on the wrong-passage margin alone in QA (no answer NLL, which rewards ignoring it)",
    ),
    "tokens": (
        {"residual_pooling": True, "residual_source": "tokens"},
        {},
        "residual pooling whose correction reads the token states, compressor and decoder LoRA trained",
    ),
}
QA_ONLY = {"a_margin", "margin", "a_nll"}  # QA-stage settings (pretraining has no other question's passage)


def build(lever: str, rate: int, base_dir: str, base_name: str):
    fields, _, _ = LEVERS[lever]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.name_or_path = base_name
    torch.manual_seed(0)
    config = CocomConfig(compression_rate=rate, base_model_name_or_path=base_name, **fields)
    return get_peft_model(model, config)


def run_lever(
    lever: str, args, tokenizer, data: TrainingData, validation: list[dict], base_dir: str, test_rows: list[dict]
) -> dict:
    _, stage_fields, about = LEVERS[lever]
    work_dir = os.path.join(args.work_dir, f"{lever}_x{args.rate}")
    model = build(lever, args.rate, base_dir, assets.SMOLLM2_HUB_ID)
    common = {"batch_size": args.batch_size, "learning_rate": args.lr, "bf16": args.bf16, "save_steps": 50}
    pretrain_fields = {k: v for k, v in stage_fields.items() if k not in QA_ONLY}
    stages = {
        "pretrain": StageSettings(
            steps=args.pretrain_steps, max_chars=args.max_chars, **{**common, **pretrain_fields}
        ),
        "qa": StageSettings(steps=args.qa_steps, **{**common, **stage_fields}),
    }
    probe = curves.probe(
        tokenizer,
        lambda m: harness.AdapterRunner(name=lever, label=lever, adapter_name=m.active_adapter, serve=False),
        validation,
        args.n_passages,
    )
    points = [int(p) for p in args.points.split(",") if p]
    curve = curves.LearningCurve(probe, points, os.path.join(work_dir, "learning_curve.json"), model)
    curve.measure("untrained", 0)
    start = time.perf_counter()
    reports = recipe.train(model, tokenizer, data, stages, work_dir, seed=0, callbacks=[curve])
    seconds = time.perf_counter() - start
    test = {}
    if test_rows:
        # Once, for the lever the validation curves picked: the adapter as it starts (for residual pooling: the
        # pooled token embeddings) and as trained, each with its wrong-passage control and content diagnostics.
        untrained = build(lever, args.rate, base_dir, assets.SMOLLM2_HUB_ID)
        test = {"untrained": test_row(untrained, tokenizer, lever, test_rows, args), "trained": None}
        test["trained"] = test_row(model, tokenizer, lever, test_rows, args)
    return {
        "lever": lever,
        "about": about,
        "rate": args.rate,
        "stages": {name: vars(s) for name, s in stages.items()},
        "seconds": round(seconds, 1),
        "seconds_per_step": {r.name: r.seconds_per_step for r in reports},
        "records": curve.records,
        "test": test,
    }


def test_row(model, tokenizer, lever: str, rows: list[dict], args) -> dict:
    model.eval()
    runner = harness.AdapterRunner(name=lever, label=lever, adapter_name=model.active_adapter, serve=False)
    settings = harness.EvalSettings(n_test=len(rows), n_generate=0, timing_examples=0, show_progress=False)
    with torch.no_grad():
        row = choice_row(model, tokenizer, runner, rows, settings)
        row.update(harness.content_diagnostics(model, tokenizer, runner, rows, args.n_passages) or {})
    print(f"test: {lever}: {row}", flush=True)
    return row


def table(results: list[dict]) -> str:
    lines = [
        "| lever | examples seen | choice acc | wrong passage | margin | AE token acc | AE, another passage |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for r in result["records"]:
            right, wrong = r.get("choice_accuracy"), r.get("choice_accuracy_wrong_passage")
            ae, ae_wrong = r.get("autoencode_token_accuracy"), r.get("autoencode_token_accuracy_wrong_passage")
            lines.append(
                f"| {result['lever']} ({r['stage']}) | {r['examples']} | {100 * right:.0f}% | {100 * wrong:.0f}% | "
                f"{100 * (right - wrong):+.0f} | {100 * ae:.1f}% | {100 * ae_wrong:.1f}% |"
            )
    return "\n".join(lines)


def test_table(results: list[dict], baselines: dict) -> str:
    """The test split's rows: no retrieval, text RAG, and each lever scored there as it starts and as trained."""
    lines = [
        "| test row | choice acc | wrong passage | margin | AE token acc | AE, another passage |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    rows = [(b["label"], b) for b in baselines.values()]
    for result in results:
        for when, row in (result.get("test") or {}).items():
            rows.append((f"{result['lever']} ({when})", row))
    for label, row in rows:
        right, wrong = row["choice_accuracy"], row.get("choice_accuracy_wrong_passage")
        margin = "-" if wrong is None else f"{100 * (right - wrong):+.1f}"
        lines.append(
            f"| {label} | {pct(right)} | {pct(wrong)} | {margin} | {pct(row.get('autoencode_token_accuracy'))} | "
            f"{pct(row.get('autoencode_token_accuracy_wrong_passage'))} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levers", default="plain,residual", help=f"Comma-separated, of {', '.join(LEVERS)}.")
    parser.add_argument("--rate", type=int, default=4)
    parser.add_argument("--pretrain_steps", type=int, default=300)
    parser.add_argument("--qa_steps", type=int, default=120)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max_chars", type=int, default=300, help="Pretraining passages cut to this many chars.")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (faster on AMX CPUs only).")
    parser.add_argument("--points", default="64,256,1024", help="Curve points (training examples seen).")
    parser.add_argument("--n_val", type=int, default=50, help="Validation questions the probe scores.")
    parser.add_argument("--n_passages", type=int, default=16, help="Validation passages for auto-encoding.")
    parser.add_argument(
        "--n_test", type=int, default=0, help="Also score the levers on the first n test questions (the pick only)."
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work_dir", default="outputs/cocom_levers")
    parser.add_argument("--output", default="benchmarks/results/cocom_levers.json")
    parser.add_argument("--resume", action="store_true", help="Keep finished levers and stage checkpoints.")
    args = parser.parse_args(argv)
    levers = [name for name in args.levers.split(",") if name]
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        raise ValueError(f"--levers {unknown}: choose from {', '.join(LEVERS)}.")
    torch.set_num_threads(args.threads or demo.auto_threads())
    base_dir = assets.resolve(assets.SMOLLM2_HUB_ID)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    whole = load_qa("cpkc", seed=0)  # whole splits: every held-out passage is kept out of pretraining
    held_out = [dict(r) for split in ("validation", "test") for r in whole[split]]
    # As the demo: training, probing and testing on questions whose passages fit in 1000 characters.
    dataset = load_qa("cpkc", seed=0, max_context_chars=1000)
    short, validation, test_rows = ([dict(r) for r in dataset[split]] for split in ("train", "validation", "test"))
    test_rows = test_rows[: args.n_test]
    data = TrainingData(short, pretraining_passages(load_corpus("wiki"), [dict(r) for r in whole["train"]], held_out))
    baselines = {}
    if test_rows:  # no retrieval and text RAG on the same test questions, on the plain base model
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        settings = harness.EvalSettings(n_test=len(test_rows), n_generate=0, timing_examples=0, show_progress=False)
        for runner in (
            harness.TextRunner("no_retrieval", "no retrieval", use_context=False),
            harness.TextRunner("rag", "text RAG"),
        ):
            with torch.no_grad():
                baselines[runner.name] = choice_row(base, tokenizer, runner, test_rows, settings)
            print(f"test: {baselines[runner.name]}", flush=True)
        del base
    print(f"{len(data.corpus)} pretraining passages, {len(short)} QA rows, {args.n_val} validation questions")

    done = {}
    if args.resume and os.path.exists(args.output):
        with open(args.output) as f:
            done = {(r["lever"], r["rate"]): r for r in json.load(f)["results"]}
    results = [r for key, r in done.items() if key[0] not in levers or key[1] != args.rate]
    for lever in levers:
        if (lever, args.rate) in done:
            results.append(done[(lever, args.rate)])
            continue
        print(f"\n== lever {lever}: {LEVERS[lever][2]}", flush=True)
        results.append(run_lever(lever, args, tokenizer, data, validation[: args.n_val], base_dir, test_rows))
        write(results, args, baselines)
    print(table(results))
    return results


def write(results: list[dict], args, baselines: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    payload = {
        "task": "BIG-bench contextual_parametric_knowledge_conflicts, validation split (seed 0)",
        "base_model": assets.SMOLLM2_HUB_ID,
        "command": "python -m benchmarks.cocom_levers " + " ".join(sys.argv[1:]),
        "test_baselines": baselines,
        "results": results,
        **harness.environment(),
    }
    with open(args.output, "w") as f:
        json.dump(payload, f, indent=2)
    stem = os.path.splitext(args.output)[0]
    with open(stem + ".md", "w") as f:
        f.write(table(results) + "\n")
        if baselines or any(r.get("test") for r in results):
            f.write("\n" + test_table(results, baselines) + "\n")
    curves.plot(
        {f"{r['lever']} x{r['rate']}": r["records"] for r in results},
        stem + ".png",
        title="COCOM levers, SmolLM2-135M-Instruct, CPKC validation sample",
    )


if __name__ == "__main__":
    main()
    sys.exit(0)
