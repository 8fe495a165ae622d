"""Evaluation records for a card: checked, grouped into its evaluation table, and as the model-index metadata."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

from huggingface_hub import EvalResult

if TYPE_CHECKING:
    pass

from .common import SETTINGS

logger = logging.getLogger(__name__)


# ---- evaluation results ---------------------------------------------------------------------------------------------


def _check_eval_results(eval_results: Any) -> list[dict]:
    """Validate the evaluation records: a list of dicts, one per (dataset, setting).

    Each record: ``dataset`` (display name), ``setting`` (one of ``no_retrieval``, ``text_rag``, ``adapter``),
    ``metric`` (e.g. "accuracy"), ``score`` (a number); optional ``prompt_tokens`` (mean per example), ``seconds``
    (mean wall time per example), ``dataset_id`` (Hub dataset id, for the model-index), ``split``, ``n``, ``task``.
    """
    if eval_results is None:
        return []
    if isinstance(eval_results, Mapping) or not isinstance(eval_results, (list, tuple)):
        raise ValueError(
            "eval_results must be a list of records like {'dataset': 'NQ', 'setting': 'adapter', 'metric': "
            f"'accuracy', 'score': 0.41, 'prompt_tokens': 52.0, 'seconds': 0.08}}, got {type(eval_results).__name__}."
        )
    records = []
    for i, record in enumerate(eval_results):
        if not isinstance(record, Mapping):
            raise ValueError(f"eval_results[{i}] must be a dict, got {type(record).__name__}.")
        for key in ("dataset", "setting", "metric", "score"):
            if key not in record:
                raise ValueError(
                    f"eval_results[{i}] has no {key!r}; each record needs dataset, setting, metric, score."
                )
        if record["setting"] not in SETTINGS:
            raise ValueError(f"eval_results[{i}]['setting']={record['setting']!r}; use one of {', '.join(SETTINGS)}.")
        for key in ("score", "prompt_tokens", "seconds"):
            value = record.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"eval_results[{i}][{key!r}]={value!r} must be a number.")
        records.append(dict(record))
    return records


def _evaluation(records: list[dict], method_title: str) -> tuple[list[dict], Optional[dict]]:
    """Table groups for the card and the measured context compression (when all three settings report tokens)."""
    groups: dict[tuple, dict] = {}
    for record in records:
        key = (record["dataset"], record.get("split"), record["metric"])
        group = groups.setdefault(
            key,
            {
                "dataset": record["dataset"],
                "split": record.get("split"),
                "metric": record["metric"],
                "n": None,
                "by": {},
            },
        )
        group["n"] = group["n"] or record.get("n")
        group["by"][record["setting"]] = record
    labels = {"no_retrieval": "No retrieval", "text_rag": "Text RAG (documents as text)", "adapter": f"{method_title}"}
    out, measured = [], None
    for group in groups.values():
        by = group.pop("by")
        text = by.get("text_rag", {})
        rows = []
        for setting in SETTINGS:
            if setting not in by:
                continue
            row = by[setting]
            speedup = "-"
            if setting != "text_rag" and text.get("seconds") and row.get("seconds"):
                speedup = f"{text['seconds'] / row['seconds']:.2f}x"
            elif setting == "text_rag" and row.get("seconds"):
                speedup = "1.00x"
            tokens = row.get("prompt_tokens")
            rows.append(
                {
                    "label": labels[setting] + (" (this adapter)" if setting == "adapter" else ""),
                    "score_text": f"{row['score']:.4g}",
                    "prompt_tokens_text": f"{tokens:.1f}" if tokens is not None else "-",
                    "speedup_text": speedup,
                }
            )
        group["rows"] = rows
        out.append(group)
        none, adapter = by.get("no_retrieval", {}), by.get("adapter", {})
        if measured is None and all(r.get("prompt_tokens") is not None for r in (none, text, adapter)):
            text_tokens = text["prompt_tokens"] - none["prompt_tokens"]
            adapter_tokens = adapter["prompt_tokens"] - none["prompt_tokens"]
            if text_tokens > 0 and adapter_tokens > 0:
                measured = {
                    "text_tokens": text_tokens,
                    "adapter_tokens": adapter_tokens,
                    "ratio": text_tokens / adapter_tokens,
                }
    return out, measured


def _model_index(records: list[dict]) -> list[EvalResult]:
    results = []
    for record in records:
        if record["setting"] != "adapter":
            continue
        results.append(
            EvalResult(
                task_type=record.get("task", "question-answering"),
                dataset_type=record.get("dataset_id") or re.sub(r"[^A-Za-z0-9._-]+", "-", record["dataset"]).lower(),
                dataset_name=record["dataset"],
                dataset_split=record.get("split"),
                metric_type=record["metric"],
                metric_value=record["score"],
                metric_name=record["metric"],
            )
        )
    return results
