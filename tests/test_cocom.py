"""COCOM and COCOM-light on tiny random models of every supported architecture, with SmolLM2's real tokenizer; the
COCOM-light compressor is a tiny random BERT with all-MiniLM-L6-v2's real tokenizer (what every method's adapter keeps,
save / load, batching, the KV cache ...: tests/test_contract.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import pytest
import torch
from datasets import Dataset
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoTokenizer
from transformers.pytorch_utils import Conv1D

import peft_ctx
from peft_ctx.cocom import CocomConfig, CocomPretrainingCollator, CompressedIndex
from peft_ctx.methods import get_method
from peft_ctx.prompting import IGNORE_INDEX
from peft_ctx.training import ContextDataCollator, ContextSFTTrainer
from tests.helpers import (
    ARCHITECTURES,
    captured_embeddings,
    changed,
    clone,
    cpu_sft_config,
    gradients_apart,
    snapshot,
    tiny_model,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = "adapter_model.safetensors"
RATE, MAX_TOKENS = 4, 16
QUESTIONS = ["Who wrote the report?", "Where is the lighthouse?", "When did the river flood?"]
PASSAGES = [
    ["The report was written by Ada Obi for the river authority in the spring of 2019.", "Ada Obi lives in Verrin."],
    ["The lighthouse stands on Skerry Point."],
    ["The river floods each spring.", "Snow melts in the Aldor hills in April.", "The flood of 1950 was the worst."],
]


def perturb(model, seed=1, scale=0.1):
    """Random adapter weights: LoRA's B starts at zero, which would hide every LoRA effect."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


def cocom_model(arch, tokenizer, seed=0, **config_kwargs):
    """A COCOM adapter with random weights (``seed``) on the tiny base model (always the same one)."""
    base = tiny_model(arch, tokenizer)
    torch.manual_seed(seed)
    reference = clone(base)
    config = CocomConfig(**{"compression_rate": RATE, "max_passage_tokens": MAX_TOKENS, **config_kwargs})
    return perturb(get_peft_model(base, config), seed=seed + 1), reference


def light_model(arch, tokenizer, compressor, seed=0, **config_kwargs):
    return cocom_model(arch, tokenizer, seed=seed, compressor=compressor, **config_kwargs)


def module_of(model, name="default"):
    return model.get_base_model().get_input_embeddings().ctx_modules[name]


def saved_keys(folder):
    with safe_open(os.path.join(folder, WEIGHTS), framework="pt") as f:
        return set(f.keys())


@pytest.fixture
def light_dir(encoder_dir, tmp_path):
    """A private copy of the tiny BERT, so that a test may delete it."""
    return shutil.copytree(encoder_dir, tmp_path / "encoder")


# ---- COCOM: the LLM compresses --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_on_every_linear_layer_and_the_memory_tokens_are_the_only_trainable_parameters(arch, tokenizer, tmp_path):
    model, reference = cocom_model(arch, tokenizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_A.default." in n or ".lora_B.default." in n}
    context = {n.rsplit(".", 1)[-1] for n in trainable if ".ctx_modules.default." in n}
    assert trainable == lora | {n for n in trainable if ".ctx_modules.default." in n}
    assert context == {"memory", "enc_marker", "ae_marker"}
    assert module_of(model).memory.shape == (math.ceil(MAX_TOKENS / RATE), 64)
    head = reference.get_output_embeddings()
    linear = {n for n, m in reference.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head}
    assert {n.split(".lora_")[0].removeprefix("base_model.model.") for n in lora} == linear
    model.save_pretrained(tmp_path)  # (save / load of every method: test_contract.py)
    keys = saved_keys(tmp_path)
    assert any(k.endswith(".lora_A.weight") for k in keys) and any(k.endswith("ctx_modules.memory") for k in keys)
    # The decoder LoRA changes the model also where no context slot is (disabled, it is off too: test_contract.py).
    ids = tokenizer(["a question"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, reference(ids).logits)


def test_context_embeddings_are_the_last_hidden_states_at_the_memory_positions(tokenizer):
    model, reference = cocom_model("llama", tokenizer)
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS[:1], PASSAGES[:1])
    n_tokens = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in PASSAGES[0]]
    assert n_tokens[0] > MAX_TOKENS  # the first passage is truncated
    lengths = [min(n, MAX_TOKENS) for n in n_tokens]
    assert inputs["cocom_passage_lengths"].tolist() == lengths
    counts = [math.ceil(n / RATE) for n in lengths]
    assert inputs["context_mask"].sum().item() == sum(counts)
    module, layer = module_of(model), model.get_base_model().get_input_embeddings()
    expected = []
    with torch.no_grad():
        for ids, n, k in zip(inputs["cocom_passage_ids"], lengths, counts):
            sequence = torch.cat([module.enc_marker, layer.base_layer(ids[:n]), module.memory[:k]]).unsqueeze(0)
            hidden = model.get_base_model().model(inputs_embeds=sequence).last_hidden_state[0]
            expected.append(hidden[-k:])
    embeds, mask = captured_embeddings(model, inputs), inputs["context_mask"]
    torch.testing.assert_close(embeds[mask], torch.cat(expected), atol=1e-5, rtol=1e-5)
    assert torch.equal(embeds[~mask], reference.get_input_embeddings()(inputs["input_ids"])[~mask])
    text = tokenizer.decode(inputs["input_ids"][0][~mask[0]])
    assert "Background: \n\nQuestion: Who wrote the report?" in text  # passage slots, "\n", passage slots


