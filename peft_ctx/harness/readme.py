"""The README's results table, written from a demo run's ``results.json`` rather than by hand.

The README holds the table between two markers; this module renders it from the results file and replaces what is
between them. ``make reproduce`` does it at the end of its run (``python -m peft_ctx.harness.demo --readme
README.md``), and ``tests/test_readme.py`` checks that the committed README holds exactly what the committed results
render to.

Example::

    python -m peft_ctx.harness.readme --results benchmarks/results/demo.json --readme README.md
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

from .report import markdown_table

START = "<!-- results: written by python -m peft_ctx.harness.readme from the file named below; do not edit -->"
END = "<!-- /results -->"
WRONG_PASSAGE = "_wrong_passage"


def rows_with_controls(results: dict) -> list[dict]:
    """The run's rows, each with its wrong-passage control's choice accuracy beside it (runs that listed controls
    as rows of their own, ``<method>_wrong_passage``, are read too)."""
    controls = {
        c["method"].removesuffix(WRONG_PASSAGE): c.get("choice_accuracy")
        for c in results.get("controls", [])
        if c["method"].endswith(WRONG_PASSAGE)
    }
    rows = []
    for row in results["rows"]:
        if row.get("choice_accuracy_wrong_passage") is None and row["method"] in controls:
            row = {**row, "choice_accuracy_wrong_passage": controls[row["method"]]}
        rows.append(row)
    return rows


def results_section(results: dict, source: str) -> str:
    """The README's block: what the run was (file, profile, questions, task, machine, versions) and its table."""
    first = results["rows"][0]
    machine, versions = results.get("machine", {}), results.get("versions", {})
    wall = results.get("wall_time_s")
    caption = (
        f"From `{source}` (`--profile {results['profile']}`): {first.get('n_test', '?')} held-out test questions of "
        f"{results.get('task', 'the QA task')}; {machine.get('cpu_count', '?')} CPUs "
        f"({machine.get('processor') or machine.get('platform', 'unknown')}), torch {versions.get('torch', '?')}"
        + (f", {wall / 60:.0f} min in all." if wall else ".")
    )
    return "\n".join([START, caption, "", markdown_table(rows_with_controls(results)), END])


def replace_section(text: str, section: str, path: str = "the README") -> str:
    """``text`` with the block between the markers replaced by ``section`` (which carries the markers)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(
            f"{path} has no results block: put the lines {START!r} and {END!r} where the table goes, then run this "
            "again."
        )
    return text[:start] + section + text[end + len(END) :]


def update_readme(readme: str, results_path: str, source: Optional[str] = None) -> bool:
    """Rewrite ``readme``'s results block from ``results_path`` (named in the README as ``source``, by default its
    path relative to the README's folder); returns whether the file changed."""
    with open(results_path) as f:
        results = json.load(f)
    source = source or os.path.relpath(results_path, os.path.dirname(os.path.abspath(readme)))
    with open(readme) as f:
        text = f.read()
    new = replace_section(text, results_section(results, source), readme)
    if new == text:
        return False
    with open(f"{readme}.tmp", "w") as f:
        f.write(new)
    os.replace(f"{readme}.tmp", readme)
    return True


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_ctx.harness.readme", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join("benchmarks", "results", "demo.json"))
    parser.add_argument("--readme", default="README.md")
    args = parser.parse_args(argv)
    changed = update_readme(args.readme, args.results)
    print(f"{args.readme}: results block {'rewritten' if changed else 'already up to date'} from {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
