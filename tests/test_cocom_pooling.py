"""COCOM's residual pooling (issue 24's first lever): context embeddings = the passage's token embeddings mean-pooled
by xi + a learned correction (a zero-initialised Linear on the compressor's hidden states)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_ctx
from peft_ctx.cocom import CocomConfig
from peft_ctx.cocom.modules import pooled_runs
from tests.helpers import ARCHITECTURES, captured_embeddings, clone, load_train_script, tiny_model
from tests.test_cocom import MAX_TOKENS, PASSAGES, QUESTIONS, RATE, module_of, perturb, saved_keys


def _expected_pooled(model, inputs) -> torch.Tensor:
    """Each run of RATE token embeddings of each compressed passage, averaged one by one.  # [sum k, hidden]"""
    embedding = model.get_base_model().get_input_embeddings().base_layer
    rows = []
    for ids, n in zip(inputs["cocom_passage_ids"], inputs["cocom_passage_lengths"].tolist()):
        emb = embedding(ids[:n])  # [n, hidden]
        rows += [emb[i : i + RATE].mean(0) for i in range(0, n, RATE)]
    return torch.stack(rows)


def test_pooled_runs_average_each_run_and_skip_the_padding():
    tokens = torch.randn(2, 7, 3)
    tokens[1, 5:] = 1e6  # padding must not leak in
    pooled = pooled_runs(tokens, torch.tensor([7, 5]), 3)
    first, second = tokens[0], tokens[1]
    expected = [first[:3].mean(0), first[3:6].mean(0), first[6], second[:3].mean(0), second[3:5].mean(0)]
    torch.testing.assert_close(pooled, torch.stack(expected))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_residual_pooling_starts_at_the_pooled_token_embeddings_and_learns_the_correction(arch, tokenizer):
    base = tiny_model(arch, tokenizer)
    config = CocomConfig(compression_rate=RATE, max_passage_tokens=MAX_TOKENS, residual_pooling=True)
    model = get_peft_model(base, config)
    residual = module_of(model).residual
    assert residual.weight.requires_grad and not residual.weight.abs().any()
    with torch.no_grad():  # LoRA's B too: the compressor's hidden states then differ from the plain model's
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES)
    embeds = captured_embeddings(model, inputs)[inputs["context_mask"]]  # [sum k, hidden]
    # Two reductions of the same numbers (a loop of means vs one index_add): float rounding apart, no more.
    torch.testing.assert_close(embeds, _expected_pooled(model, inputs), atol=1e-6, rtol=1e-5)
    model.train()
    batch = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES, answers=["Ada", "Skerry", "April"])
    model(**batch).loss.backward()
    assert residual.weight.grad.abs().sum() > 0 and residual.bias.grad.abs().sum() > 0
    # Zero at first, so the compressor pass gets no gradient until the correction moves (as LoRA's B = 0 does).
    assert module_of(model).memory.grad is None or not module_of(model).memory.grad.any()
    with torch.no_grad():
        residual.weight.normal_(0, 0.1)
    model.zero_grad()
    model(**batch).loss.backward()
    assert module_of(model).memory.grad.abs().sum() > 0
    assert not torch.allclose(captured_embeddings(model, inputs)[inputs["context_mask"]], embeds)


def test_the_correction_reads_hidden_states_at_the_embeddings_scale(tokenizer):
    """The compressor's hidden states are normalised before the Linear: their size (16x the embeddings' on SmolLM2)
    does not decide how far one optimiser step moves the correction."""
    model = get_peft_model(
        tiny_model("llama", tokenizer),
        CocomConfig(compression_rate=RATE, max_passage_tokens=MAX_TOKENS, residual_pooling=True),
    )
    module = module_of(model)
    embedding = model.get_base_model().get_input_embeddings().base_layer.weight
    # The buffer is the entry RMS of the random vocabulary embeddings it was built from: the embeddings' own scale.
    assert 0.5 < float(module.residual_scale) / float(embedding.pow(2).mean().sqrt()) < 2
    with torch.no_grad():
        module.residual.weight.normal_(0, 0.1)
    hidden = torch.randn(5, embedding.shape[1])
    torch.testing.assert_close(module.correction(16 * hidden), module.correction(hidden))
    normalised = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6) * module.residual_scale
    torch.testing.assert_close(module.correction(hidden), module.residual(normalised))