def test_the_answer_loss_trains_the_compressor_through_the_context_embeddings(tokenizer):
    model, _ = cocom_model("llama", tokenizer)
    batch = ContextDataCollator(model.active_peft_config, tokenizer, model=model)(
        [{"question": q, "answer": "Ada Obi", "contexts": c} for q, c in zip(QUESTIONS, PASSAGES)]
    )
    labels = batch.pop("labels")
    logits = model(**batch).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).backward()
    module = module_of(model)
    # The memory tokens and <ENC> reach the loss only through the compressor pass.
    assert module.memory.grad.abs().sum() > 0 and module.enc_marker.grad.abs().sum() > 0
    assert module.ae_marker.grad is None or module.ae_marker.grad.abs().sum() == 0  # no <AE> slot in QA prompts
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.lora_B["default"].weight.grad.abs().sum() > 0


def test_separate_compressor_and_decoder_loras(tokenizer, tmp_path):
    model, reference = cocom_model("llama", tokenizer, separate_compressor_adapter=True)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert set(q_proj.lora_A) == {"default", "default__compressor"}
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES)
    method, config = get_method("cocom"), model.peft_config["default"]

    def compressed():
        with torch.no_grad():
            args = inputs["cocom_passage_ids"], inputs["cocom_passage_lengths"]
            return method.compress(model.base_model, "default", config, *args)

    def logits():
        with torch.no_grad():
            return model(**inputs).logits

    before, before_logits = compressed(), logits()
    with torch.no_grad():
        q_proj.lora_B["default"].weight.add_(0.5)  # the decoder's LoRA
    assert torch.equal(compressed(), before) and not torch.equal(logits(), before_logits)
    with torch.no_grad():
        q_proj.lora_B["default__compressor"].weight.add_(0.5)  # the compressor's LoRA
    assert not torch.equal(compressed(), before)
    # Both train, also after PEFT switched adapters or disabled them (which resets requires_grad by name).
    with model.disable_adapter():
        pass
    model.set_adapter("default")
    assert q_proj.lora_B["default__compressor"].weight.requires_grad and q_proj.lora_B["default"].weight.requires_grad
    model(**inputs).logits.sum().backward()
    assert q_proj.lora_B["default__compressor"].weight.grad.abs().sum() > 0
    assert q_proj.lora_B["default"].weight.grad.abs().sum() > 0
    expected = logits()
    model.save_pretrained(tmp_path)
    keys = saved_keys(tmp_path)
    assert any(k.endswith(".lora_A.compressor.weight") for k in keys) and not any("default" in k for k in keys)
    loaded = PeftModel.from_pretrained(clone(reference), tmp_path, adapter_name="other", is_trainable=True)
    loaded_q = loaded.get_base_model().model.layers[0].self_attn.q_proj
    assert set(loaded_q.lora_A) == {"other", "other__compressor"}
    assert loaded_q.lora_A["other__compressor"].weight.requires_grad  # is_trainable reaches the companion
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
    loaded.delete_adapter("other")
    assert not any("other" in n for n, _ in loaded.named_parameters())


