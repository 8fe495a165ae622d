"""What an evaluation measures per row: choice scores, generated answers and their metrics, latency, prompt tokens, the
wrong-passage control and the content diagnostics (``evaluate``)."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Sequence
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from ..inference import (
    batch_prompts,
    collate,
    context_length,
    decode_batches,
    engine_answers,
    model_device,
)
from ..prompting import Example, pad_token_id, position_ids
from . import metrics
from .report import _summary, add_speedups
from .runners import AdapterRunner, EvalSettings, Runner
from .serving import llama_cpp_engine, vllm_engine


# ---- measurements -----------------------------------------------------------------------------------------------
def _batch(runner: Runner, model, tokenizer, examples: list[Example], padding_side: str):
    return collate(
        runner.config,
        examples,
        tokenizer,
        padding_side=padding_side,
        max_length=context_length(model),
        device=model_device(model),
    )


@torch.no_grad()
def choice_scores(model, tokenizer, runner: Runner, rows: Sequence[dict], batch_size: int = 8, progress=False):
    """Length-normalised log-likelihood of every candidate answer of every row.  # list of [n_choices] floats"""
    pairs = [(i, choice) for i, r in enumerate(rows) for choice in r["choices"]]
    flat: list[float] = []
    with runner.activate(model):
        for start in tqdm(range(0, len(pairs), batch_size), desc=f"Choices: {runner.label}", disable=not progress):
            chunk = pairs[start : start + batch_size]
            examples = runner.examples(model, tokenizer, [rows[i] for i, _ in chunk], answers=[c for _, c in chunk])
            batch = _batch(runner, model, tokenizer, examples, padding_side="left")
            labels = batch.pop("labels")
            batch["position_ids"] = position_ids(batch["attention_mask"])
            has = (labels != -100).any(0)
            keep = labels.shape[1] - int(has.nonzero()[0]) + 1
            logits = model(**batch, use_cache=False, logits_to_keep=keep).logits
            flat.extend(metrics.answer_log_likelihood(logits, labels[:, labels.shape[1] - keep :]).tolist())
    out: list[list[float]] = [[] for _ in rows]
    for (i, _), score in zip(pairs, flat):
        out[i].append(score)
    return out


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    runner: Runner,
    rows: Sequence[dict],
    max_new_tokens: int = 12,
    batch_size: int = 8,
    progress=False,
    engine=None,
) -> list[str]:
    """Greedy answers, batched with left padding (``engine``: the same prompts decoded by that engine)."""
    gen = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": pad_token_id(tokenizer)}

    def batches():
        for start in tqdm(range(0, len(rows), batch_size), desc=f"Generating: {runner.label}", disable=not progress):
            examples = runner.examples(model, tokenizer, rows[start : start + batch_size])
            yield _batch(runner, model, tokenizer, examples, padding_side="left")

    with runner.activate(model):
        return decode_batches(model, tokenizer, batches(), gen, max_new_tokens, engine)


@torch.no_grad()
def latency(
    model, tokenizer, runner: Runner, rows: Sequence[dict], new_tokens: int = 12, engine=None
) -> tuple[Optional[float], Optional[float]]:
    """Median time to first token and end-to-end latency of single questions (batch 1), in seconds.

    Prompt building and tokenisation are included; the passages' offline work (vectors, compression) is not.
    Every method generates exactly ``new_tokens`` tokens so that end-to-end times compare like with like.
    """
    if not rows:
        return None, None
    ttft, e2e = [], []
    with runner.activate(model):
        _timed(model, tokenizer, runner, rows[0], 2, engine)  # warm-up: first-call allocations
        for row in rows:
            ttft.append(_timed(model, tokenizer, runner, row, 1, engine))
            e2e.append(_timed(model, tokenizer, runner, row, new_tokens, engine))
    return statistics.median(ttft), statistics.median(e2e)


def _timed(model, tokenizer, runner: Runner, row: dict, new_tokens: int, engine=None) -> float:
    """Seconds to answer one question with exactly ``new_tokens`` new tokens, the prompt built and tokenised inside
    the timing (the runner already active)."""
    start = time.perf_counter()
    batch = _batch(runner, model, tokenizer, runner.examples(model, tokenizer, [row]), "left")
    if engine is not None:
        engine_answers(engine, model, tokenizer, batch_prompts(model, batch), new_tokens, min_new_tokens=new_tokens)
    else:
        pad = pad_token_id(tokenizer)
        model.generate(
            **batch, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad
        )
    return time.perf_counter() - start


