"""Learning curves: an adapter probed on a fixed held-out sample at chosen numbers of training examples seen.

The demo's ``reproduce`` profile hands a ``LearningCurve`` to every entry's recipe (``ContextMethod.train``'s
``callbacks``); at each point it scores choice accuracy with the right and with another question's passage on the
validation questions, and the method's content diagnostics on validation passages. Neither is ever trained on, and
neither is the test split, so the curve can say whether more training would help without touching the test table.

Example::

    curve = LearningCurve(probe, points=[256, 1024], path="work/xrag/learning_curve.json", model=model)
    curve.measure("start", 0)  # before the first step
    train_method(method, model, tokenizer, data, stages, work_dir, callbacks=[curve])
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from . import eval as harness


class LearningCurve(TrainerCallback):
    """Calls ``probe(model)`` (a dict of numbers) each time the examples seen over all of a recipe's stages pass one of
    ``points``, and at the end of every stage; each record (stage, step, examples seen, the probe's numbers) is
    appended to ``path`` as it is measured. A resumed run reads ``path`` back and keeps the records up to where its
    training resumes (a stage restarted from its last checkpoint, or from scratch, measures the rest again)."""

    def __init__(self, probe: Callable[[Any], dict], points: Sequence[int], path: str, model):
        if any(int(p) <= 0 for p in points):
            raise ValueError(f"Learning-curve points must be positive numbers of examples, got {list(points)}.")
        self.probe = probe
        self.all_points = sorted({int(p) for p in points})
        self.points = list(self.all_points)
        self.path = path
        self.model = model
        self.records: list[dict] = []
        if os.path.exists(path):
            with open(path) as f:
                self.records = json.load(f)["records"]
        self.offset = 0  # examples seen in the stages that ended before this one
        self.batch = 1
        self.stage = ""

    def measure(self, stage: str, examples: int, step: int = 0) -> Optional[dict]:
        if any(r["examples"] == examples for r in self.records):
            return None  # e.g. a point reached on a stage's last step
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                values = self.probe(self.model)
        finally:
            self.model.train(training)
        record = {"stage": stage, "step": step, "examples": examples, **values}
        self.records.append(record)
        self.records.sort(key=lambda r: r["examples"])
        self._write()
        shown = ", ".join(f"{k} {v:.3f}" for k, v in values.items() if isinstance(v, float))
        print(f"learning curve: {stage} step {step}, {examples} examples: {shown}", flush=True)
        return record

    def _write(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(f"{self.path}.tmp", "w") as f:
            json.dump({"records": self.records}, f, indent=2)
        os.replace(f"{self.path}.tmp", self.path)

    def on_train_begin(self, args, state, control, **kwargs):
        self.stage = args.run_name or "stage"
        self.batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        # The trainer has loaded its checkpoint's state by now: records past it belong to training that was lost.
        resumed = self.offset + state.global_step * self.batch
        if any(r["examples"] > resumed for r in self.records):
            self.records = [r for r in self.records if r["examples"] <= resumed]
            self._write()
        self.points = [p for p in self.all_points if p > resumed]

    def on_step_end(self, args, state, control, **kwargs):
        seen = self.offset + state.global_step * self.batch
        if self.points and self.points[0] <= seen:
            # Measured once at the step that passed the point(s), under the number of examples actually seen.
            self.points = [p for p in self.points if p > seen]
            self.measure(self.stage, seen, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.offset += state.global_step * self.batch
        self.measure(self.stage, self.offset, state.global_step)


def probe(
    tokenizer,
    runner_factory: Callable[[Any], harness.AdapterRunner],
    questions: Sequence[dict],
    n_passages: int,
    batch_size: int = 8,
) -> Callable[[Any], dict]:
    """The demo's probe: choice accuracy (generation accuracy on data without candidates) on ``questions`` with their
    own and with another question's passage, and the method's content diagnostics on the first ``n_passages``
    distinct passages of ``questions`` (``harness.content_diagnostics``). A fresh runner
    each time: what it indexes (xRAG vectors, COCOM's compressed passages) depends on the weights."""
    questions = list(questions)
    shifted = harness.wrong_passage_rows(questions)
    settings = harness.EvalSettings(n_test=len(questions), batch_size=batch_size, show_progress=False)

    def run(model) -> dict:
        runner = runner_factory(model)
        runner.precompute(model, tokenizer, questions + (shifted or []))
        out: dict[str, float] = {}
        for suffix, rows in (("", questions), ("_wrong_passage", shifted)):
            if rows:
                scores = harness.score_rows(model, tokenizer, runner, rows, settings)
                out.update({f"{key}{suffix}": value for key, value in scores.items()})
        out.update(harness.content_diagnostics(model, tokenizer, runner, questions, n_passages) or {})
        return out

    return run


# What the plot draws, where present: (key, label, panel); each drawn beside its control, dashed.
PLOTTED = (
    ("choice_accuracy", "choice accuracy", 0),
    ("accuracy", "generation accuracy", 0),
    ("paraphrase_nll", "xRAG paraphrase NLL", 1),
    ("autoencode_token_accuracy", "COCOM auto-encoding token accuracy", 1),
)


def plot(curves: dict[str, list[dict]], path: str, title: str = "") -> str:
    """One line per entry and measure against training examples seen (log scale; the untrained adapter at 0), the
    right passage solid and another question's passage dashed, as a PNG."""
    import matplotlib  # the [demo] extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, records) in enumerate(sorted(curves.items())):
        colour = colours[i % len(colours)]
        for key, label, panel in PLOTTED:
            points = [(r["examples"], r[key], r.get(f"{key}_wrong_passage")) for r in records if key in r]
            if not points:
                continue
            x = [p[0] for p in points]
            axes[panel].plot(x, [p[1] for p in points], "-o", color=colour, label=f"{name}: {label}", markersize=3)
            if all(p[2] is not None for p in points):
                axes[panel].plot(x, [p[2] for p in points], "--", color=colour, alpha=0.6)
    for ax, ylabel in zip(axes, ("accuracy on held-out questions", "diagnostic on held-out passages")):
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("training examples seen (0 = untrained)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle((title + "\n" if title else "") + "solid: the question's own passage; dashed: another question's")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def entry_curve(model, method, entry, ctx, work_dir: str) -> Optional[LearningCurve]:
    """The demo's curve of one entry (``ctx``: the demo's ``DemoContext``): a LearningCurve on the validation questions
    and passages (None when the profile asks for no curve or the data has no validation split), measured once
    untrained."""
    if not (ctx.profile.curve_points and ctx.validation_rows):
        if ctx.profile.curve_points:
            print("no learning curve: the data has no validation split", flush=True)
        return None
    measure = probe(
        ctx.tokenizer,
        lambda m: harness.AdapterRunner(
            name=entry.name,
            label=entry.label,
            adapter_name=m.active_adapter,
            encoder=ctx.encoder if method.uses_encoder else None,
            options=dict(entry.options),
            serve=False,
        ),
        ctx.validation_rows,
        ctx.profile.curve_passages,
    )
    curve = LearningCurve(measure, ctx.profile.curve_points, os.path.join(work_dir, "learning_curve.json"), model)
    curve.measure("untrained", 0)
    return curve