@pytest.mark.parametrize("rate", [1, 7, 16, 128])  # 4: every other test
def test_any_compression_rate_gives_ceil_n_over_rate_embeddings_per_passage(rate, tokenizer):
    model, _ = cocom_model("qwen2", tokenizer, compression_rate=rate, max_passage_tokens=128)
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES)
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for ps in PASSAGES for p in ps]
    per_question = [sum(math.ceil(n / rate) for n in ls) for ls in [lengths[:2], lengths[2:3], lengths[3:]]]
    assert inputs["context_mask"].sum(1).tolist() == per_question
    loss = model(**inputs).logits.logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(module_of(model).memory.grad).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_merged_decoder_lora_gives_the_same_logits_and_unmerging_restores_the_base(arch, tokenizer):
    model, reference = cocom_model(arch, tokenizer)
    model.eval()
    index = peft_ctx.compress(model, tokenizer, [p for ps in PASSAGES for p in ps], batch_size=4)
    contexts = index.select([[0, 1], [2], [3, 4, 5]])
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, contexts)
    lora_layers = peft_ctx.cocom.merging.lora_layers(model)
    before = [layer.get_base_layer().weight.clone() for layer in lora_layers]
    with torch.no_grad():
        expected = model(**inputs).logits
        model.merge_adapter()
        assert model.merged_lora_adapters() == ["default"]
        merged = model(**inputs).logits
        # The LoRA deltas now sit in the base weights; the context slots are still filled at run time.
        assert lora_layers and all(layer.merged for layer in lora_layers)
        assert not any(torch.allclose(layer.get_base_layer().weight, w) for layer, w in zip(lora_layers, before))
        torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
        assert peft_ctx.generate(model, tokenizer, QUESTIONS, contexts, max_new_tokens=4) == _unmerged_answers(
            model, tokenizer, contexts
        )
        model.unmerge_adapter()
        assert model.merged_lora_adapters() == []
        # W + delta - delta is W up to rounding: 1.5e-6 apart in the logits with ATen's default (no AVX) kernels.
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        for layer, weight in zip(lora_layers, before):
            torch.testing.assert_close(layer.get_base_layer().weight, weight, rtol=1e-6, atol=1e-7)
        model.merge_adapter()
        base = model.unload()  # unload takes the delta back out: the base model as it was
        ids = tokenizer(["a question"], return_tensors="pt").input_ids
        torch.testing.assert_close(base(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def _unmerged_answers(model, tokenizer, contexts):
    model.unmerge_adapter()
    try:
        return peft_ctx.generate(model, tokenizer, QUESTIONS, contexts, max_new_tokens=4)
    finally:
        model.merge_adapter()


def test_merged_separate_compressor_adapter_refuses_to_compress_until_unmerged(tokenizer):
    model, _ = cocom_model("llama", tokenizer, separate_compressor_adapter=True)
    model.eval()
    index = peft_ctx.compress(model, tokenizer, [p for ps in PASSAGES for p in ps], batch_size=4)
    contexts = index.select([[0, 1], [2], [3, 4, 5]])
    with torch.no_grad():
        expected = model(**peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, contexts)).logits
        model.merge_adapter()
        # Only the decoder LoRA merges; the compressor LoRA stays a LoRA branch.
        assert model.merged_lora_adapters() == ["default"]
        merged = model(**peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, contexts)).logits
        torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match=r"unmerge_adapter\(\) before compressing"):
            model(**peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES))
        with pytest.raises(ValueError, match="unmerge_adapter"):
            peft_ctx.compress(model, tokenizer, ["another passage"])
        model.unmerge_adapter()
        again = peft_ctx.compress(model, tokenizer, [p for ps in PASSAGES for p in ps], batch_size=4)
        assert again.adapter_fingerprint == index.adapter_fingerprint
        torch.testing.assert_close(again.embeddings, index.embeddings, rtol=1e-4, atol=1e-5)


