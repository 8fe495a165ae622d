"""The wrong-passage margin (issue 24's lever): with ``a_margin`` > 0 each QA row's answer must be likelier with its
own passages than with the next row's, by ``margin`` nats per answer token."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from peft_ctx.cocom import CocomPretrainingCollator
from peft_ctx.prompting import IGNORE_INDEX
from peft_ctx.training import ContextDataCollator, ContextSFTConfig, answer_logits, row_mean_nll
from tests.helpers import sft_trainer
from tests.test_cocom import MAX_TOKENS, cocom_model, make_args, qa_rows


def test_row_mean_nll_averages_each_rows_answer_tokens():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1], [IGNORE_INDEX, 2, 0, 4]])
    logits = torch.randn(5, 6)  # the 5 labelled positions, row by row
    targets = torch.tensor([3, 1, 2, 0, 4])
    nll = F.cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(row_mean_nll(logits, targets, labels), torch.stack([nll[:2].mean(), nll[2:].mean()]))
    with pytest.raises(ValueError, match="pass their labels"):
        row_mean_nll(logits[:4], targets[:4], labels)


def test_the_margin_term_is_the_hinge_on_own_vs_next_rows_passages(tokenizer, tmp_path):
    model, _ = cocom_model("llama", tokenizer, lora_dropout=0.0)
    rows = qa_rows()
    collator = ContextDataCollator(model.active_peft_config, tokenizer)
    args = dataclasses.replace(make_args(tmp_path, 1), a_margin=2.0, margin=0.5)
    trainer = sft_trainer(model, args, rows, collator, tokenizer)
    assert collator.wrong_passage  # the trainer asks its collator for the wrong-passage rows
    batch = collator(rows)
    assert {"wrong_input_ids", "wrong_labels"} <= set(batch)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch)).item()
        collator.wrong_passage = False
        shifted = [dict(r, contexts=rows[(i + 1) % len(rows)]["contexts"]) for i, r in enumerate(rows)]

        def per_row(rows_):
            inputs = collator(rows_)
            labels = inputs.pop("labels")
            _, logits, targets = answer_logits(model, inputs, labels)
            return row_mean_nll(logits, targets, labels), logits, targets

        own, logits, targets = per_row(rows)
        wrong, _, _ = per_row(shifted)
    nll = F.cross_entropy(logits, targets)
    expected = nll + 2.0 * F.relu(0.5 - (wrong - own)).mean()
    # The same model on the same batches, computed in two passes: float rounding apart.
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert (wrong - own).abs().max() > 0  # the passages matter to this adapter, so the term is not trivially 0


def test_the_margin_needs_qa_batches_of_two_rows(tokenizer):
    model, _ = cocom_model("llama", tokenizer)
    collator = ContextDataCollator(model.active_peft_config, tokenizer, wrong_passage=True, model=model)
    with pytest.raises(ValueError, match="two rows or more"):
        collator(qa_rows(1))
    with pytest.raises(ValueError, match="a_margin=-1"):
        ContextSFTConfig(output_dir="out", a_margin=-1, use_cpu=True, report_to=[])


def test_pretraining_batches_carry_each_rows_target_read_from_the_next_rows_compression(tokenizer):
    model, _ = cocom_model("llama", tokenizer)
    texts = [f"Passage {i}: the Verrin river floods each spring near the town of Tal{i}." for i in range(4)]
    collator = CocomPretrainingCollator(
        model.active_peft_config, tokenizer, model=model, wrong_passage=True, autoencode_ratio=0.5, seed=3
    )
    batch = collator([{"text": t} for t in texts])
    assert set(collator._tasks) == {"autoencode", "continuation"}  # both kinds, each with its control
    assert torch.equal(batch["wrong_labels"], batch["labels"])  # the same targets ...
    wrong = batch["wrong_cocom_passage_ids"]
    for i, task in enumerate(collator._tasks):  # ... read from the next row's passage (its first half: continuation)
        n = int(batch["wrong_cocom_passage_lengths"][i])
        following = tokenizer(texts[(i + 1) % 4], add_special_tokens=False).input_ids
        assert wrong[i, :n].tolist() == following[:n]
        assert n == min(len(following) // 2 if task == "continuation" else len(following), MAX_TOKENS)
