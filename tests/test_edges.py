"""Behaviour a PEFT / transformers user expects at the edges: generation settings pass through ``peft_ctx.generate``
as they do through transformers' ``generate``, and BIG-bench tasks that carry their passage in the input are split."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from transformers import GenerationConfig

import peft_ctx
from peft_ctx.harness import assets, data
from peft_ctx.inference import generate_baseline
from tests.helpers import RETRIEVER_DIM, tiny_model

QUESTIONS = ["Who keeps the lighthouse?", "What colour is the door?"]
PASSAGES = [["Ada keeps the lighthouse on the cliff."], ["The door of the mill is blue."]]


def spring_model(tokenizer):
    model = get_peft_model(
        tiny_model("llama", tokenizer, initializer_range=0.2), peft_ctx.SpringConfig(num_virtual_tokens=4)
    )
    return model.eval()


def test_sampling_settings_pass_through_generate_as_in_transformers(tokenizer):
    model = spring_model(tokenizer)
    settings = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
    torch.manual_seed(5)
    answers = peft_ctx.generate(
        model, tokenizer, QUESTIONS, PASSAGES, num_virtual_tokens=3, max_new_tokens=5, **settings
    )
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES, num_virtual_tokens=3)
    torch.manual_seed(5)
    output = model.generate(**inputs, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id, **settings)
    expected = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answers == [text.strip() for text in expected]
    greedy = peft_ctx.generate(model, tokenizer, QUESTIONS, PASSAGES, max_new_tokens=5)
    torch.manual_seed(6)
    sampled = [
        peft_ctx.generate(model, tokenizer, QUESTIONS, PASSAGES, max_new_tokens=5, **settings) for _ in range(3)
    ]
    assert any(s != greedy for s in sampled)  # the settings really reached generate


def test_a_generation_config_passes_through_too(tokenizer):
    model = spring_model(tokenizer)
    config = GenerationConfig(max_new_tokens=2, do_sample=False)
    answers = peft_ctx.generate(model, tokenizer, QUESTIONS, PASSAGES, generation_config=config)
    assert answers == peft_ctx.generate(model, tokenizer, QUESTIONS, PASSAGES, max_new_tokens=2)
    assert generate_baseline(model, tokenizer, QUESTIONS, PASSAGES, max_new_tokens=2, num_beams=2)


@pytest.mark.parametrize("method", ["spring", "xrag"])
def test_an_unknown_option_names_the_methods_options_and_generation_kwargs(method, tokenizer):
    if method == "spring":
        model = spring_model(tokenizer)
    else:
        config = peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM)
        model = get_peft_model(tiny_model("llama", tokenizer), config).eval()
    with pytest.raises(ValueError, match=r"\['no_such_option'\].*generation_kwargs") as info:
        peft_ctx.generate(model, tokenizer, QUESTIONS, PASSAGES, no_such_option=1)
    if method == "spring":
        assert "num_virtual_tokens" in str(info.value)


@pytest.mark.parametrize(
    "text, question, passage",
    [
        ("Question: Who won?\nContext: Ada won the race.", "Who won?", "Ada won the race."),
        ("Who won in 1990?\ncontext: Ada won in 1990.", "Who won in 1990?", "Ada won in 1990."),
        ("Context: The mill is blue.\nQuestion: What colour is it?", "What colour is it?", "The mill is blue."),
        ("What is the capital of France?", "What is the capital of France?", None),
        ("Explain the context: of this joke.", "Explain the context: of this joke.", None),  # not a marker
    ],
)  # fmt: skip
def test_bigbench_inputs_are_split_into_question_and_passage(text, question, passage):
    assert data.split_passage(text) == (question, [passage] if passage else [])


def test_a_bigbench_qa_task_with_context_markers_gets_passages_and_one_without_says_so(tmp_path, monkeypatch):
    tasks = {
        "with_passages": [{"input": f"Who came {i}?\ncontext: Ada came {i}.", "target": "Ada"} for i in range(3)],
        "without": [{"input": "What is two plus two?", "target": "four"}],
    }
    for name, examples in tasks.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"examples": examples}))
    monkeypatch.setattr(assets, "bigbench_task_path", lambda task: str(tmp_path / f"{task}.json"))
    rows = data.bigbench_rows("with_passages")
    assert [(r["question"], r["contexts"]) for r in rows][0] == ("Who came 0?", ["Ada came 0."])
    with pytest.warns(UserWarning, match="1 of 1 inputs carry no passage"):
        (row,) = data.bigbench_rows("without")
    assert row["question"] == "What is two plus two?" and row["contexts"] == []