def test_a_merged_model_refuses_to_train_and_deleting_it_restores_the_base(tokenizer):
    model, reference = cocom_model("llama", tokenizer)
    model.merge_adapter()
    model.train()
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES)
    with pytest.raises(ValueError, match=r"merged into the base weights.*unmerge_adapter\(\) before training"):
        model(**inputs)
    model.eval()
    model.base_model.delete_adapter("default")
    ids = tokenizer(["a question"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model.base_model.model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_merging_a_cocom_adapter_without_lora_is_refused_with_the_reason(tokenizer):
    model, _ = cocom_model("llama", tokenizer, lora_r=0)
    with pytest.raises(ValueError, match=r"Adapter 'default' \(cocom\) adds no LoRA layer.*cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="No adapter named 'other'"):
        model.merge_adapter(["other"])


def test_only_the_active_adapter_merges_and_switching_adapters_unmerges(tokenizer):
    model, _ = cocom_model("llama", tokenizer)
    model.add_adapter("second", CocomConfig(compression_rate=RATE, max_passage_tokens=MAX_TOKENS))
    with pytest.raises(ValueError, match="Adapter 'second' is not the active one .*'default'.*set_adapter"):
        model.merge_adapter(["second"])
    model.merge_adapter()
    assert model.merged_lora_adapters() == ["default"]
    with pytest.warns(UserWarning, match="Unmerging"):
        model.set_adapter("second")  # PEFT takes the merged delta out before switching
    assert model.merged_lora_adapters() == []


# ---- the offline index ----------------------------------------------------------------------------------------------


def test_generate_from_a_saved_index_equals_generate_from_text(tokenizer, tmp_path):
    model, _ = cocom_model("llama", tokenizer, seed=5)
    corpus = [p for ps in PASSAGES for p in ps]
    index = peft_ctx.compress(model, tokenizer, corpus, batch_size=4)
    path = index.save(str(tmp_path / "index.safetensors"))
    with pytest.raises(FileExistsError):
        index.save(path)
    loaded = CompressedIndex.load(path)
    lengths = [min(len(tokenizer(p, add_special_tokens=False).input_ids), MAX_TOKENS) for p in corpus]
    assert len(loaded) == len(corpus) and loaded.embeddings.shape == (sum(math.ceil(n / RATE) for n in lengths), 64)
    assert loaded.compression_rate == RATE and loaded.adapter_fingerprint == peft_ctx.cocom.adapter_fingerprint(model)
    selected = loaded.select([[0, 1], [2], [3, 4, 5]])
    from_text = peft_ctx.generate(model, tokenizer, QUESTIONS, PASSAGES, max_new_tokens=6)
    assert peft_ctx.generate(model, tokenizer, QUESTIONS, selected, max_new_tokens=6) == from_text
    text_inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES)
    index_inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, selected)
    assert "cocom_passage_ids" not in index_inputs  # nothing is compressed again
    assert torch.equal(text_inputs["input_ids"], index_inputs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**index_inputs).logits, model(**text_inputs).logits, atol=1e-5, rtol=1e-5)
    # Text and index passages mix within one batch.
    mixed = [[PASSAGES[0][0], selected[0][1]], PASSAGES[1], selected[2]]
    assert peft_ctx.generate(model, tokenizer, QUESTIONS, mixed, max_new_tokens=6) == from_text


