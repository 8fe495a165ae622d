"""The training token budget: rows over it lose passage tokens first (and are counted), rows that cannot fit are
skipped (and named), and training goes on instead of stopping at the first long row."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model

import peft_ctx
from peft_ctx.training import ContextDataCollator, ContextSFTConfig, ContextSFTTrainer
from tests.helpers import RETRIEVER_DIM, tiny_model

BUDGET = 96
CONFIGS = {
    "xrag": lambda: peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM),
    "spring": lambda: peft_ctx.SpringConfig(num_virtual_tokens=4),
    "cocom": lambda: peft_ctx.CocomConfig(compression_rate=2, max_passage_tokens=256, lora_r=2),
}


def rows():
    """Row 0 fits; row 1's two passages are far over budget; row 2's question alone is over it."""
    long_one = " ".join(f"river{i}" for i in range(200))
    long_two = " ".join(f"stone{i}" for i in range(200))

    def row(question, passages):
        vectors = torch.randn(len(passages), RETRIEVER_DIM).tolist()  # xRAG: one vector per passage
        return {"question": question, "answer": "blue", "contexts": passages, "retrieval_embeds": vectors}

    return [
        row("What colour is the sky?", ["The sky is blue."]),
        row("What colour is the river?", ["The river is blue. " + long_one, long_two]),
        row("why " * 150 + "?", ["The sky is blue."]),
    ]


def collator_for(method, tokenizer, distill=False):
    model = get_peft_model(tiny_model("llama", tokenizer), CONFIGS[method]())
    context_column = "retrieval_embeds" if method == "xrag" else "contexts"
    collator = ContextDataCollator(
        model.active_peft_config, tokenizer, context_column=context_column, text_column="contexts", distill=distill
    )
    collator.model = model
    return model, collator


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_rows_over_the_budget_lose_passage_tokens_from_the_end_and_unfittable_rows_are_skipped(method, tokenizer):
    _, collator = collator_for(method, tokenizer, distill=True)
    data = Dataset.from_list(rows())
    fitted, report = collator.fit_to_budget(data, BUDGET)
    assert (report.rows, report.truncated, report.skipped) == (3, [1], [2])
    assert len(fitted) == 2 and "rows 2" in report.summary() and "1 of 3 rows truncated" in report.summary()
    assert fitted[0] == data[0]  # a row within budget is untouched
    cut = fitted[1]
    assert (cut["question"], cut["answer"]) == (data[1]["question"], data[1]["answer"])
    # The last passage goes first: only the first passage's beginning is left, and its vector with it.
    assert len(cut["contexts"]) == 1 and data[1]["contexts"][0].startswith(cut["contexts"][0])
    assert len(cut["retrieval_embeds"]) == (1 if method == "xrag" else 2)
    student, teacher = collator.measure(cut)
    assert student <= BUDGET and teacher <= BUDGET
    # As much as fits is kept: the busier of the two prompts is close to the budget (a token can decode into a
    # shorter or longer text than it was, so allow a few).
    assert max(student, teacher) > BUDGET - 8
    assert report.passage_tokens_cut > 300


def test_the_teacher_has_its_own_budget(tokenizer):
    """xRAG's student reads one slot per passage, so only the text teacher's prompt is over budget."""
    _, collator = collator_for("xrag", tokenizer, distill=True)
    data = Dataset.from_list(rows()[:2])
    _, unlimited = collator.fit_to_budget(data, max_length=4096)
    assert not unlimited.truncated
    student_only = collator.fit_to_budget(data, max_length=BUDGET, teacher_max_length=4096)[1]
    assert not student_only.truncated  # the student fits; the teacher had room
    fitted, report = collator.fit_to_budget(data, max_length=4096, teacher_max_length=BUDGET)
    assert report.truncated == [1] and collator.measure(fitted[1])[1] <= BUDGET


@pytest.mark.parametrize("method", ["spring", "xrag"])
def test_training_goes_on_past_long_rows_and_logs_the_counts(method, tokenizer, tmp_path, capsys):
    model, collator = collator_for(method, tokenizer, distill=method == "xrag")
    collator.max_length = BUDGET
    args = ContextSFTConfig(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=3, max_steps=2, learning_rate=1e-2,
        logging_steps=1, report_to=[], save_strategy="no", max_length=BUDGET, a_kl=1.0 if method == "xrag" else 0.0,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = ContextSFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows() * 2), data_collator=collator,
        processing_class=tokenizer,
    )  # fmt: skip
    assert "2 of 6 rows truncated" in capsys.readouterr().out
    assert (trainer.budget_report.truncated, trainer.budget_report.skipped) == ([1, 4], [2, 5])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "rows_truncated" in entry]
    assert len(logged) == 1 and (logged[0]["rows_truncated"], logged[0]["rows_skipped"]) == (2, 2)


def test_bad_budgets_are_refused(tmp_path):
    with pytest.raises(ValueError, match="teacher_max_length=0; give a positive number of tokens"):
        ContextSFTConfig(output_dir=str(tmp_path), teacher_max_length=0)
