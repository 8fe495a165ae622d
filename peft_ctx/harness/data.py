"""QA datasets with fixed, seeded train / validation / test splits, and text corpora for pretraining and retrieval.

Every QA row has the same columns whatever its source:

- ``id``: a stable identifier; ``question``; ``answer``: the reference answer; ``answers``: every accepted answer;
- ``contexts``: the gold passages (an empty list when the dataset has none: retrieve them, see ``metrics.retrieve``);
- ``choices`` / ``label``: candidate answers and the index of the right one (empty / -1 when there are none).

The split is drawn once from the seed over *distinct questions*, test first, so the test split never changes with the
amount of training data asked for and a question never sits in two splits. Nothing here trains on the test split;
callers take ``train`` for training, ``validation`` for choices made during development, ``test`` for the table.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from datasets import Dataset, DatasetDict, load_dataset

from . import assets

SPLITS = ("train", "validation", "test")
COLUMNS = ("id", "question", "answer", "answers", "contexts", "choices", "label")

# Offline datasets by short name: (loader, description). The BIG-bench task keeps the answer only in the passage: its
# Natural Questions contexts had the answer entity swapped for another, so the model's memory cannot answer.
CPKC = "contextual_parametric_knowledge_conflicts"
_BIGBENCH_PREFIX = "bigbench:"
ALIASES = {"cpkc": CPKC, CPKC: CPKC}
CORPORA = ("wiki",)

# BIG-bench QA inputs that carry their passage: "Question: ...\nContext: ...", "...\ncontext: ..." (disfl_qa) or the
# passage first; a marker counts at the start of the input or of a line, in any case.
_MARKER_RE = re.compile(r"(?:^|\n)[ \t]*(question|context|passage)[ \t]*:[ \t]*", re.I)


def split_passage(text: str) -> tuple[str, list[str]]:
    """An input's question and its passage (a one-element list), or the whole input and [] when it has none."""
    marks = list(_MARKER_RE.finditer(text))
    fields: dict[str, str] = {}
    for k, mark in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        kind = "context" if mark.group(1).lower() in ("context", "passage") else "question"
        fields.setdefault(kind, text[mark.end() : end].strip())
    passage = fields.get("context")
    if not passage:
        return text.strip(), []
    question = fields.get("question") or text[: marks[0].start()].strip()
    if not question:
        return text.strip(), []
    return question, [passage]


def _row(
    row_id: str,
    question: str,
    answers: list[str],
    contexts: Optional[list[str]] = None,
    choices: Optional[list[str]] = None,
    label: int = -1,
) -> dict[str, Any]:
    return {
        "id": row_id,
        "question": question,
        "answer": answers[0],
        "answers": answers,
        "contexts": list(contexts or []),
        "choices": list(choices or []),
        "label": label,
    }


