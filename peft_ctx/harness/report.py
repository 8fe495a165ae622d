"""An evaluation's results as people compare them: speed-ups, the markdown table, JSON rows, the environment, plots."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any

import peft
import torch
import transformers
import trl

from ..version import __version__
from . import metrics

TABLE_COLUMNS = (
    ("method", "method"),
    ("choice acc", "choice_accuracy"),
    ("choice acc, wrong passage", "choice_accuracy_wrong_passage"),
    ("accuracy", "accuracy"),
    ("EM", "em"),
    ("F1", "f1"),
    ("prompt tokens", "prompt_tokens"),
    ("TTFT (s)", "ttft_s"),
    ("e2e latency (s)", "e2e_s"),
    ("e2e p25-p75 (s)", "e2e_spread"),
    ("speed-up vs RAG", "speedup_vs_rag"),
)


def add_speedups(results: list[dict]) -> None:
    rag = next((r for r in results if r["method"] == "rag"), None)
    for r in results:
        r["speedup_vs_rag"] = (rag["e2e_s"] / r["e2e_s"]) if rag and rag.get("e2e_s") and r.get("e2e_s") else None


def _summary(result: dict) -> str:
    parts = []
    for title, key in TABLE_COLUMNS[1:7]:
        parts.append(f"{title} {_fmt(key, result.get(key))}")
    return ", ".join(parts)


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("choice_accuracy", "choice_accuracy_wrong_passage", "accuracy", "em", "f1"):
        return f"{100 * value:.1f}%"
    if key == "prompt_tokens":
        return f"{value:.1f}"
    if key in ("ttft_s", "e2e_s"):
        return f"{value:.3f}"
    if key == "speedup_vs_rag":
        return f"{value:.2f}x"
    return str(value)


def markdown_table(results: Sequence[dict]) -> str:
    lines = [
        "| " + " | ".join(title for title, _ in TABLE_COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)) + "|",
    ]
    for r in results:
        if r.get("e2e_p25_s") is not None:
            r = {**r, "e2e_spread": f"{r['e2e_p25_s']:.3f}-{r['e2e_p75_s']:.3f}"}
        cells = [r.get("label", r["method"])] + [_fmt(key, r.get(key)) for _, key in TABLE_COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


JSON_KEYS = ("method", "choice_accuracy", "accuracy", "em", "f1", "prompt_tokens", "ttft_s", "e2e_s", "n_test")


def json_rows(results: Sequence[dict]) -> list[dict]:
    """The committed rows: the fixed keys first, then the rest (label, speed-up, counts, sample answers)."""
    out = []
    for r in results:
        row = {key: _round(r.get(key)) for key in JSON_KEYS}
        row.update({k: _round(v) for k, v in r.items() if k not in row})
        out.append(row)
    return out


def _round(value):
    return round(value, 4) if isinstance(value, float) else value


def environment() -> dict[str, Any]:
    """The machine and the versions a result was measured with."""
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "trl": trl.__version__,
            "peft_ctx": __version__,
        },
    }


def plot(results: Sequence[dict], path: str, title: str = "") -> str:
    """Accuracy (choice and generation) against mean prompt tokens, one point per method, as a PNG."""
    import matplotlib  # the [demo] extra: only plotting needs it, and the harness runs without it otherwise

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    colours = plt.get_cmap("tab10")
    # One colour per method, one marker per metric: labels next to points overlap when methods share a prompt length.
    for i, r in enumerate(results):
        label = r.get("label", r["method"])
        for key, marker in (("choice_accuracy", "o"), ("accuracy", "s")):
            if r.get(key) is not None:
                ax.scatter(
                    r["prompt_tokens"],
                    100 * r[key],
                    marker=marker,
                    s=60,
                    color=colours(i % 10),
                    label=label if key == "choice_accuracy" else None,
                    edgecolors="black",
                    linewidths=0.5,
                )
    ax.scatter([], [], marker="o", color="white", edgecolors="black", label="choice accuracy")
    ax.scatter([], [], marker="s", color="white", edgecolors="black", label="generation accuracy")
    ax.set_xlabel("prompt tokens (mean per question)")
    ax.set_ylabel("accuracy on the test split (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def add_retrieved_passages(rows: list[dict], encoder, corpus: Sequence[str], k: int = 1) -> float:
    """Give rows without passages the encoder's top-k corpus passages (in place); returns the answer hit rate@k."""
    missing = [r for r in rows if not r["contexts"]]
    if not missing:
        return float("nan")
    corpus_vectors = encoder.encode(list(corpus))
    query_vectors = encoder.encode([r["question"] for r in missing], show_progress=False)
    indices, _ = metrics.retrieve(query_vectors, corpus_vectors, k=k)
    for row, idx in zip(missing, indices.tolist()):
        row["contexts"] = [corpus[i] for i in idx]
    return metrics.retrieval_hit_rate([r["contexts"] for r in missing], [r["answers"] for r in missing])