@torch.no_grad()
def interleaved_latency(
    timed: Sequence[tuple[Any, Runner]], tokenizer, rows: Sequence[dict], new_tokens: int = 12
) -> dict[str, dict[str, float]]:
    """Time to first token and end-to-end latency (batch 1) of several rows of the table, interleaved: question by
    question, every (model, runner) in turn, the order rotated from one question to the next, so that a machine
    that slows down or speeds up during the run moves every row alike. Each runner's passages must be indexed
    (``precompute``) and each adapter is timed as it is served (``AdapterRunner.serving``).

    Returns per runner name the median and the 25th / 75th percentiles (``ttft_s``, ``e2e_s``, ``ttft_p25_s`` ...).
    """
    rows = list(rows)
    if not rows or not timed:
        return {}
    times: dict[str, dict[str, list[float]]] = {runner.name: {"ttft": [], "e2e": []} for _, runner in timed}
    with contextlib.ExitStack() as stack:
        for model, runner in timed:
            if isinstance(runner, AdapterRunner):
                stack.enter_context(runner.serving(model))
        for model, runner in timed:  # warm-up: first-call allocations
            with runner.activate(model):
                _timed(model, tokenizer, runner, rows[0], 2)
        for i, row in enumerate(tqdm(rows, desc="Timing, interleaved")):
            for model, runner in timed[i % len(timed) :] + timed[: i % len(timed)]:
                with runner.activate(model):
                    times[runner.name]["ttft"].append(_timed(model, tokenizer, runner, row, 1))
                    times[runner.name]["e2e"].append(_timed(model, tokenizer, runner, row, new_tokens))
    out = {}
    for name, measured in times.items():
        out[name] = {"timed_examples": len(rows)}
        for key, values in measured.items():
            quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
            out[name].update(
                {f"{key}_s": statistics.median(values), f"{key}_p25_s": quartiles[0], f"{key}_p75_s": quartiles[-1]}
            )
    return out


def prompt_tokens(model, tokenizer, runner: Runner, rows: Sequence[dict]) -> float:
    with runner.activate(model):
        lengths = [len(e.input_ids) for e in runner.examples(model, tokenizer, rows)]
    return sum(lengths) / len(lengths)


def evaluate_runner(model, tokenizer, runner: Runner, rows: Sequence[dict], settings: EvalSettings) -> dict[str, Any]:
    """One row of the results table (see the module docstring for what each number means)."""
    rows = list(rows)
    if not rows:
        raise ValueError("No test rows to evaluate.")
    serving = contextlib.nullcontext()
    diagnostics = None
    shifted = wrong_passage_rows(rows) if settings.wrong_passage and runner.reads_passages else None
    if isinstance(runner, AdapterRunner):
        if settings.diagnostic_passages:
            diagnostics = content_diagnostics(model, tokenizer, runner, rows, settings.diagnostic_passages)
        runner.precompute(model, tokenizer, rows + (shifted or []))
        serving = runner.serving(model)
    with serving:
        result = _evaluate_prepared(model, tokenizer, runner, rows, settings)
        if shifted:
            control = wrong_passage_control(model, tokenizer, runner, shifted, settings)
            result["wrong_passage"] = control
            for key in ("choice_accuracy", "accuracy"):
                if control.get(key) is not None:
                    result[f"{key}_wrong_passage"] = control[key]
    if diagnostics is not None:
        result["diagnostics"] = diagnostics
    return result


def wrong_passage_rows(rows: Sequence[dict]) -> Optional[list[dict]]:
    """Each row with the NEXT row's passages (and its own question, choices and answers); None for fewer than two
    rows, where there is no other passage."""
    rows = list(rows)
    if len(rows) < 2:
        return None
    return [
        dict(r, contexts=rows[(i + 1) % len(rows)]["contexts"], id=f"{r['id']}-wrong-passage")
        for i, r in enumerate(rows)
    ]


def score_rows(model, tokenizer, runner: Runner, rows: Sequence[dict], settings: EvalSettings) -> dict[str, float]:
    """Choice accuracy where the rows list candidate answers, else generation accuracy (on the first
    ``settings.n_generate`` rows), with the counts they were measured on."""
    with_choices = [r for r in rows if len(r["choices"]) >= 2]
    if with_choices:
        scores = choice_scores(model, tokenizer, runner, with_choices, settings.batch_size)
        accuracy = metrics.choice_accuracy(scores, [r["label"] for r in with_choices])
        return {"choice_accuracy": accuracy, "n_choice": len(with_choices)}
    generated = list(rows[: settings.n_generate] if settings.n_generate else rows)
    predictions = generate_answers(model, tokenizer, runner, generated, settings.max_new_tokens, settings.batch_size)
    return {**metrics.generation_scores(predictions, [r["answers"] for r in generated]), "n_generate": len(generated)}


