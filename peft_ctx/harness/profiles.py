"""The demo's profiles (``demo`` / ``reproduce``): what each trains and measures, ``--set`` overrides, threads."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from ..training import StageSettings
from .rows import demo_entries


# ---- profiles ----------------------------------------------------------------------------------------------------
@dataclass
class Profile:
    """How much data and training each run gets. Test questions are always the first ``n_test`` of the test split.

    ``stages`` holds every demo entry's training (entry name -> stage name -> ``StageSettings``), read from the
    methods' own demo rows (``Entry.stages[profile name]``, ``peft_ctx.harness.rows``) unless given.
    """

    name: str
    n_test: int
    n_generate: int
    timing_examples: int
    max_context_chars: int
    controls: bool = True  # also score every row that reads passages on another question's passage
    diagnostic_passages: int = 16  # held-out test passages for the content diagnostics (ContextMethod.diagnostics)
    # Learning curves (peft_ctx.harness.curves): each entry probed at these numbers of training examples seen (and
    # untrained, and at the end of every stage) on the first curve_questions validation questions and curve_passages
    # validation passages; none: no curve.
    curve_points: list = field(default_factory=list)
    curve_questions: int = 50
    curve_passages: int = 8
    seed: int = 0
    stages: dict[str, dict[str, StageSettings]] = field(default_factory=dict)

    def __post_init__(self):
        if not self.stages:
            self.stages = {
                entry.name: {
                    stage: StageSettings(**values) for stage, values in entry.stages.get(self.name, {}).items()
                }
                for _, entry in demo_entries()
            }


def profiles() -> dict[str, Profile]:
    """The two profiles, built from the methods registered now (a method registered later is in the next call's)."""
    return {
        "demo": Profile(name="demo", n_test=50, n_generate=50, timing_examples=6, max_context_chars=1000),
        "reproduce": Profile(
            name="reproduce",
            n_test=200,  # issue 15's targets are measured on 200 held-out test questions
            n_generate=200,
            timing_examples=20,
            max_context_chars=1000,
            curve_points=[64, 256, 1024, 4096, 16384],
        ),
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
    """A copy of ``profile`` with ``FIELD=VALUE`` (a Profile field) / ``ENTRY.STAGE.FIELD=VALUE`` (a StageSettings
    field of one entry's stage) changes; values are JSON or plain text."""
    stages = {
        name: {stage: dataclasses.replace(s) for stage, s in table.items()} for name, table in profile.stages.items()
    }
    profile = dataclasses.replace(profile, stages=stages)
    scalars = {f.name for f in dataclasses.fields(profile) if f.name != "stages"}
    settings_fields = {f.name for f in dataclasses.fields(StageSettings)}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        path = key.split(".")
        if sep and len(path) == 1 and key in scalars:
            setattr(profile, key, value)
            continue
        if sep and len(path) == 3 and path[1] in stages.get(path[0], {}) and path[2] in settings_fields:
            setattr(stages[path[0]][path[1]], path[2], value)
            continue
        known = ", ".join(f"{name}.{stage}" for name, table in stages.items() for stage in table)
        raise ValueError(
            f"--set {assignment!r}: write FIELD=VALUE with a Profile field ({', '.join(sorted(scalars))}) or "
            f"ENTRY.STAGE.FIELD=VALUE with ENTRY.STAGE one of {known} and FIELD a StageSettings field "
            "(e.g. xrag.instruct.steps=200)."
        )
    return profile
