"""Answer scores of a batch: the answer span's logits, per-row NLL, mean scores over batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..prompting import IGNORE_INDEX


def answer_logits(model, inputs: dict, labels: torch.Tensor, answer_span_only: bool = True):
    """The model's outputs on ``inputs`` and the logits that predict each answer token (``labels`` not
    ``IGNORE_INDEX``), with those tokens; ``answer_span_only`` computes the vocabulary projection from the first
    answer position on.  # outputs, [n_answer_tokens, vocab], [n_answer_tokens]"""
    kwargs = {"logits_to_keep": labels.shape[1] - _first_label(labels) + 1} if answer_span_only else {}
    outputs = model(**inputs, use_cache=False, **kwargs)
    logits = outputs.logits[:, :-1]  # predicts the label after each kept position
    targets = labels[:, labels.shape[1] - logits.shape[1] :]
    mask = targets != IGNORE_INDEX
    return outputs, logits[mask].float(), targets[mask]


def row_mean_nll(logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean answer-token NLL from ``answer_logits``' flat outputs (answer tokens row by row).  # [B]"""
    # [n_answer_tokens]: row-major, as answer_logits keeps them (a label in column 0 is never predicted)
    owner = (labels[:, 1:] != IGNORE_INDEX).nonzero()[:, 0]
    if owner.numel() != targets.numel():
        raise ValueError(f"{targets.numel()} answer logits for {owner.numel()} labelled positions; pass their labels.")
    nll = F.cross_entropy(logits, targets, reduction="none")  # [n_answer_tokens]
    zeros = nll.new_zeros(labels.shape[0])
    return zeros.index_add(0, owner, nll) / zeros.index_add(0, owner, torch.ones_like(nll)).clamp_min(1)


def mean_answer_scores(model, batches) -> dict[str, float]:
    """``answer_scores`` averaged over batches (each batch counts once), what the content diagnostics report."""
    scores = [answer_scores(model, batch) for batch in batches]
    if not scores:
        raise ValueError("No batches to score; the content diagnostics need two or more passages.")
    return {name: sum(s[name] for s in scores) / len(scores) for name in scores[0]}


def check_diagnostic_passages(passages) -> None:
    if len(passages) < 2:
        raise ValueError(
            f"The diagnostics need two or more passages (each is another's control), got {len(passages)}."
        )


@torch.no_grad()
def answer_scores(model, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean NLL (nats per answer token) and greedy token accuracy of a labelled batch (``labels`` in ``batch``),
    what the content diagnostics report."""
    inputs = dict(batch)
    labels = inputs.pop("labels")
    _, logits, targets = answer_logits(model, inputs, labels)
    nll = F.cross_entropy(logits, targets).item()
    return {"nll": nll, "token_accuracy": (logits.argmax(-1) == targets).float().mean().item()}


def _first_label(labels: torch.Tensor) -> int:
    """The first sequence position holding an answer label in any row of a left-padded batch."""
    has = (labels != IGNORE_INDEX).any(0)
    if not has.any():
        raise ValueError("The batch has no answer tokens to train on.")
    return int(has.nonzero()[0])