def test_a_residual_pooling_adapter_saves_loads_exactly_and_is_an_index_of_its_own(tokenizer, tmp_path):
    base = tiny_model("llama", tokenizer)
    reference = clone(base)
    torch.manual_seed(0)
    config = CocomConfig(compression_rate=RATE, max_passage_tokens=MAX_TOKENS, residual_pooling=True)
    model = perturb(get_peft_model(base, config)).eval()
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    assert any(k.endswith("ctx_modules.residual.weight") for k in saved_keys(tmp_path))
    assert any(k.endswith("ctx_modules.residual_scale") for k in saved_keys(tmp_path))
    loaded = PeftModel.from_pretrained(clone(reference), tmp_path).eval()
    assert loaded.peft_config["default"].residual_pooling
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
    index = peft_ctx.compress(loaded, tokenizer, [p for ps in PASSAGES for p in ps])
    assert index.adapter_fingerprint == peft_ctx.cocom.adapter_fingerprint(model)
    plain = get_peft_model(clone(reference), CocomConfig(compression_rate=RATE, max_passage_tokens=MAX_TOKENS))
    with pytest.raises(ValueError, match="compressed by another adapter"):
        peft_ctx.prepare_inputs(plain, tokenizer, QUESTIONS[:1], [index.select([[0]])[0]])


def test_residual_pooling_is_refused_with_a_cocom_light_encoder():
    with pytest.raises(ValueError, match="residual_pooling=True pools the LLM's own token embeddings"):
        CocomConfig(compressor="sentence-transformers/all-MiniLM-L6-v2", residual_pooling=True)


def test_the_training_script_makes_a_residual_pooling_adapter(trainable_base_dir, monkeypatch):
    script = load_train_script("cocom", monkeypatch)
    args = script.ScriptArguments(
        model_name_or_path=str(trainable_base_dir), dataset_name="wiki", compression_rate=8, residual_pooling=True
    )
    model = script.build_model(args)
    assert model.peft_config["default"].residual_pooling and module_of(model).residual is not None
    with pytest.raises(ValueError, match="residual_pooling"):
        script.build_model(dataclasses.replace(args, compressor="some/encoder"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_tokens_source_correction_reads_the_pooled_token_states(arch, tokenizer):
    """residual_source='tokens': the correction reads the compressor's states at the passage's own tokens, pooled per
    run of xi as the embeddings are; with the LLM frozen, the compressor pass builds no autograd graph."""
    config = CocomConfig(
        compression_rate=RATE, max_passage_tokens=MAX_TOKENS, residual_pooling=True, residual_source="tokens", lora_r=0
    )
    model = get_peft_model(tiny_model(arch, tokenizer), config)
    module = module_of(model)
    with torch.no_grad():
        module.residual.weight.normal_(0, 0.1)
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES)
    embeds = captured_embeddings(model, inputs)[inputs["context_mask"]]  # [sum k, hidden]
    decoder = model.get_base_model().base_model
    embedding = model.get_base_model().get_input_embeddings().base_layer
    expected = []
    for ids, n in zip(inputs["cocom_passage_ids"], inputs["cocom_passage_lengths"].tolist()):
        with torch.no_grad():
            states = decoder(input_ids=ids[:n].unsqueeze(0)).last_hidden_state[0]  # [n, hidden], the passage alone
        tokens = embedding(ids[:n])
        for i in range(0, n, RATE):
            correction = module.correction(states[i : i + RATE].mean(0, keepdim=True))[0]
            expected.append(tokens[i : i + RATE].mean(0) + correction)
    # Batched with right padding vs one passage at a time: float rounding apart.
    torch.testing.assert_close(embeds, torch.stack(expected), atol=1e-5, rtol=1e-4)
    model.train()
    batch = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES, answers=["Ada", "Skerry", "April"])
    model(**batch).loss.backward()
    assert module.residual.weight.grad.abs().sum() > 0
    for unread in (module.memory, module.enc_marker):  # neither is read on this path
        assert unread.grad is None or not unread.grad.any()


def test_residual_source_is_checked():
    with pytest.raises(ValueError, match="residual_source='states'"):
        CocomConfig(residual_pooling=True, residual_source="states")
    with pytest.raises(ValueError, match="set residual_pooling=True with it"):
        CocomConfig(residual_source="tokens")