def test_an_index_from_another_adapter_or_rate_is_refused(tokenizer, tmp_path):
    model, reference = cocom_model("llama", tokenizer)
    index = peft_ctx.compress(model, tokenizer, PASSAGES[1])
    other, _ = cocom_model("llama", tokenizer, seed=7)
    with pytest.raises(ValueError, match="compressed by another adapter"):
        peft_ctx.prepare_inputs(other, tokenizer, QUESTIONS[1:2], [index.select([0])])
    faster, _ = cocom_model("llama", tokenizer, compression_rate=16)
    with pytest.raises(ValueError, match="compression_rate=4.*compression_rate=16"):
        peft_ctx.generate(faster, tokenizer, QUESTIONS[1:2], index.select([[0]]))
    model.save_pretrained(tmp_path)  # the same adapter loaded again is the same adapter
    loaded = PeftModel.from_pretrained(clone(reference), tmp_path)
    peft_ctx.prepare_inputs(loaded, tokenizer, QUESTIONS[1:2], index.select([[0]]))
    with torch.no_grad():
        module_of(model).memory.add_(0.01)  # a training step later the index is stale
    with pytest.raises(ValueError, match="compressed by another adapter"):
        peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS[1:2], index.select([[0]]))
    with pytest.raises(ValueError, match="Raw tensors are refused"):
        peft_ctx.prepare_inputs(loaded, tokenizer, QUESTIONS[1:2], [[index[0].embeddings]])
    # The fingerprint is cached per adapter; a LoRA matrix changed in place, or other weights loaded under the same
    # adapter name, still make the index stale.
    lora_a = next(p for n, p in loaded.named_parameters() if ".lora_A.default." in n)
    original = lora_a.detach().clone()
    with torch.no_grad():
        lora_a.add_(0.01)
    with pytest.raises(ValueError, match="compressed by another adapter"):
        peft_ctx.prepare_inputs(loaded, tokenizer, QUESTIONS[1:2], index.select([[0]]))
    with torch.no_grad():
        lora_a.copy_(original)
    peft_ctx.prepare_inputs(loaded, tokenizer, QUESTIONS[1:2], index.select([[0]]))
    other.save_pretrained(tmp_path / "other")
    loaded.base_model.delete_adapter("default")
    loaded.load_adapter(tmp_path / "other", adapter_name="default")
    with pytest.raises(ValueError, match="compressed by another adapter"):
        peft_ctx.prepare_inputs(loaded, tokenizer, QUESTIONS[1:2], index.select([[0]]))


# ---- COCOM-light: a BERT-style encoder compresses -------------------------------------------------------------------


