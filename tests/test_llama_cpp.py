"""llama.cpp engine on the real SmolLM2-135M-Instruct (f16 GGUF of each adapter's export) against the torch path.

50 held-out CPKC questions (evaluation only, nothing trains here), one passage each: for text RAG and for every
method's embeddings, the first generated token must agree on >= 95% of the questions and the whole greedy answer on
>= 90%. Needs llama-cpp-python, which ``make install`` builds; with PEFT_CTX_REQUIRE_ENGINES=1 (``make test`` sets it)
a missing build fails instead of skipping.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from peft import get_peft_model

import peft_ctx
from peft_ctx.serving import to_gguf
from tests.helpers import assert_engine_agrees, assert_engine_refuses, cpkc_rows, every_method, tiny_model

if os.environ.get("PEFT_CTX_REQUIRE_ENGINES") == "1":
    import llama_cpp  # noqa: F401  (make test: a missing build is a failure)
else:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not built here (make install builds it)")

N_QUESTIONS = 50
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def rows():
    return cpkc_rows(N_QUESTIONS)


@pytest.fixture(scope="module")
def served(smollm2, minilm, tmp_path_factory):
    """Every method's adapter on one PeftModel (random LoRA B, so COCOM's merged export differs from the base), and
    each adapter's f16 GGUF engine."""
    base, tokenizer = smollm2
    model = every_method(base, minilm)
    engines = {}
    for name in model.peft_config:
        model.set_adapter(name)
        out = tmp_path_factory.mktemp(f"served_{name}")
        peft_ctx.export_for_serving(model, str(out), tokenizer=tokenizer, overwrite=True)
        engines[name] = peft_ctx.LlamaCppEngine(to_gguf(str(out), "f16"), n_seq_max=8)
    return model, tokenizer, engines


# Real weights on an engine: the default run keeps the cheapest row (about 50 s); the others (100-300 s each on two
# cores) run with --runslow (make test-all).
ROWS = [pytest.param(row, marks=pytest.mark.slow) for row in ("rag", "xrag", "spring", "cocom_xi16")] + ["cocom_light"]


@pytest.mark.parametrize("row", ROWS)
def test_llama_cpp_answers_as_the_torch_path_does(row, served, rows, minilm):
    """One greedy pass on each engine over the same prompts (the ones peft_ctx.generate builds, batches of 8)."""
    model, tokenizer, engines = served
    model.set_adapter("xrag" if row == "rag" else row)  # text RAG: xRAG's export is the plain base model
    engine = engines["xrag" if row == "rag" else row]
    assert_engine_agrees(model, tokenizer, engine, row, *rows, minilm, NEW_TOKENS)


def test_the_engine_refuses_another_adapters_embeddings_and_the_wrong_width(served, rows):
    model, tokenizer, engines = served
    assert_engine_refuses(model, tokenizer, engines, *rows, served_model="GGUF model")


def test_the_evaluation_harness_decodes_with_llama_cpp(served, rows, minilm, tmp_path):
    from peft_ctx.harness import eval as harness

    model, tokenizer, _ = served
    questions, contexts = rows
    test_rows = [
        {"id": str(i), "question": q, "contexts": c, "answers": ["x"], "answer": "x", "choices": [], "label": None}
        for i, (q, c) in enumerate(zip(questions[:5], contexts[:5]))
    ]
    runners = [
        harness.TextRunner("rag", "text RAG"),
        harness.AdapterRunner(name="cocom_xi16", label="COCOM", adapter_name="cocom_xi16"),
    ]
    by_engine = {}
    for engine in ("torch", "llama.cpp"):
        settings = harness.EvalSettings(
            n_test=5, timing_examples=1, engine=engine, engine_dir=str(tmp_path), show_progress=False
        )
        by_engine[engine] = harness.evaluate(model, tokenizer, runners, test_rows, settings)
    for torch_row, engine_row in zip(by_engine["torch"], by_engine["llama.cpp"]):
        assert engine_row["engine"] == "llama.cpp" and torch_row["engine"] == "torch"
        agree = [a["prediction"] == b["prediction"] for a, b in zip(torch_row["examples"], engine_row["examples"])]
        assert sum(agree) >= 4, (torch_row["method"], torch_row["examples"], engine_row["examples"])  # of 5
        # Both timed on the engine; TTFT is its own one-token run, so on a loaded machine it can come out above a
        # short end-to-end run (2.70 s vs 2.57 s once here): only that both were measured is certain.
        assert engine_row["e2e_s"] > 0 and engine_row["ttft_s"] > 0
    assert model.base_model.merged_lora_adapters() == []  # COCOM served merged, then unmerged again