def wrong_passage_control(model, tokenizer, runner: Runner, shifted: Sequence[dict], settings: EvalSettings) -> dict:
    """The control of one row: the same questions read with another question's passage (``wrong_passage_rows``),
    scored by ``score_rows``. On this data the answer is always swapped away from the one the model remembers, so "not
    the remembered answer" is learnable without reading anything: a method that has learned only that scores as high
    here as with the right passage."""
    result: dict[str, Any] = {
        "method": f"{runner.name}_wrong_passage",
        "label": f"{runner.label} reading another question's passage (control)",
        "n_test": len(shifted),
        "choice_accuracy": None,
    }
    result.update(score_rows(model, tokenizer, runner, shifted, settings))
    return result


def diagnostic_passages(rows: Sequence[dict], n: int) -> list[str]:
    """The first passage of each of the first ``n`` rows with distinct first passages."""
    return list(dict.fromkeys(r["contexts"][0] for r in rows if r["contexts"]))[:n]


def content_diagnostics(model, tokenizer, runner: AdapterRunner, rows: Sequence[dict], n: int) -> Optional[dict]:
    """The method's content diagnostics (``ContextMethod.diagnostics``) on the first passage of up to ``n`` distinct
    test rows (held out from training), with the adapter as trained (before it is served merged)."""
    passages = diagnostic_passages(rows, n)
    if len(passages) < 2:
        return None
    with runner.activate(model):
        return runner.method(model).diagnostics(model, tokenizer, passages, encoder=runner.encoder)


def _evaluate_prepared(model, tokenizer, runner: Runner, rows: list[dict], settings: EvalSettings) -> dict[str, Any]:
    result: dict[str, Any] = {"method": runner.name, "label": runner.label, "n_test": len(rows)}
    with_choices = [r for r in rows if len(r["choices"]) >= 2]
    if with_choices:
        scores = choice_scores(model, tokenizer, runner, with_choices, settings.batch_size, settings.show_progress)
        result["choice_accuracy"] = metrics.choice_accuracy(scores, [r["label"] for r in with_choices])
        result["n_choice"] = len(with_choices)
    else:
        result["choice_accuracy"] = None
    gen_rows = rows[: settings.n_generate] if settings.n_generate else rows
    engine = make_engine(model, tokenizer, runner, settings)
    result["engine"] = settings.engine
    try:
        predictions = generate_answers(
            model,
            tokenizer,
            runner,
            gen_rows,
            settings.max_new_tokens,
            settings.batch_size,
            settings.show_progress,
            engine=engine,
        )
        result["ttft_s"], result["e2e_s"] = latency(
            model, tokenizer, runner, rows[: settings.timing_examples], settings.timing_new_tokens, engine=engine
        )
    finally:
        if engine is not None:
            engine.close()  # a vLLM server stops here, also when a row fails
    result.update(metrics.generation_scores(predictions, [r["answers"] for r in gen_rows]))
    result["n_generate"] = len(gen_rows)
    result["prompt_tokens"] = prompt_tokens(model, tokenizer, runner, rows)
    result["examples"] = [
        {"question": r["question"], "answer": r["answer"], "prediction": p} for r, p in zip(gen_rows[:5], predictions)
    ]
    return result


def make_engine(model, tokenizer, runner: Runner, settings: EvalSettings):
    """The engine that decodes this row (None: torch). An engine serves an adapter row on its own export (COCOM:
    merged), a text row on the base model; the export (and llama.cpp's GGUF) is written under
    ``settings.engine_dir``. The caller closes it (a vLLM engine runs a server)."""
    if settings.engine == "torch":
        return None
    if settings.engine == "vllm":
        build, options = vllm_engine, {"max_num_seqs": settings.batch_size, "dtype": settings.vllm_dtype}
    else:
        build, options = llama_cpp_engine, {"outtype": settings.gguf_type, "n_seq_max": settings.batch_size}
    with runner.activate(model):
        base = not isinstance(runner, AdapterRunner)
        return build(model, tokenizer, settings.engine_dir, runner.name, base=base, **options)


def evaluate(model, tokenizer, runners: Sequence[Runner], rows: Sequence[dict], settings: EvalSettings) -> list[dict]:
    """All rows of the table, then the speed-up of each over the text-RAG row (named ``rag``) where there is one."""
    results = []
    for runner in runners:
        start = time.perf_counter()
        results.append(evaluate_runner(model, tokenizer, runner, rows, settings))
        results[-1]["eval_seconds"] = round(time.perf_counter() - start, 1)
        if settings.show_progress:
            print(f"  {runner.label}: {_summary(results[-1])}", flush=True)
    add_speedups(results)
    return results