def bigbench_rows(task: str = CPKC) -> list[dict[str, Any]]:
    """A BIG-bench JSON task as QA rows; an input with a ``context:`` / ``Context:`` part gives the row its gold
    passage (``split_passage``); a warning says how many inputs carry none."""
    with open(assets.bigbench_task_path(task)) as f:
        spec = json.load(f)
    rows = []
    for i, example in enumerate(spec["examples"]):
        question, contexts = split_passage(example["input"])
        scores = example.get("target_scores") or {}
        choices = list(scores)
        label = max(range(len(choices)), key=lambda j: scores[choices[j]]) if choices else -1
        targets = example.get("target")
        targets = [targets] if isinstance(targets, str) else list(targets or [])
        if not targets and choices:
            targets = [choices[label]]
        if not targets:
            raise ValueError(f"BIG-bench task {task!r}: example {i} has neither target nor target_scores.")
        if len(choices) < 2:  # one candidate ranks nothing
            choices, label = [], -1
        rows.append(_row(f"{task}-{i}", question, targets, contexts, choices, label))
    without = sum(1 for row in rows if not row["contexts"])
    if without:
        warnings.warn(
            f"BIG-bench task {task!r}: {without} of {len(rows)} inputs carry no passage (no 'context:' part); those "
            "rows have empty contexts: retrieve passages for them (the demo's / eval's --corpus).",
            stacklevel=2,
        )
    return rows


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def normalise_rows(records: Iterable[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """Rows from a user's file or a Hub dataset, whatever their column names, in the shared schema."""
    rows = []
    for i, record in enumerate(records):
        question = record.get("question", record.get("query"))
        if not isinstance(question, str) or not question.strip():
            raise ValueError(
                f"{source}: row {i} has no 'question' (or 'query') string; every row needs one, got keys "
                f"{sorted(record)}."
            )
        answers = _as_list(record.get("answers")) or _as_list(record.get("answer"))
        if isinstance(record.get("answers"), dict):  # SQuAD style {"text": [...], "answer_start": [...]}
            answers = _as_list(record["answers"].get("text"))
        answers = [a for a in answers if isinstance(a, str) and a.strip()]
        if not answers:
            raise ValueError(
                f"{source}: row {i} has no 'answer' / 'answers' text; every row needs a reference answer."
            )
        contexts = _as_list(record.get("contexts", record.get("context", record.get("passages"))))
        contexts = [c["text"] if isinstance(c, dict) else c for c in contexts]
        choices = _as_list(record.get("choices"))
        label = record.get("label", -1)
        if choices and not (isinstance(label, int) and 0 <= label < len(choices)):
            if answers[0] in choices:
                label = choices.index(answers[0])
            else:
                raise ValueError(
                    f"{source}: row {i} has choices {choices} but no valid 'label' index and its answer "
                    f"{answers[0]!r} is not among them."
                )
        row = _row(
            str(record.get("id", f"{i}")), question.strip(), answers, contexts, choices, label if choices else -1
        )
        if "split" in record:
            row["split"] = record["split"]
        rows.append(row)
    if not rows:
        raise ValueError(f"{source} holds no rows.")
    return rows


def _read_file(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    if isinstance(data, dict) and "examples" in data:  # a BIG-bench style task file
        data = data["examples"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of rows (or JSONL, one row a line).")
    return data


def split_rows(
    rows: list[dict[str, Any]],
    seed: int = 0,
    test_size: Optional[int] = None,
    validation_size: Optional[int] = None,
) -> dict[str, list[dict[str, Any]]]:
    """Seeded split over distinct questions: test first, then validation, the rest is train.

    Sizes default to 10% and 5% of the distinct questions, at most 1000 and 500. Rows that carry a ``split`` field
    keep it instead.
    """
    if any("split" in row for row in rows):
        out: dict[str, list] = {name: [] for name in SPLITS}
        for row in rows:
            split = row.pop("split", "train")
            if split == "dev":
                split = "validation"
            if split not in out:
                raise ValueError(f"Row {row['id']!r} has split={split!r}; use one of {', '.join(SPLITS)}.")
            out[split].append(row)
        return out
    questions = sorted({row["question"] for row in rows})
    random.Random(seed).shuffle(questions)
    n = len(questions)
    n_test = min(1000, max(1, n // 10)) if test_size is None else test_size
    n_val = min(500, max(1 if n >= 3 else 0, n // 20)) if validation_size is None else validation_size
    if n_test < 1 or n_val < 0 or n_test + n_val >= n:
        raise ValueError(
            f"Cannot split {n} distinct questions into test={n_test}, validation={n_val} and a non-empty train split."
        )
    where = {q: "test" for q in questions[:n_test]}
    where.update({q: "validation" for q in questions[n_test : n_test + n_val]})
    out = {name: [] for name in SPLITS}
    for row in rows:
        out[where.get(row["question"], "train")].append(row)
    return out


def load_qa(
    name_or_file: str,
    seed: int = 0,
    test_size: Optional[int] = None,
    validation_size: Optional[int] = None,
    max_context_chars: Optional[int] = None,
) -> DatasetDict:
    """A QA dataset with fixed seeded splits.

    Args:
        name_or_file: ``"cpkc"`` (BIG-bench contextual_parametric_knowledge_conflicts, offline), ``"bigbench:TASK"``,
            a JSON / JSONL file of rows (``question``, ``answer`` or ``answers``, optional ``contexts`` / ``context``,
            ``choices`` + ``label``, ``split``), or, with Hub access, a Hub dataset id with such columns.
        max_context_chars: drop rows whose passages are longer (applied after splitting, so it never moves a question
            from one split to another).
    """
    if name_or_file in ALIASES or name_or_file.startswith(_BIGBENCH_PREFIX):
        task = ALIASES.get(name_or_file) or name_or_file[len(_BIGBENCH_PREFIX) :]
        rows = bigbench_rows(task)
    elif os.path.isfile(name_or_file):
        rows = normalise_rows(_read_file(name_or_file), name_or_file)
    elif os.path.sep in name_or_file and not os.path.exists(name_or_file):
        raise ValueError(f"No such data file: {name_or_file!r}.")
    else:
        rows = _hub_rows(name_or_file)
    splits = split_rows(rows, seed=seed, test_size=test_size, validation_size=validation_size)
    if max_context_chars is not None:
        splits = {
            name: [r for r in split if sum(len(c) for c in r["contexts"]) <= max_context_chars]
            for name, split in splits.items()
        }
    return DatasetDict(
        {name: Dataset.from_list(split, features=None) if split else _empty() for name, split in splits.items()}
    )


def _empty() -> Dataset:
    return Dataset.from_dict({name: [] for name in COLUMNS})


def _hub_rows(name: str) -> list[dict[str, Any]]:

    try:
        loaded = load_dataset(name)
    except Exception as exc:
        raise ValueError(
            f"{name!r} is not a known offline dataset ({', '.join(sorted(ALIASES))}, bigbench:TASK), not a file, "
            f"and could not be loaded from the Hugging Face Hub: {exc}"
        ) from exc
    rows = []
    for split_name, split in loaded.items():
        split_name = {"dev": "validation"}.get(split_name, split_name)
        records = normalise_rows(split, f"{name}[{split_name}]")
        if split_name in SPLITS and len(loaded) > 1:
            for record in records:
                record["split"] = split_name
        rows.extend(records)
    return rows


def load_corpus(name_or_file: str = "wiki", max_chars: Optional[int] = None) -> list[str]:
    """Passages for stage-1 pretraining or retrieval: ``"wiki"`` (10,033 Wikipedia lead paragraphs, offline), a
    text file (one passage a line), or a JSON / JSONL file of strings or rows with a ``text`` / ``extract`` field."""
    if name_or_file == "wiki":
        texts = assets.wiki_passages()
    elif os.path.isfile(name_or_file):
        if name_or_file.endswith((".json", ".jsonl")):
            records = _read_file(name_or_file)
            texts = [r if isinstance(r, str) else r.get("text", r.get("extract")) for r in records]
        else:
            with open(name_or_file) as f:
                texts = f.read().splitlines()
    else:
        raise ValueError(f"Unknown corpus {name_or_file!r}: use 'wiki' or a file of passages.")
    texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if max_chars is not None:
        texts = [t for t in texts if len(t) <= max_chars]
    if not texts:
        raise ValueError(f"Corpus {name_or_file!r} holds no passages.")
    return texts


def pretraining_passages(
    corpus: Sequence[str], train_rows: Sequence[dict], held_out_rows: Sequence[dict], seed: int = 0
) -> list[str]:
    """Unlabelled passages for pretraining stages: the corpus and the training questions' passages, shuffled together
    (seeded), without any passage a held-out (validation or test) question reads, nor one that shares its opening.

    A QA set's own passages teach the compressor the text it will see; the held-out ones must stay unseen, and a
    passage that differs from a held-out one only in its substituted answer (CPKC) counts as the same passage.
    """

    def opening(text: str) -> str:
        return " ".join(text.split()[:12]).lower()

    held_out = {opening(c) for row in held_out_rows for c in row["contexts"]}
    own = dict.fromkeys(c for row in train_rows for c in row["contexts"] if opening(c) not in held_out)
    mixed = [t for t in dict.fromkeys([*corpus, *own]) if opening(t) not in held_out]
    random.Random(seed).shuffle(mixed)
    return mixed