def test_cocom_light_projects_each_group_of_rate_encoder_states(tokenizer, light_dir):
    model, _ = light_model("llama", tokenizer, str(light_dir))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".ctx_modules.default.encoder." in n for n in trainable)  # the encoder is fine-tuned
    assert any(".ctx_modules.default.projection." in n for n in trainable)
    assert not any("pooler" in n for n, _ in model.named_parameters())
    passage = PASSAGES[1][0]
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS[1:2], [[passage]])
    ids = AutoTokenizer.from_pretrained(light_dir)(passage).input_ids  # [CLS] ... [SEP]
    assert inputs["cocom_passage_ids"][0].tolist() == ids
    k = math.ceil(len(ids) / RATE)
    assert inputs["context_mask"].sum().item() == k
    module = module_of(model)
    with torch.no_grad():
        hidden = module.encoder(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [n, h]
        hidden = torch.nn.functional.pad(hidden, (0, 0, 0, k * RATE - len(ids)))
        expected = module.projection(hidden.reshape(k, RATE * hidden.shape[-1]))
    embeds = captured_embeddings(model, inputs)
    torch.testing.assert_close(embeds[inputs["context_mask"]], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cocom_light_loads_from_the_adapter_alone_after_the_encoder_folder_is_deleted(
    arch, tokenizer, light_dir, tmp_path
):
    model, reference = light_model(arch, tokenizer, str(light_dir))
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    shutil.rmtree(light_dir)
    assert sorted(os.listdir(tmp_path / "adapter")) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = PeftModel.from_pretrained(clone(reference), tmp_path / "adapter", low_cpu_mem_usage=arch == "gpt2")
    reloaded = peft_ctx.prepare_inputs(loaded, tokenizer, QUESTIONS, PASSAGES)  # the encoder's tokenizer came along
    for key in inputs:
        assert torch.equal(inputs[key], reloaded[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(**reloaded).logits, expected)


def test_cocom_light_generates_from_its_index_as_from_text(tokenizer, light_dir):
    model, _ = light_model("mistral", tokenizer, str(light_dir), seed=2)  # (batched = one by one: test_contract.py)
    index = peft_ctx.compress(model, tokenizer, [p for ps in PASSAGES for p in ps], batch_size=2)
    from_text = peft_ctx.generate(model, tokenizer, QUESTIONS, PASSAGES, max_new_tokens=5)
    assert (
        peft_ctx.generate(model, tokenizer, QUESTIONS, index.select([[0, 1], [2], [3, 4, 5]]), max_new_tokens=5)
        == from_text
    )


def test_a_config_object_used_twice_copies_the_pretrained_encoder_both_times(tokenizer, light_dir):
    config = CocomConfig(compression_rate=RATE, compressor=str(light_dir))
    first = get_peft_model(tiny_model("llama", tokenizer), config)
    assert config.compressor_config is not None
    second = get_peft_model(tiny_model("llama", tokenizer), config)
    for a, b in zip(module_of(first).encoder.parameters(), module_of(second).encoder.parameters()):
        assert torch.equal(a, b)


# ---- training -------------------------------------------------------------------------------------------------------


def qa_rows(n=4):
    colours = ["blue", "green", "red", "black"]
    return [
        {
            "question": f"What colour is item {i}?",
            "answer": colours[i % 4],
            "contexts": [f"Item {i} is {colours[i % 4]}.", f"Item {i} is round."],
        }
        for i in range(n)
    ]


def make_args(tmp_path, steps, lr=1e-2):
    return cpu_sft_config(tmp_path, steps, lr, batch_size=2)


@pytest.mark.parametrize("light", [False, True])
def test_qa_training_lowers_the_loss_and_changes_only_adapter_parameters(light, tokenizer, light_dir, tmp_path):
    base = tiny_model("llama", tokenizer, initializer_range=0.2)
    config = CocomConfig(
        compression_rate=RATE,
        max_passage_tokens=MAX_TOKENS,
        lora_dropout=0.0,
        compressor=str(light_dir) if light else None,
    )
    model = get_peft_model(base, config)
    before = snapshot(model)
    rows = qa_rows()
    collator = ContextDataCollator(model.active_peft_config, tokenizer)  # the trainer hands it the model
    trainer = ContextSFTTrainer(
        model=model,
        args=make_args(tmp_path, 4),
        train_dataset=Dataset.from_list(rows),
        data_collator=collator,
        processing_class=tokenizer,
    )
    assert collator.model is model

    def objective():
        model.eval()
        with torch.no_grad():
            return trainer.compute_loss(model, collator(rows)).item()

    loss_before = objective()
    trainer.train()
    assert objective() < loss_before
    moved = changed(before, model)
    adapter = {n for n in before if ".lora_" in n or ".ctx_modules.default." in n}
    assert moved and moved <= adapter  # the base model is bit-identical
    assert any(".lora_" in n for n in moved)
    assert any(".ctx_modules.default.encoder." in n for n in moved) == light


def test_pretraining_mixes_autoencoding_and_continuation_at_the_given_ratio(tokenizer, light_dir):
    model, _ = cocom_model("llama", tokenizer)
    texts = [
        f"Passage {i}: the Verrin river floods each spring when the snow melts in the Aldor hills." for i in range(40)
    ]
    rows = [{"text": t} for t in texts]
    collator = CocomPretrainingCollator(model.active_peft_config, tokenizer, model=model, seed=0)
    ids = tokenizer(texts[0], add_special_tokens=False).input_ids

    def kinds(batch):
        return [
            "autoencode" if (label != IGNORE_INDEX).sum() == MAX_TOKENS + 1 else "continuation"
            for label in batch["labels"]
        ]

    mixed = kinds(collator(rows))
    assert 8 <= mixed.count("autoencode") <= 32 and "continuation" in mixed
    everything = CocomPretrainingCollator(model.active_peft_config, tokenizer, autoencode_ratio=1.0)(rows[:1])
    target = everything["labels"][0][everything["labels"][0] != IGNORE_INDEX].tolist()
    assert target == ids[:MAX_TOKENS] + [tokenizer.eos_token_id]  # write back the compressed passage, then stop
    assert everything["context_mask"].sum().item() == MAX_TOKENS // RATE + 1  # + the <AE> marker
    assert everything["cocom_slot_source"][-1].item() == MAX_TOKENS // RATE  # its row follows the passage's rows
    continued = CocomPretrainingCollator(model.active_peft_config, tokenizer, autoencode_ratio=0.0)(rows[:1])
    cut = min(len(ids) // 2, MAX_TOKENS)
    assert continued["labels"][0][continued["labels"][0] != IGNORE_INDEX].tolist() == ids[cut : cut + 128]
    assert continued["context_mask"].sum().item() == math.ceil(cut / RATE)
    with torch.no_grad():
        assert torch.isfinite(model(**{k: v for k, v in everything.items() if k != "labels"}).logits).all()


def test_train_script_pretrains_then_fine_tunes_on_qa(tokenizer, tmp_path, capsys):
    sys.path.insert(0, os.path.join(REPO, "train"))
    try:
        import cocom as script
    finally:
        sys.path.pop(0)
    base_dir = tmp_path / "base"
    tiny_model("llama", tokenizer).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    passages = tmp_path / "passages.txt"
    passages.write_text("\n".join(p for ps in PASSAGES for p in ps))
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "\n".join(json.dumps({"question": q, "answer": "x", "contexts": c}) for q, c in zip(QUESTIONS, PASSAGES))
    )
    common = [
        "--model_name_or_path",
        str(base_dir),
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
    ]
    stage1 = script.main(
        [
            *common,
            "--dataset_name",
            str(passages),
            "--stage",
            "pretrain",
            "--compression_rate",
            "4",
            "--max_passage_tokens",
            "16",
            "--output_dir",
            str(tmp_path / "stage1"),
        ]
    )
    stage2 = script.main(
        [
            *common,
            "--dataset_name",
            str(qa),
            "--stage",
            "qa",
            "--top_k",
            "2",
            "--adapter_init",
            stage1,
            "--output_dir",
            str(tmp_path / "stage2"),
        ]
    )
    out = capsys.readouterr().out
    assert "adapter: compression rate 4," in out and "parameters" in out
    config = PeftConfig.from_pretrained(stage2)
    assert isinstance(config, CocomConfig) and config.compression_rate == 4
    with pytest.raises(FileExistsError):
        script.main([*common, "--dataset_name", str(qa), "--stage", "qa", "--output_dir", stage2])


# ---- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compression_rate": 0}, "compression_rate=0"),
        ({"compression_rate": -4}, "compression_rate=-4"),
        ({"compression_rate": 2.5}, "compression_rate=2.5"),
        ({"max_passage_tokens": 0}, "max_passage_tokens=0"),
        ({"lora_r": -1}, "lora_r=-1"),
        ({"lora_dropout": 1.0}, "lora_dropout=1.0"),
        ({"lora_target_modules": []}, "lora_target_modules=\\[\\]"),
        ({"compressor": ""}, "compressor=''"),
        ({"compressor": "some/encoder", "separate_compressor_adapter": True}, "separate_compressor_adapter=True is"),
        ({"lora_r": 0, "separate_compressor_adapter": True}, "needs LoRA adapters"),
    ],
)
def test_bad_config_values_are_named_in_the_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CocomConfig(**kwargs)


def test_an_encoder_without_hidden_states_is_refused(tokenizer, light_dir, tmp_path):
    from transformers import T5Config, T5Model

    folder = tmp_path / "t5"
    bert_tokenizer = AutoTokenizer.from_pretrained(light_dir)
    T5Model(
        T5Config(
            vocab_size=bert_tokenizer.vocab_size,
            d_model=16,
            d_ff=32,
            d_kv=8,
            num_layers=1,
            num_heads=2,
            decoder_start_token_id=0,
        )
    ).save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    with pytest.raises(ValueError, match="gives no per-token hidden states"):
        get_peft_model(tiny_model("llama", tokenizer), CocomConfig(compressor=str(folder)))
    with pytest.raises(ValueError, match="Cannot load the COCOM-light compressor"):
        get_peft_model(tiny_model("llama", tokenizer), CocomConfig(compressor=str(tmp_path / "missing")))


def test_bad_passages_are_refused_with_the_fix(tokenizer, light_dir):
    model, _ = cocom_model("llama", tokenizer)
    with pytest.raises(ValueError, match="Example 1 has an empty passage list"):
        peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS[:2], [PASSAGES[0], []])
    with pytest.raises(ValueError, match=r"contexts\[0\]\[1\] is '  '"):
        peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS[:1], [["fine", "  "]])
    with pytest.raises(ValueError, match="contexts\\[0\\] must be a list of passages"):
        peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS[:1], ["a bare string"])
    with pytest.raises(ValueError, match="Raw tensors are refused"):
        peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS[:1], [[torch.randn(2, 64)]])
    with pytest.raises(ValueError, match="drop encoder="):
        peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS[:1], PASSAGES[:1], encoder=object())
    with pytest.raises(ValueError, match="COCOM answers from passages"):
        peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS[:1])
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS[:1], PASSAGES[:1])
    del inputs["cocom_slot_source"]
    with pytest.raises(ValueError, match="no cocom_slot_source"):
        model(**inputs)
    light, _ = light_model("llama", tokenizer, str(light_dir))
    collator = ContextDataCollator(light.active_peft_config, tokenizer)  # outside a trainer nobody gives it the model
    with pytest.raises(ValueError, match="pass the model"):
        collator(qa_rows(1))


