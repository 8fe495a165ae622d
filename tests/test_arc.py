"""ARC-Encoder's compressor (peft_ctx.cocom.arc) against the reference code's outputs on a tiny checkpoint in the
published layout (tests/fixtures/published/make_arc_fixture.py ran kyutai-labs/ARC-Encoder's encoder and bridge)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM

import peft_ctx
from peft_ctx.cocom.arc import ArcEncoder, pooling_groups
from peft_ctx.cocom.arc_convert import from_reference_state_dict, reference_config
from peft_ctx.convert import main as convert_cli
from tests.helpers import captured_embeddings, load_train_script, tiny_model

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "published", "arc")


@pytest.mark.parametrize(
    ("n_tokens", "factor", "sizes"),
    [
        (5, 8, [5]),
        (8, 8, [8]),
        (9, 8, [5, 4]),
        (17, 8, [6, 6, 5]),
        (25, 8, [7, 6, 6, 6]),
        (65, 8, [8, 8] + [7] * 7),
        (17, 4, [4, 4, 3, 3, 3]),
    ],
)
def test_pooling_groups_spread_the_remainder_over_the_first_groups(n_tokens, factor, sizes):
    assert pooling_groups(n_tokens, factor) == sizes


def reference_encoder() -> tuple[ArcEncoder, dict, dict]:
    with open(os.path.join(FIXTURE, "config.json")) as f:
        config, factor, bridge_hidden, output_size = reference_config(json.load(f))
    encoder = ArcEncoder(config, factor, bridge_hidden, output_size).eval()
    encoder.load_state_dict(
        from_reference_state_dict(load_file(os.path.join(FIXTURE, "model.safetensors")), config), strict=True
    )
    expected = load_file(os.path.join(FIXTURE, "expected.safetensors"))
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        meta = json.load(f)
    return encoder, expected, meta


def padded(ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    batch = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, passage in enumerate(ids.split(lengths)):
        batch[row, : len(passage)] = passage
    return batch


def test_the_encoder_and_bridge_give_the_reference_outputs_on_a_padded_batch():
    """Three passages (13, 30 and 5 tokens) right-padded into one batch: the pooled states and the bridged slot
    embeddings (each passage's states, then the continuation state) equal what the reference computed on them
    packed without padding (fp32, rtol 1e-4)."""
    encoder, expected, meta = reference_encoder()
    lengths = torch.tensor(meta["lengths"])
    batch = padded(expected["input_ids"], meta["lengths"])
    with torch.no_grad():
        pooled = encoder.pooled_states(batch, lengths)
        bridged = encoder(batch, lengths)
    assert [len(pooling_groups(n, encoder.pooling_factor)) for n in meta["lengths"]] == meta["pooled_lengths"]
    torch.testing.assert_close(pooled, expected["pooled"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bridged, expected["bridged"], rtol=1e-4, atol=1e-5)


def test_a_passage_compresses_the_same_alone_and_in_a_padded_batch():
    encoder, expected, meta = reference_encoder()
    lengths = meta["lengths"]
    batch = padded(expected["input_ids"], lengths)
    with torch.no_grad():
        together = encoder(batch, torch.tensor(lengths))
        alone = [encoder(batch[i : i + 1, :n], torch.tensor([n])) for i, n in enumerate(lengths)]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-6)


def test_a_multi_decoder_checkpoint_needs_its_decoders_bridge():
    state = load_file(os.path.join(FIXTURE, "model.safetensors"))
    with open(os.path.join(FIXTURE, "config.json")) as f:
        config = reference_config(json.load(f))[0]
    with pytest.raises(ValueError, match="decoder_index=1"):
        from_reference_state_dict(state, config, decoder_index=1)


def test_settings_the_releases_do_not_use_are_refused():
    with open(os.path.join(FIXTURE, "config.json")) as f:
        reference = json.load(f)
    reference["embedder_args"]["compress_rates"] = [-8, -2]
    with pytest.raises(ValueError, match="compress_rates"):
        reference_config(reference)


# ---- ARC as a COCOM-light compressor (compressor_type="arc"), on a tiny decoder ------------------------------------
PASSAGES = ["The lighthouse on the northern cape was built in 1874 by a local mason.", "Ada Obi wrote the report."]


def arc_adapter(tokenizer, compressor_dir):
    config = peft_ctx.CocomConfig(
        compressor=str(compressor_dir), compressor_type="arc", compression_rate=4, bridge_hidden_size=16, lora_r=0
    )
    return get_peft_model(tiny_model("llama", tokenizer), config)


def test_an_arc_adapter_fills_each_passages_slots_with_its_pooled_states_then_the_continuation_state(
    tokenizer, trainable_base_dir
):
    model = arc_adapter(tokenizer, trainable_base_dir)
    assert model.peft_config["default"].passage_end_token  # the continuation state's slot
    module = model.base_model.context_layer().ctx_modules["default"]
    encoder_tokenizer, _ = module.tokenizer
    ids = [encoder_tokenizer.encode(p, add_special_tokens=False).ids for p in PASSAGES]  # ARC reads bare passages
    prompt = peft_ctx.serving.serving_prompts(model, tokenizer, ["Who built it?"], [PASSAGES])[0]
    counts = [len(pooling_groups(len(x), 4)) for x in ids]
    assert int(prompt.slot_mask.sum()) == sum(k + 1 for k in counts)
    with torch.no_grad():
        expected = module.arc(padded(torch.tensor([t for x in ids for t in x]), [len(x) for x in ids]),
                              torch.tensor([len(x) for x in ids]))  # fmt: skip
    torch.testing.assert_close(prompt.embeds[prompt.slot_mask], expected, rtol=1e-5, atol=1e-6)
    # the encoder starts from the given model's layers and token embeddings
    source = AutoModel.from_pretrained(trainable_base_dir)
    assert torch.equal(module.arc.encoder.embed_tokens.weight, source.embed_tokens.weight)
    assert torch.equal(module.arc.encoder.layers[-1].mlp.up_proj.weight, source.layers[-1].mlp.up_proj.weight)


def test_an_arc_adapter_saves_and_loads_exactly_without_its_source_folder(tokenizer, trainable_base_dir, tmp_path):
    model = arc_adapter(tokenizer, trainable_base_dir).eval()
    inputs = peft_ctx.prepare_inputs(model, tokenizer, ["Who built it?", "Who wrote it?"], [PASSAGES, PASSAGES[1:]])
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    shutil.rmtree(trainable_base_dir)  # the encoder's config, weights and tokenizer travel in the adapter
    loaded = PeftModel.from_pretrained(tiny_model("llama", tokenizer), tmp_path / "adapter").eval()
    inputs = peft_ctx.prepare_inputs(loaded, tokenizer, ["Who built it?", "Who wrote it?"], [PASSAGES, PASSAGES[1:]])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)


def test_arc_needs_its_encoder():
    with pytest.raises(ValueError, match="compressor_type='arc'"):
        peft_ctx.CocomConfig(compressor_type="arc")
    with pytest.raises(ValueError, match="compressor_type='bert'"):
        peft_ctx.CocomConfig(compressor="x", compressor_type="bert")


def test_arc_reconstruction_reads_the_passage_states_then_the_reconstruction_token(tokenizer, trainable_base_dir):
    """ARC's reconstruction prompt is [E_1..E_k, <Rec>]: in an auto-encoding example the <AE> marker takes the
    continuation state's slot (as many slots as the passage has in a QA prompt, [E_1..E_k, <Cont>]); a continuation
    example keeps [E_1..E_k, <Cont>]."""
    model = arc_adapter(tokenizer, trainable_base_dir)
    module = model.base_model.context_layer().ctx_modules["default"]
    batches = peft_ctx.cocom.CocomPretrainingCollator(model.peft_config["default"], tokenizer, model=model)
    qa = peft_ctx.prepare_inputs(model, tokenizer, ["Who built it?"], [[PASSAGES[0]]])
    with torch.no_grad():
        ae, continuation = module.marker()
    for task, last in (("autoencode", ae), ("continuation", continuation)):
        batch = batches.pad([batches.example(PASSAGES[0], task)])
        with torch.no_grad():
            slots = captured_embeddings(model, {k: v for k, v in batch.items() if k != "labels"})
        slots = slots[batch["context_mask"]]  # [k + 1, hidden]
        torch.testing.assert_close(slots[-1], last, rtol=0, atol=0)
        assert not any(torch.equal(row, continuation) for row in slots[:-1])
        if task == "autoencode":
            assert len(slots) == int(qa["context_mask"].sum())


def test_the_training_script_trains_an_arc_adapter_on_the_llms_own_layers(trainable_base_dir, tmp_path, monkeypatch):
    """train/cocom.py with ARC's settings: the encoder starts from the LLM's own first layer (compressor_layers=1),
    the LLM stays frozen (no LoRA): the saved adapter holds only the compressor, whose encoder the steps changed, and
    loads onto the plain base."""
    script = load_train_script("cocom", monkeypatch)
    passages = tmp_path / "passages.txt"
    passages.write_text("\n".join(PASSAGES * 4))
    output = script.main([
        "--model_name_or_path", str(trainable_base_dir), "--dataset_name", str(passages), "--stage", "pretrain",
        "--compressor", str(trainable_base_dir), "--compressor_type", "arc", "--compressor_layers", "1",
        "--bridge_hidden_size", "16", "--compression_rate", "4", "--max_passage_tokens", "16", "--lora_r", "0",
        "--autoencode_ratio", "0.2", "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-2", "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--use_cpu",
        "true", "--save_strategy", "no", "--disable_tqdm", "true", "--dtype", "fp32",
    ])  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(trainable_base_dir)
    loaded = PeftModel.from_pretrained(base, output)
    config = loaded.peft_config["default"]
    assert config.compressor_type == "arc" and config.compressor_layers == 1 and config.lora_r == 0
    module = loaded.base_model.context_layer().ctx_modules["default"]
    assert len(module.arc.encoder.layers) == 1
    source = AutoModel.from_pretrained(trainable_base_dir)
    assert not torch.equal(module.arc.encoder.layers[0].mlp.up_proj.weight, source.layers[0].mlp.up_proj.weight)
    saved = load_file(os.path.join(output, "adapter_model.safetensors"))
    assert all(".ctx_modules." in key for key in saved)  # the LLM is untouched: no LoRA, nothing of its own


# ---- a release converted by peft_ctx.convert against the reference's whole pipeline ---------------------------------
# tests/fixtures/published/make_arc_decoder_fixture.py ran the reference's EmbedAugPipeline.generate (its encoder,
# bridge, per-segment prompt and KV-cache decoding) on a tiny release for a tiny Llama-3.1-like decoder.
RELEASE = os.path.join(os.path.dirname(__file__), "fixtures", "published", "arc_llama")


@pytest.fixture(scope="module")
def release():
    with open(os.path.join(RELEASE, "expected.json")) as f:
        record = json.load(f)
    return record, load_file(os.path.join(RELEASE, "expected.safetensors"))


@pytest.fixture(scope="module")
def converted_release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arc") / "adapter"
    convert_cli([
        RELEASE, str(folder), "--base_model", os.path.join(RELEASE, "decoder"),
        "--encoder_tokenizer", os.path.join(RELEASE, "encoder_tokenizer"),
    ])  # fmt: skip
    decoder = AutoModelForCausalLM.from_pretrained(os.path.join(RELEASE, "decoder"), dtype=torch.float32)
    model = PeftModel.from_pretrained(decoder, folder).eval()
    return model, AutoTokenizer.from_pretrained(os.path.join(RELEASE, "decoder")), folder


def test_a_converted_release_gives_the_reference_pipelines_prompt_ids_logits_and_greedy_tokens(
    converted_release, release
):
    """Each example alone: the prompt's ids (slots as -1) are the reference's per-segment ids, the slot embeddings its
    bridged vectors, the logits at every position its decoder's (fp32; rtol 1e-4, atol 1e-4: the reference's
    complex-number RoPE and xformers-free SDPA put its decoder 4e-6 from transformers' on plain ids) and the greedy
    tokens its KV-cache decoding's."""
    model, tokenizer, _ = converted_release
    record, tensors = release
    assert model.active_peft_config.compressor_type == "arc" and model.active_peft_config.lora_r == 0
    for i, example in enumerate(record["examples"]):
        inputs = peft_ctx.prepare_inputs(model, tokenizer, [example["question"]], [[example["passage"]]])
        ids, mask = inputs["input_ids"][0].tolist(), inputs["context_mask"][0].tolist()
        assert [-1 if slot else token for token, slot in zip(ids, mask)] == example["input_ids_with_slots"], i
        slots = captured_embeddings(model, inputs)[inputs["context_mask"]]
        torch.testing.assert_close(slots, tensors[f"slot_embeddings.{i}"], rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            logits = model(**inputs).logits[0]  # [positions, vocab]
        torch.testing.assert_close(logits, tensors[f"logits.{i}"], rtol=1e-4, atol=1e-4)
        new = model.generate(**inputs, max_new_tokens=record["new_tokens"], do_sample=False)
        assert new[0, len(ids) :].tolist() == example["generated_ids"], i


def test_a_converted_release_answers_a_left_padded_batch_as_one_by_one(converted_release, release):
    model, tokenizer, _ = converted_release
    record, _ = release
    questions = [e["question"] for e in record["examples"]]
    passages = [[e["passage"]] for e in record["examples"]]
    inputs = peft_ctx.prepare_inputs(model, tokenizer, questions, passages)
    new = model.generate(**inputs, max_new_tokens=record["new_tokens"], do_sample=False)
    assert [row[inputs["input_ids"].shape[1] :].tolist() for row in new] == [
        e["generated_ids"] for e in record["examples"]
    ]


def test_a_converted_release_carries_its_reconstruction_token_and_its_card(converted_release):
    """<Rec> becomes the adapter's <AE> marker as the decoder reads it (through the bridge); the card names the
    source, the licence and how the encoder's tokenizer came in."""
    model, _, folder = converted_release
    state = load_file(os.path.join(RELEASE, "model.safetensors"))
    module = model.base_model.context_layer().ctx_modules["default"]
    bridged = (
        state["bridge_module.layer2.weight"]
        @ state["bridge_module.layer1.weight"]
        @ state["embedder.rec_tok.0.weight"].T
    )  # [out, 1]
    torch.testing.assert_close(module.ae_marker.detach(), bridged.T, rtol=1e-5, atol=1e-6)
    card = (folder / "README.md").read_text()
    assert "ARC-Encoder" in card and "cc-by-4.0" in card.lower() and "--encoder_tokenizer" in card
    assert "frozen (no LoRA)" in card and "arXiv:2510.20535" in card


def test_converting_an_arc_release_needs_its_encoder_tokenizer_and_decoder(tmp_path):
    with pytest.raises(ValueError, match="--encoder_tokenizer"):
        peft_ctx.convert(RELEASE, str(tmp_path / "a"), base_model_name_or_path="x", encoder_tokenizer=str(tmp_path))
    with pytest.raises(ValueError, match="--base_model"):
        peft_ctx.convert(RELEASE, str(tmp_path / "b"), encoder_tokenizer=os.path.join(RELEASE, "encoder_tokenizer"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def multi_release(folder) -> None:
    """The tiny release as ARC8_Encoder_multi lays it out: one encoder, a bridge and continuation / reconstruction
    tokens per decoder (index 0 the tiny release's own, index 1 new random ones)."""
    state = load_file(os.path.join(RELEASE, "model.safetensors"))
    generator = torch.Generator().manual_seed(3)
    multi = {}
    for key, value in state.items():
        if key.startswith("bridge_module."):
            name = key.removeprefix("bridge_module.")
            multi[f"bridge_module.0.{name}"] = value
            multi[f"bridge_module.1.{name}"] = torch.randn(value.shape, generator=generator) * value.std()
        elif ".cont_tok.0." in key or ".rec_tok.0." in key:
            multi[key] = value
            multi[key.replace(".0.", ".1.")] = torch.randn(value.shape, generator=generator)
        else:
            multi[key] = value
    os.makedirs(folder)
    save_file(multi, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(RELEASE, "config.json")) as f:
        settings = json.load(f)
    settings["bridge_args"]["bridge_type"], settings["empty_init"] = "multi_module", 2
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(settings, f)


def test_one_encoder_two_bridges_two_decoders(converted_release, release, tmp_path):
    """ARC8_Encoder_multi's two bridges become two adapters (--decoder_index 0 / 1) holding the same encoder: on two
    decoders (the tiny Llama and a tiny Mistral of the same width) each reads the bridge of its index, and the first
    gives what the single-decoder release gives; both adapters also load side by side on one decoder through PEFT's
    multi-adapter API, switched with set_adapter."""
    _, tokenizer, single = converted_release
    record, _ = release
    multi_release(tmp_path / "multi")
    decoders = {"llama": os.path.join(RELEASE, "decoder"), "mistral": str(tmp_path / "mistral")}
    mistral = MistralForCausalLM(MistralConfig(
        vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, bos_token_id=398, eos_token_id=399,
    ))  # fmt: skip
    mistral.save_pretrained(decoders["mistral"])
    adapters = {}
    for index, name in enumerate(decoders):
        adapters[name] = tmp_path / name / "adapter"
        peft_ctx.convert(
            str(tmp_path / "multi"), str(adapters[name]), base_model_name_or_path=decoders[name],
            encoder_tokenizer=os.path.join(RELEASE, "encoder_tokenizer"), decoder_index=index,
        )  # fmt: skip
    saved = {name: load_file(os.path.join(folder, "adapter_model.safetensors")) for name, folder in adapters.items()}
    encoder_keys = [key for key in saved["llama"] if ".arc.encoder." in key]
    assert encoder_keys and all(torch.equal(saved["llama"][k], saved["mistral"][k]) for k in encoder_keys)
    bridge = next(key for key in saved["llama"] if key.endswith("arc.bridge_in.weight"))
    assert not torch.equal(saved["llama"][bridge], saved["mistral"][bridge])
    assert torch.equal(saved["llama"][bridge], load_file(os.path.join(single, "adapter_model.safetensors"))[bridge])

    questions, passages = [record["examples"][0]["question"]], [[record["examples"][0]["passage"]]]
    outputs = {}
    for name in decoders:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(decoders[name]), adapters[name])
        inputs = peft_ctx.prepare_inputs(model, tokenizer, questions, passages)
        outputs[name] = captured_embeddings(model.eval(), inputs)[inputs["context_mask"]]
        if name == "llama":
            new = model.generate(**inputs, max_new_tokens=record["new_tokens"], do_sample=False)
            assert new[0, inputs["input_ids"].shape[1] :].tolist() == record["examples"][0]["generated_ids"]
    both = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(decoders["llama"]), adapters["llama"], adapter_name="llama"
    )
    both.load_adapter(adapters["mistral"], adapter_name="mistral")
    for name in decoders:
        both.set_adapter(name)
        inputs = peft_ctx.prepare_inputs(both, tokenizer, questions, passages)
        assert torch.equal(captured_embeddings(both.eval(), inputs)[inputs["context_mask"]], outputs[name])
    assert not torch.allclose(outputs["llama"], outputs["mistral"])


def test_an_arc_adapter_serves_through_llama_cpp_with_no_merge(tokenizer, encoder_dir, tmp_path):
    """ARC needs no merge (the decoder is frozen): the export is the base model, and llama.cpp fed the adapter's
    prompt embeddings (an f32 GGUF) gives the torch path's greedy answers."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not built here (make install builds it)")
    from peft_ctx.serving.gguf import to_gguf
    from tests.helpers import tiny_adapter

    model = tiny_adapter("cocom_arc", "llama", tokenizer, encoder_dir)
    out = tmp_path / "export"
    peft_ctx.export_for_serving(model, str(out), tokenizer=tokenizer)
    exported = AutoModelForCausalLM.from_pretrained(out)
    base = model.get_base_model()
    for name, param in exported.named_parameters():  # the base model's own weights, nothing merged
        assert torch.equal(param, base.get_parameter(name.replace("embed_tokens.", "embed_tokens.base_layer."))), name
    engine = peft_ctx.LlamaCppEngine(to_gguf(str(out), "f32"), n_seq_max=4)
    questions = ["Who built it?", "Who wrote it?", "When was it built?", "Where is it?"]
    contexts = [PASSAGES, PASSAGES[1:], PASSAGES[:1], PASSAGES[::-1]]
    expected = peft_ctx.generate(model, tokenizer, questions, contexts, max_new_tokens=4)
    assert peft_ctx.generate(model, tokenizer, questions, contexts, max_new_tokens=4, engine=engine) == expected
    assert len(set(expected)) > 1


def test_the_speed_benchmark_has_an_arc_row_reading_the_base_models_own_layers(trainable_base_dir, tmp_path):
    """The benchmark's ARC row (pooling 8, the release's 2048-wide bridge) builds its encoder from the benchmarked
    base model and is measured against text RAG with the other rows' fields, as is the row of CLaRa's settings."""
    from benchmarks.run import Bench, Settings

    settings = Settings(
        methods=["rag", "cocom_arc", "cocom_clara"], model=str(trainable_base_dir), docs=[2], batch=[2], doc_tokens=24,
        instruction_tokens=50, new_tokens=2, repeats=1, weights="fp32", device="cpu", train_batch=2, train_steps=1,
        encode_passages=2, engine="torch", out=str(tmp_path / "bench"),
    )  # fmt: skip
    result = Bench(settings).run()
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == {"rag", "cocom_arc", "cocom_clara"}
    for name in ("cocom_arc", "cocom_clara"):
        row = rows[name]
        assert row["prompt_tokens"] < rows["rag"]["prompt_tokens"] and row["e2e_s"] > 0 and row["ttft_s"] > 0
