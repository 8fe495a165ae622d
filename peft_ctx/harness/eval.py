"""Evaluate peft_ctx adapters against no retrieval and text RAG on a QA test split.

    python -m peft_ctx.harness.eval --adapter DIR_OR_REPO --data NAME_OR_FILE [--n_test 100] [--output results.json]

``--data`` is ``cpkc`` (BIG-bench contextual_parametric_knowledge_conflicts, offline), ``bigbench:TASK``, a JSON /
JSONL file of rows (see ``peft_ctx.harness.data.load_qa``) or a Hub dataset id. The base model and the encoder are the
ones the adapter's config names, by Hub id (``--base_model`` / ``--encoder`` override them; the offline assets' Hub
ids, and the aliases ``smollm2`` / ``all-minilm-l6-v2``, load from their local copies). Rows without a gold passage
get the encoder's top-k passages from ``--corpus``.

Every row of the table reads the same test questions:

- choice accuracy: where the dataset lists candidate answers, the share of questions whose right candidate has the
  highest length-normalised log-likelihood (mean log-probability per answer token) after the prompt;
- accuracy (a reference answer contained in the greedy generation), exact match and token F1 (first line);
- prompt tokens (mean, context slots included), time to first token and end-to-end latency (median over
  ``--timing_examples`` single questions, batch size 1, a fixed number of new tokens for every method), and the
  speed-up of the end-to-end latency over text RAG. Document vectors and compressed passages are computed before
  timing, as an index would hold them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Optional

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..encoders import Encoder
from .assets import MINILM_HUB_ID, resolve
from .data import load_corpus, load_qa
from .measure import (
    choice_scores,
    content_diagnostics,
    diagnostic_passages,
    evaluate,
    evaluate_runner,
    generate_answers,
    interleaved_latency,
    latency,
    make_engine,
    prompt_tokens,
    score_rows,
    wrong_passage_control,
    wrong_passage_rows,
)
from .report import (
    JSON_KEYS,
    TABLE_COLUMNS,
    add_retrieved_passages,
    add_speedups,
    environment,
    json_rows,
    markdown_table,
    plot,
)
from .runners import AdapterRunner, EvalSettings, Runner, TextRunner, _require_contexts
from .serving import ENGINES, OUTTYPES

# The harness's evaluation API, importable from here as before the split (runners, measure and report hold it).
__all__ = [
    "JSON_KEYS",
    "TABLE_COLUMNS",
    "AdapterRunner",
    "EvalSettings",
    "Runner",
    "TextRunner",
    "_require_contexts",
    "add_retrieved_passages",
    "add_speedups",
    "choice_scores",
    "content_diagnostics",
    "diagnostic_passages",
    "environment",
    "evaluate",
    "evaluate_runner",
    "generate_answers",
    "interleaved_latency",
    "json_rows",
    "latency",
    "main",
    "make_engine",
    "markdown_table",
    "plot",
    "prompt_tokens",
    "score_rows",
    "wrong_passage_control",
    "wrong_passage_rows",
]


# ---- command line ------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m peft_ctx.harness.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="saved peft_ctx adapter: a folder or a Hub repo id")
    parser.add_argument("--data", required=True, help="cpkc, bigbench:TASK, a JSON/JSONL file, or a Hub dataset id")
    parser.add_argument("--base_model", default=None, help="base model (default: the one the adapter names)")
    parser.add_argument("--encoder", default=None, help="document encoder (default: the one the adapter names)")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--n_test", type=int, default=100, help="questions from the split (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation/test split")
    parser.add_argument("--max_context_chars", type=int, default=None, help="drop rows with longer passages")
    parser.add_argument("--corpus", default="wiki", help="retrieval corpus for rows without a passage")
    parser.add_argument("--top_k", type=int, default=1, help="passages retrieved per question")
    parser.add_argument("--max_new_tokens", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--timing_examples", type=int, default=10)
    parser.add_argument("--no_baselines", action="store_true", help="skip the no-retrieval and text-RAG rows")
    parser.add_argument(
        "--wrong_passage",
        action="store_true",
        help="also score every row that reads passages with another question's passage (the control)",
    )
    parser.add_argument(
        "--engine", default="torch", choices=ENGINES, help="who decodes the generation and timing rows (every row)"
    )
    parser.add_argument("--engine_dir", default=None, help="folder for the engines' exports (default: a temp dir)")
    parser.add_argument("--gguf_type", default="f16", choices=OUTTYPES, help="llama.cpp weight type")
    parser.add_argument(
        "--vllm_dtype", default=None, choices=("float32", "bfloat16"), help="vLLM weights (default: by CPU)"
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option for prepare_inputs, e.g. num_virtual_tokens=20 (repeatable)",
    )
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    args = parser.parse_args(argv)
    if args.output and os.path.exists(args.output) and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it.")
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--option {item!r}: write KEY=VALUE.")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value

    config = PeftConfig.from_pretrained(args.adapter)
    base_name = args.base_model or config.base_model_name_or_path
    if not base_name:
        parser.error(f"The adapter config of {args.adapter} names no base model; pass --base_model.")
    base_path = resolve(base_name)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter, adapter_name="adapter").eval()
    encoder_name = args.encoder or getattr(config, "retriever_name_or_path", None)
    encoder = Encoder(resolve(encoder_name)) if encoder_name else None
    dataset = load_qa(args.data, seed=args.seed, max_context_chars=args.max_context_chars)
    rows = list(dataset[args.split])
    rows = rows[: args.n_test] if args.n_test else rows
    if not rows:
        raise ValueError(f"The {args.split} split of {args.data!r} is empty.")
    if any(not r["contexts"] for r in rows):
        retriever = encoder or Encoder(resolve(MINILM_HUB_ID))
        hit = add_retrieved_passages(rows, retriever, load_corpus(args.corpus), k=args.top_k)
        print(f"Retrieved top-{args.top_k} passages from {args.corpus!r}: answer in them for {100 * hit:.1f}%")
    runner = AdapterRunner(
        name=config.method,
        label=f"{config.method} ({os.path.basename(os.path.normpath(args.adapter))})",
        adapter_name="adapter",
        encoder=encoder,
        options=options,
    )
    runners: list[Runner] = []
    if not args.no_baselines:
        runners += [
            TextRunner("no_retrieval", "no retrieval", use_context=False, adapter_config=config),
            TextRunner("rag", "text RAG", use_context=True, adapter_config=config),
        ]
    runners.append(runner)
    engine_dir = args.engine_dir
    if args.engine != "torch" and engine_dir is None:
        engine_dir = tempfile.mkdtemp(prefix="peft_ctx_engine_")
    settings = EvalSettings(
        n_test=len(rows),
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        timing_examples=args.timing_examples,
        wrong_passage=args.wrong_passage,
        engine=args.engine,
        engine_dir=engine_dir,
        gguf_type=args.gguf_type,
        vllm_dtype=args.vllm_dtype,
    )
    results = evaluate(model, tokenizer, runners, rows, settings)
    print(markdown_table(results))
    if args.output:
        payload = {
            "adapter": args.adapter,
            "data": args.data,
            "split": args.split,
            "base_model": base_name,
            "encoder": encoder_name,
            "rows": json_rows(results),
            **environment(),
        }
        with open(args.output, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"Wrote {args.output}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
