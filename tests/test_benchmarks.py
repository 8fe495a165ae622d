"""The benchmark code runs end to end on a tiny model (nothing here is timed), and the shared fast decoding loop
gives exactly what transformers' generate gives."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import get_peft_model

import peft_ctx
from benchmarks import check
from benchmarks.methods import registry, select
from benchmarks.run import Bench, Settings, write_results
from peft_ctx.harness.fast import convert_weights, greedy_generate, quantize_linear, weight_bytes
from tests import fake_vllm
from tests.helpers import ARCHITECTURES, RETRIEVER_DIM, tiny_model

# The benchmark's llama.cpp rows run where the binding is built (make install builds it; make test requires it); its
# vLLM rows then run too, on the stand-in server of tests/fake_vllm.py (vLLM itself: make test-engines).
try:
    import llama_cpp  # noqa: F401

    ENGINE = "all"
except ImportError:
    if os.environ.get("PEFT_CTX_REQUIRE_ENGINES") == "1":
        raise
    ENGINE = "torch"

PASSAGES = [
    f"Passage {i} tells how the harbour town of Vell{i} rebuilt its stone lighthouse after the storm of 18{i}0, and "
    "who paid for the lamp, the keeper's house and the long road up the cliff."
    for i in range(12)
]


def xrag_model(arch, tokenizer):
    return get_peft_model(tiny_model(arch, tokenizer), peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM))


@pytest.mark.parametrize(
    "arch, cache", [(arch, "static") for arch in ARCHITECTURES] + [("llama", "dynamic"), ("gpt2", "dynamic")]
)
def test_fast_greedy_loop_gives_the_tokens_of_transformers_generate(arch, cache, tokenizer):
    model = xrag_model(arch, tokenizer)
    vectors = [torch.randn(2, RETRIEVER_DIM), torch.randn(1, RETRIEVER_DIM)]
    inputs = peft_ctx.prepare_inputs(model, tokenizer, ["Who?", "Where is the old lighthouse?"], vectors)
    expected = model.generate(**inputs, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    result = greedy_generate(model, inputs, 6, cache=cache)
    assert torch.equal(result.tokens, expected[:, inputs["input_ids"].shape[1] :])
    assert 0 < result.ttft_s <= result.e2e_s


def test_fast_greedy_loop_stops_each_row_at_eos_and_pads_it(tokenizer):
    model = tiny_model("llama", tokenizer, initializer_range=0.2)
    inputs = tokenizer(["Hello there", "Where is the old lighthouse?"], return_tensors="pt", padding=True)
    free = greedy_generate(model, inputs, 5).tokens
    eos = int(free[0, 0])  # pretend the first row's first token ends its answer
    assert eos not in free[1].tolist()  # the second row never produces it, so it runs to the end
    pad = tokenizer.pad_token_id
    assert pad != eos
    result = greedy_generate(model, inputs, 5, eos_token_id=eos, pad_token_id=pad)
    assert result.tokens[0].tolist() == [eos, pad, pad, pad, pad]
    assert torch.equal(result.tokens[1], free[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.qint8])
def test_quantized_linear_layers_leave_adapter_modules_in_full_precision_and_shrink_weights(dtype, tokenizer):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    model = xrag_model("llama", tokenizer)
    body = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight"))
    before = weight_bytes(model)
    quantize_linear(model, dtype, include_lm_head=False)
    layers = model.get_base_model().model.layers
    assert all(isinstance(layer.self_attn.q_proj, DynamicQuantizedLinear) for layer in layers)
    assert type(model.get_base_model().lm_head) is torch.nn.Linear
    projector = model.get_base_model().get_input_embeddings().ctx_modules["default"].projector
    assert {type(m) for m in projector if "Linear" in type(m).__name__} == {torch.nn.Linear}
    assert before - weight_bytes(model) == body * (4 - (2 if dtype == torch.float16 else 1))


def test_fp16_weights_keep_the_greedy_answers_of_fp32(tokenizer):
    model = tiny_model("llama", tokenizer, initializer_range=0.2)
    inputs = tokenizer(["Where is the old lighthouse?"], return_tensors="pt")
    expected = greedy_generate(model, inputs, 6).tokens
    assert torch.equal(greedy_generate(convert_weights(model, "fp16w"), inputs, 6).tokens, expected)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_flops_from_two_decoding_steps_equal_a_full_count(cache, tokenizer):
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.measure import _custom_flops, profile_generation

    model = convert_weights(tiny_model("llama", tokenizer), "fp16w")
    inputs = tokenizer(["Hello there", "Where is the old lighthouse?"], return_tensors="pt", padding=True)
    with FlopCounterMode(display=False, custom_mapping=_custom_flops()) as counter:
        greedy_generate(model, inputs, 7, cache=cache)
    flops, peak = profile_generation(model, inputs, 7, cache, torch.device("cpu"))
    assert flops["flops"] == counter.get_total_flops()
    assert flops["flops_prefill"] + flops["flops_decode"] == flops["flops"]
    assert 0 < flops["flops_attention"] < flops["flops"] and peak > 0


def test_benchmark_registry_always_includes_text_rag_and_rejects_unknown_methods():
    chosen, _ = select(["xrag"])
    assert [m.name for m in chosen] == ["rag", "xrag"]
    with pytest.raises(ValueError, match="Unknown method"):
        select(["xrag", "nope"])
    assert {"no_retrieval", "rag", "xrag", "spring", "cocom_xi16", "cocom_light"} <= set(registry())


def test_benchmark_settings_reject_bad_values():
    with pytest.raises(ValueError, match="--new-tokens"):
        Settings(new_tokens=1)
    with pytest.raises(ValueError, match="--weights"):
        Settings(weights="fp8")
    with pytest.raises(ValueError, match="--adapter"):
        Settings(adapters={"lora": "somewhere"})


@pytest.fixture(scope="module")
def tiny_result(tokenizer, encoder_dir, tmp_path_factory):
    with fake_vllm.serving(str(tmp_path_factory.mktemp("fake_vllm"))) as pids:
        result, paths = _tiny_bench(tokenizer, encoder_dir, tmp_path_factory)
        servers = [int(pid) for pid in open(pids).read().split()] if ENGINE == "all" else []
    yield result, paths, servers


def _tiny_bench(tokenizer, encoder_dir, tmp_path_factory):
    base = tiny_model("llama", tokenizer)
    base.requires_grad_(False)
    settings = Settings(
        methods=["no_retrieval", "rag", "xrag", "spring", "cocom_xi4", "cocom_light"],
        encoder=encoder_dir,
        docs=[2],
        batch=[2],
        doc_tokens=24,
        instruction_tokens=50,
        new_tokens=3,
        repeats=1,
        weights="fp16w",
        device="cpu",
        train_batch=2,
        train_steps=1,
        encode_passages=3,
        engine=ENGINE,
        gguf_type="f16",
        out=str(tmp_path_factory.mktemp("bench")),
    )
    result = Bench(settings, base=base, tokenizer=tokenizer, passages=PASSAGES).run()
    return result, write_results(result, settings.out)


def test_benchmark_writes_a_row_per_method_docs_and_batch_with_the_issue_fields(tiny_result):
    result, paths, _ = tiny_result
    with open(paths["json"]) as f:
        saved = json.load(f)
    rows = saved["rows"]
    names = ("no_retrieval", "rag", "xrag", "spring", "cocom_xi4", "cocom_light")
    engines = ("torch", "llama.cpp", "vllm") if ENGINE == "all" else ("torch",)
    assert [(r["method"], r["docs"], r["batch"], r["engine"]) for r in rows] == [
        (m, 2, 2, e) for e in engines for m in names
    ]
    required = {
        "method",
        "docs",
        "batch",
        "prompt_tokens",
        "flops",
        "ttft_s",
        "e2e_s",
        "peak_mem_bytes",
        "index_bytes_per_passage",
        "ttft_speedup_vs_rag",
        "e2e_speedup_vs_rag",
    }
    assert all(required <= set(r) for r in rows)
    assert saved["machine"]["torch"] == torch.__version__
    assert any("untrained" in note for note in saved["notes"])
    open(paths["png"], "rb").close()
    assert "| xrag |" in open(paths["md"]).read()


def test_benchmark_figures_are_consistent(tiny_result):
    result, _, servers = tiny_result
    rows = {r["method"]: r for r in result["rows"] if r["engine"] == "torch"}
    rag, xrag = rows["rag"], rows["xrag"]
    assert rag["ttft_speedup_vs_rag"] == 1.0 and rag["e2e_speedup_vs_rag"] == 1.0
    # xRAG puts one slot where text RAG puts a whole document: fewer prompt tokens and fewer FLOPs.
    assert xrag["prompt_tokens"] < rag["prompt_tokens"]
    assert xrag["flops"] < rag["flops"]
    assert rows["no_retrieval"]["index_bytes_per_passage"] == 0
    assert rows["rag"]["index_bytes_per_passage"] > 24  # the passage's UTF-8 text
    assert rows["xrag"]["index_bytes_per_passage"] >= 4 * RETRIEVER_DIM  # one fp32 vector
    assert rows["cocom_xi4"]["encode_passages_per_s"] > 0 and rows["rag"]["encode_passages_per_s"] is None
    for row in result["rows"]:
        assert row["flops_prefill"] + row["flops_decode"] == row["flops"]
        # COCOM's decoder LoRA is merged into the base weights once the passages are compressed: no extra FLOPs.
        assert 0.95 < row["flops_linear_vs_estimate"] < 1.05, row["method"]
        assert row["peak_mem_bytes"] > row["weight_bytes"] > 0
        assert row["e2e_s"] >= row["ttft_s"] > 0
    for row in result["rows"]:
        if row["engine"] == "llama.cpp":  # the same prompts decoded by llama.cpp on each row's own GGUF export
            assert row["kv_cache_bytes"] > 0 and row["weights"] == "f16"
            assert row["e2e_speedup_vs_fastest_rag"] > 0
        if row["engine"] == "vllm":  # the same prompts sent to a server of each row's export
            assert (
                row["kv_cache_bytes"] > 0 and row["weights"] == row["vllm_dtype"] == result["settings"]["vllm_dtype"]
            )
    # One server of the base model (the baselines, xRAG, SPRING) and one per COCOM row (merged), all stopped.
    assert len(servers) == (3 if ENGINE == "all" else 0)
    for pid in servers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert rows["rag"]["train_speedup_vs_lora_sft"] == 1.0
    assert rows["xrag"]["train_samples_per_s"] > 0
    assert rows["no_retrieval"].get("train_samples_per_s") is None


def test_regression_check_passes_an_identical_run_and_fails_a_slower_method(tiny_result, tmp_path):
    result, paths, _ = tiny_result
    assert check.main([paths["json"], "--baseline", paths["json"]]) == 0
    slower = json.loads(json.dumps(result))
    for row in slower["rows"]:
        if row["method"] == "xrag" and row["engine"] == "torch":
            row["e2e_speedup_vs_rag"] *= 0.5
    path = tmp_path / "new.json"
    path.write_text(json.dumps(slower))
    assert check.main([str(path), "--baseline", paths["json"]]) == 1


def test_benchmark_training_steps_compute_the_one_training_stacks_loss(tokenizer, tmp_path):
    from benchmarks import measure

    model = xrag_model("llama", tokenizer).train()
    vectors = [torch.randn(1, RETRIEVER_DIM), torch.randn(2, RETRIEVER_DIM)]
    batch = peft_ctx.prepare_inputs(
        model, tokenizer, ["Who?", "Where is it?"], vectors, answers=["Ada", "On the cliff"], padding_side="right"
    )
    loss = measure.one_stack_loss(model, tokenizer, torch.device("cpu"), str(tmp_path))
    with torch.no_grad():
        ours = loss(model, dict(batch))  # answer-span logits only
        reference = model(**batch).loss  # transformers' causal-LM loss over every labelled token
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    step = measure.make_train_step(model, batch, loss, lr=1e-2)
    first = step()
    assert step() < first  # the same batch again: the step trained the projector
