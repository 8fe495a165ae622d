"""QA metrics: normalised exact match, token F1, answer-contained accuracy, choice accuracy, retrieval top-k.

Text metrics follow the SQuAD normalisation (lower case, no punctuation, no articles, single spaces); each takes the
best score over a question's accepted answers.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from ..prompting import IGNORE_INDEX

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalise(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _answers(answers) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    answers = list(answers)
    if not answers:
        raise ValueError("Give at least one reference answer.")
    return answers


def first_line(prediction: str) -> str:
    """The answer a chat model gives before any explanation on a later line."""
    for line in prediction.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(prediction: str, answers) -> float:
    pred = normalise(prediction)
    return float(any(pred == normalise(a) for a in _answers(answers)))


def token_f1(prediction: str, answers) -> float:
    pred_tokens = normalise(prediction).split()
    best = 0.0
    for answer in _answers(answers):
        gold_tokens = normalise(answer).split()
        common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
        overlap = sum(common.values())
        if not pred_tokens or not gold_tokens:
            score = float(pred_tokens == gold_tokens)
        elif overlap == 0:
            score = 0.0
        else:
            precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
            score = 2 * precision * recall / (precision + recall)
        best = max(best, score)
    return best


def answer_contained(prediction: str, answers) -> float:
    """1 when a normalised reference answer occurs in the normalised prediction, on word boundaries."""
    pred = f" {normalise(prediction)} "
    return float(any(normalise(a) and f" {normalise(a)} " in pred for a in _answers(answers)))


def generation_scores(predictions: Sequence[str], references: Sequence) -> dict[str, float]:
    """Mean accuracy (answer contained), EM and F1 in [0, 1]; EM and F1 read the prediction's first line."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    if not predictions:
        raise ValueError("No predictions to score.")
    n = len(predictions)
    return {
        "accuracy": sum(answer_contained(p, r) for p, r in zip(predictions, references)) / n,
        "em": sum(exact_match(first_line(p), r) for p, r in zip(predictions, references)) / n,
        "f1": sum(token_f1(first_line(p), r) for p, r in zip(predictions, references)) / n,
    }


# ---- choice accuracy ---------------------------------------------------------------------------------------------
def answer_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, skip_last: bool = True) -> torch.Tensor:
    """Mean log-probability per answer token of each row.  # [batch]

    ``logits`` [batch, seq, vocab] and ``labels`` [batch, seq] (IGNORE_INDEX outside the answer) as a causal LM
    sees them (labels not yet shifted). ``skip_last`` leaves out each row's last labelled token, the end-of-turn
    token peft_ctx appends to answers, so candidates are compared on their own text.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]  # position t predicts token t + 1
    keep = labels != IGNORE_INDEX  # [batch, seq - 1]
    if skip_last:
        last = keep.long().cumsum(-1) == keep.long().sum(-1, keepdim=True)
        keep = keep & ~last
    log_probs = F.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    counts = keep.sum(-1)
    if (counts == 0).any():
        raise ValueError("A candidate answer has no tokens to score; candidates must be non-empty text.")
    return (log_probs * keep).sum(-1) / counts


def choice_accuracy(scores: Sequence[Sequence[float]], labels: Sequence[int]) -> float:
    """Share of questions whose right candidate has the highest score (ties count as wrong)."""
    if len(scores) != len(labels) or not scores:
        raise ValueError(
            f"Need one score list per label and at least one question, got {len(scores)} / {len(labels)}."
        )
    right = 0
    for row, label in zip(scores, labels):
        if not 0 <= label < len(row):
            raise ValueError(f"label {label} is out of range for {len(row)} candidates.")
        best = max(row)
        right += int(row[label] == best and sum(s == best for s in row) == 1)
    return right / len(labels)


# ---- retrieval ---------------------------------------------------------------------------------------------------
def retrieve(
    query_vectors: torch.Tensor, corpus_vectors: torch.Tensor, k: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k corpus rows for each query by cosine similarity.  # ([n_queries, k] indices, [n_queries, k] scores)"""
    if query_vectors.dim() != 2 or corpus_vectors.dim() != 2 or query_vectors.shape[1] != corpus_vectors.shape[1]:
        raise ValueError(
            f"Query vectors {tuple(query_vectors.shape)} and corpus vectors {tuple(corpus_vectors.shape)} must be "
            "[n, d] with the same d (encode both with the same encoder)."
        )
    if not 1 <= k <= corpus_vectors.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the corpus size {corpus_vectors.shape[0]}.")
    similarity = F.normalize(query_vectors.float(), dim=-1) @ F.normalize(corpus_vectors.float(), dim=-1).T
    scores, indices = similarity.topk(k, dim=-1)
    return indices, scores


def retrieval_hit_rate(
    retrieved: Sequence[Sequence[str]], answers: Sequence, gold: Optional[Sequence] = None
) -> float:
    """Share of questions whose top-k passages contain a reference answer (or, given ``gold`` passage ids per
    question, include one of them)."""
    if not retrieved:
        raise ValueError("No retrieval results to score.")
    hits = 0
    for i, passages in enumerate(retrieved):
        if gold is not None:
            hits += int(bool(set(passages) & set(_answers(gold[i]))))
        else:
            text = " ".join(normalise(p) for p in passages)
            hits += int(any(normalise(a) and f" {normalise(a)} " in f" {text} " for a in _answers(answers[i])))
    return hits / len(retrieved)