def test_q8_0_with_f16_embeddings_is_quantized_by_llama_cpp_and_serves(tokenizer, tmp_path):
    from gguf import GGUFReader

    model = get_peft_model(tiny_model("llama", tokenizer), peft_ctx.SpringConfig(num_virtual_tokens=4))
    out = tmp_path / "export"
    peft_ctx.export_for_serving(model, str(out), tokenizer=tokenizer)
    path = to_gguf(str(out), "q8_0_f16emb")
    assert path.endswith("model-q8_0_f16emb.gguf") and os.path.isfile(os.path.join(out, "model-f16.gguf"))
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["token_embd.weight"] == "F16"  # tied: it also computes the logits
    matrices = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    layers = [n for n in types if n.startswith("blk.") and n.split(".")[2] in matrices]
    assert len(layers) == 2 * len(matrices) and {types[n] for n in layers} == {"Q8_0"}
    engine = peft_ctx.LlamaCppEngine(path)
    assert engine.weight_bytes() < os.path.getsize(os.path.join(out, "model-f16.gguf"))
    questions = ["Who wrote the letter?"]
    assert (
        len(peft_ctx.generate(model, tokenizer, questions, [["Ada wrote it."]], engine=engine, max_new_tokens=3)) == 1
    )


def test_one_command_converts_an_export_to_gguf(tokenizer, tmp_path):
    """python -m peft_ctx.serving gguf EXPORT: llama.cpp's converter, the GGUF's path printed, beside the export's
    peft_ctx_serving.json (which the engine then reads)."""
    model = get_peft_model(tiny_model("llama", tokenizer), peft_ctx.SpringConfig(num_virtual_tokens=4))
    out = tmp_path / "export"
    peft_ctx.export_for_serving(model, str(out), tokenizer=tokenizer)
    command = [sys.executable, "-m", "peft_ctx.serving", "gguf", str(out), "--outtype", "f32"]
    printed = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    assert printed == str(out / "model-f32.gguf") and os.path.isfile(printed)
    assert peft_ctx.LlamaCppEngine(printed).info["method"] == "spring"


def test_the_engines_benchmark_pairs_its_ratios_and_recommends_faithful_weights(tokenizer, tmp_path):
    from benchmarks import engines as engines_bench

    model_dir = tmp_path / "tiny"
    tiny_model("llama", tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    argv = ["--model", str(model_dir), "--types", "f16", "--repeats", "2", "--new-tokens", "3",
            "--accuracy-prompts", "2", "--work", str(tmp_path / "gguf"), "--out", str(tmp_path / "out")]  # fmt: skip
    result = engines_bench.main(argv)
    rows = {r["weights"]: r for r in result["rows"]}
    assert set(rows) == {"fp32", "f16"}  # (q8_0_f16emb's conversion has its own test above)
    for row in rows.values():
        paired = row["decode_speedup_paired"]
        assert paired["min"] <= paired["median"] <= paired["max"] and paired["median"] > 0
    assert rows["fp32"]["decode_speedup_paired"]["median"] == 1.0  # torch against itself, repetition by repetition
    recommended = result["recommended"]
    if recommended is not None:  # only weights that agree with torch on first tokens and on whole answers
        row = rows[recommended["weights"]]
        assert row["first_token_agreement"] == 1.0
        assert row["answer_agreement"] >= engines_bench.MIN_ANSWER_AGREEMENT
    assert "paired per repetition" in (tmp_path / "out" / "engines.md").read_text()