# ---- the docs -------------------------------------------------------------------------------------------------------


def test_the_docs_cocom_example_runs_as_written(tokenizer, encoder_dir, tmp_path, monkeypatch):
    import re

    monkeypatch.chdir(tmp_path)
    section = open(os.path.join(REPO, "docs", "cocom.md")).read()
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace = {
        "base_causal_lm": tiny_model("llama", tokenizer),
        "other_causal_lm": tiny_model("gpt2", tokenizer),
        "tokenizer": tokenizer,
    }
    exec(compile(code.replace('"path/to/all-MiniLM-L6-v2"', repr(encoder_dir)), "docs/cocom.md", "exec"), namespace)
    assert namespace["from_index"] == namespace["served"] == namespace["answers"] and len(namespace["answers"]) == 2
    assert namespace["model"].merged_lora_adapters() == []
    assert len(namespace["index"]) == 3 and os.path.isfile(tmp_path / "cocom-index.safetensors")
    assert namespace["light_model"].active_peft_config.compressor_config["model_type"] == "bert"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_plain_backward_gradients_with_a_separate_compressor_lora(
    tokenizer, reentrant, dtype
):
    """The recomputation of a compression layer runs with the LoRA the compression ran with (the compressor's), not
    the one active when the backward pass reaches it (the decoder's)."""

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model, _ = cocom_model("llama", tokenizer, separate_compressor_adapter=True)
        model.get_base_model().to(dtype)  # the trainable weights stay fp32 (autocast-free: a bf16 base)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()  # PEFT's path: reentrant checkpoints need an input that requires grad
        model.train()
        inputs = peft_ctx.prepare_inputs(
            model, tokenizer, QUESTIONS, PASSAGES, answers=["blue", "red", "green"][: len(QUESTIONS)]
        )
        model(**inputs).loss.backward()
        return {
            n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None
        }

    plain, checkpointed = gradients(False), gradients(True)
    assert set(plain) == set(checkpointed) and any("__compressor" in n for n in plain)
    if dtype == torch.float32:
        wrong = gradients_apart(plain, checkpointed)
    else:
        wrong = [n for n in plain if not torch.allclose(plain[n], checkpointed[n], rtol=2e-2, atol=1e-4)]
    assert not wrong, f"{len(wrong)} of {len(plain)} gradients differ, e.g. {wrong[:3]}"


def test_the_compressor_can_read_the_passage_between_bos_and_eos_as_the_public_code_does(tokenizer):
    from peft_ctx.cocom.method import tokenize_passages

    text = "The river runs past the old mill and into the sea."
    plain = peft_ctx.CocomConfig(compression_rate=4, max_passage_tokens=8)
    wrapped = peft_ctx.CocomConfig(compression_rate=4, max_passage_tokens=8, passage_special_tokens=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenize_passages(plain, [text], {"tokenizer": tokenizer}) == [ids[:8]]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    expected = bos + ids[: 8 - len(bos) - 1] + [tokenizer.eos_token_id]
    assert tokenize_passages(wrapped, [text], {"tokenizer": tokenizer}) == [expected]  # still 8 tokens at most
    assert len(expected) == 8
    with pytest.raises(ValueError, match="passage_special_tokens=True is for COCOM with the LLM as compressor"):
        peft_ctx.CocomConfig(compression_rate=4, compressor="some/encoder", passage_special_tokens=True)
