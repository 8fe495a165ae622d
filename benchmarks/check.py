"""Regression check: compare a new benchmark run with the committed baseline by speed-up ratios, not seconds.

    python -m benchmarks.check NEW.json [--baseline benchmarks/results/bench.json] [--tolerance 0.25]

Absolute times move with the machine and its load; ratios measured in one process (each method against text RAG)
hold. A row regresses when one of its ratios falls below (1 - tolerance) x the baseline's. Rows of the baseline
missing from the new run fail too, unless ``--allow-missing``. Exit status 0: no regression; 1: regression.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

BASELINE = os.path.join(os.path.dirname(__file__), "results", "bench.json")
RATIOS = ("ttft_speedup_vs_rag", "e2e_speedup_vs_rag")


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"Cannot read benchmark results from {path}: {exc}") from exc
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
        raise SystemExit(f"{path} is not a benchmarks.run result (no 'rows' list).")
    return result


def compare(new: dict, baseline: dict, tolerance: float, fields=RATIOS, allow_missing: bool = False) -> list[str]:
    """Human-readable regressions; empty when there are none."""
    key = lambda r: (r["method"], r["docs"], r["batch"], r.get("engine", "torch"))  # noqa: E731
    fresh = {key(r): r for r in new["rows"]}
    problems = []
    for old in baseline["rows"]:
        row = fresh.get(key(old))
        name = f"{old['method']} ({old['docs']} docs, batch {old['batch']}, {old.get('engine', 'torch')})"
        if row is None:
            if not allow_missing:
                problems.append(f"{name}: missing from the new run")
            continue
        for field in fields:
            if old.get(field) is None or row.get(field) is None:
                continue
            floor = (1 - tolerance) * old[field]
            if row[field] < floor:
                problems.append(
                    f"{name}: {field} {row[field]:.2f}x < {floor:.2f}x ({old[field]:.2f}x in the baseline)"
                )
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("new", help="bench.json of the new run")
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument(
        "--tolerance", type=float, default=0.25, help="Allowed relative drop of a ratio (0.25 = 25%%)."
    )
    parser.add_argument("--fields", nargs="+", default=list(RATIOS), help="Ratio fields to compare.")
    parser.add_argument("--allow-missing", action="store_true", help="Rows missing from the new run are no failure.")
    args = parser.parse_args(argv)
    if not 0 <= args.tolerance < 1:
        raise SystemExit(f"--tolerance={args.tolerance}; give a fraction in [0, 1), e.g. 0.25.")
    new, baseline = _load(args.new), _load(args.baseline)
    for name in ("model", "weights", "new_tokens", "doc_tokens"):
        a, b = new.get("settings", {}).get(name), baseline.get("settings", {}).get(name)
        if a != b:
            print(f"note: {name} differs ({a!r} now, {b!r} in the baseline); ratios may not be comparable.")
    problems = compare(new, baseline, args.tolerance, args.fields, args.allow_missing)
    if problems:
        print(f"Benchmark regression against {args.baseline} (tolerance {args.tolerance:.0%}):")
        for line in problems:
            print(f"  - {line}")
        return 1
    print(f"No regression against {args.baseline}: {len(baseline['rows'])} rows, tolerance {args.tolerance:.0%}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
