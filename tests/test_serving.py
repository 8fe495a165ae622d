"""Serving contract: ``prompt_embeds`` on the ``export_for_serving`` model is what ``peft_ctx.generate`` does."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import peft_ctx
from tests.helpers import TINY_ROWS, encoder_for, tiny_adapter, tiny_model

QUESTIONS = ["Who keeps the lighthouse?", "What colour is the door of the old mill?", "Where is it?"]
PASSAGES = [
    ["Ada keeps the lighthouse on the cliff.", "The keeper before her was Tom."],
    ["The door of the mill is blue."],
    ["The river runs past the mill towards the sea, below the town."],
]
ARCHS = ("llama", "qwen2", "gpt2")


@pytest.fixture(scope="module")
def built(tokenizer, encoder_dir, tmp_path_factory):
    cache = {}

    def get(method, arch):
        if (method, arch) not in cache:
            model = tiny_adapter(method, arch, tokenizer, encoder_dir)
            out = tmp_path_factory.mktemp(f"export_{method}_{arch}")
            peft_ctx.export_for_serving(model, str(out), tokenizer=tokenizer, overwrite=True)
            served = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
            cache[method, arch] = (model, served, str(out))
        return cache[method, arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", TINY_ROWS)
def test_exported_model_generates_what_peft_ctx_generates(method, arch, built, tokenizer, encoder):
    model, served, _ = built(method, arch)
    enc = encoder_for(model, encoder)
    expected = peft_ctx.generate(model, tokenizer, QUESTIONS, PASSAGES, encoder=enc, batch_size=1, max_new_tokens=8)
    embeds = peft_ctx.prompt_embeds(model, tokenizer, QUESTIONS, PASSAGES, encoder=enc)
    got = []
    for e in embeds:
        assert e.dim() == 2 and e.dtype == served.dtype and e.shape[-1] == served.config.hidden_size
        out = served.generate(
            inputs_embeds=e[None],
            attention_mask=torch.ones(1, e.shape[0], dtype=torch.long),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        got.append(tokenizer.decode(out[0], skip_special_tokens=True).strip())
    assert got == expected
    # The slots matter: the same prompt with the slots holding plain token embeddings decodes differently.
    prompts = peft_ctx.serving.serving_prompts(model, tokenizer, QUESTIONS, PASSAGES, encoder=enc)
    assert all(p.slot_mask.any() for p in prompts)
    base_embeds = served.get_input_embeddings()(prompts[0].input_ids)
    assert torch.equal(base_embeds[~prompts[0].slot_mask], prompts[0].embeds[~prompts[0].slot_mask])
    assert not torch.allclose(base_embeds[prompts[0].slot_mask], prompts[0].embeds[prompts[0].slot_mask])


@pytest.mark.parametrize("method", TINY_ROWS)
def test_prompt_embeds_of_a_batch_equal_the_per_question_ones(method, built, tokenizer, encoder):
    model, _, _ = built(method, "llama")
    enc = encoder_for(model, encoder)
    batch = peft_ctx.prompt_embeds(model, tokenizer, QUESTIONS, PASSAGES, encoder=enc)
    for i, question in enumerate(QUESTIONS):
        (single,) = peft_ctx.prompt_embeds(model, tokenizer, [question], [PASSAGES[i]], encoder=enc)
        # COCOM compresses the batch's passages together (padded): float noise only.
        torch.testing.assert_close(batch[i], single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["cocom", "cocom_separate", "cocom_light"])
def test_cocom_export_has_the_decoder_lora_merged(method, built, tokenizer, encoder):
    model, served, out = built(method, "llama")
    with open(f"{out}/{peft_ctx.serving.SERVING_FILE}") as f:
        info = json.load(f)
    assert info["lora_merged"] is True and info["method"] == "cocom"
    assert model.base_model.merged_lora_adapters() == []  # the user's model is left unmerged
    (embeds,) = peft_ctx.prompt_embeds(model, tokenizer, QUESTIONS[:1], PASSAGES[:1])
    # Passages compressed beforehand, as a server holds them: a separate compressor LoRA cannot run merged.
    index = peft_ctx.compress(model, tokenizer, PASSAGES[0])
    model.base_model.merge_adapter()
    try:
        inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS[:1], index.select([[0, 1]]))
        with torch.no_grad():
            merged_logits = model(**inputs).logits[0]
    finally:
        model.base_model.unmerge_adapter()
    with torch.no_grad():
        served_logits = served(inputs_embeds=embeds[None]).logits[0]
    torch.testing.assert_close(served_logits, merged_logits, rtol=1e-4, atol=1e-4)
    # and the export is not the plain base: the merged LoRA changes its logits
    base = AutoModelForCausalLM.from_config(served.config)
    base.load_state_dict(_base_state(model), strict=False)
    with torch.no_grad():
        assert not torch.allclose(base(inputs_embeds=embeds[None]).logits[0], served_logits, atol=1e-3)


def _base_state(model):
    return peft_ctx.serving.export._served_state_dict(model.get_base_model())


def test_xrag_and_spring_exports_are_the_unchanged_base(built, tokenizer):
    for method in ("xrag", "spring"):
        model, served, out = built(method, "qwen2")
        reference = tiny_model("qwen2", tokenizer, seed=0, initializer_range=0.2)
        for name, tensor in reference.state_dict().items():
            assert torch.equal(served.state_dict()[name], tensor), name


def test_embeddings_of_another_adapter_are_refused_on_an_export(built, tokenizer, encoder_dir, tmp_path):
    model, _, out = built("xrag", "llama")
    peft_ctx.check_export(model, out)  # its own export passes
    other = tiny_adapter("xrag", "llama", tokenizer, encoder_dir, seed=5)
    with pytest.raises(ValueError, match="made for another xrag adapter"):
        peft_ctx.check_export(other, out)
    spring, _, _ = built("spring", "llama")
    with pytest.raises(ValueError, match="serves 'xrag' embeddings, but the active adapter is 'spring'"):
        peft_ctx.check_export(spring, out)
    with pytest.raises(ValueError, match="has no peft_ctx_serving.json"):
        peft_ctx.check_export(model, str(tmp_path))


def test_a_trained_step_changes_the_fingerprint(built, tokenizer):
    model, _, out = built("spring", "gpt2")
    before = peft_ctx.serving.adapter_fingerprint(model)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(0.01)
    assert peft_ctx.serving.adapter_fingerprint(model) != before
    with pytest.raises(ValueError, match="made for another spring adapter"):
        peft_ctx.check_export(model, out)


def test_export_never_overwrites_without_asking(built, tokenizer, tmp_path):
    model, _, _ = built("spring", "llama")
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        peft_ctx.export_for_serving(model, str(tmp_path))
    assert (tmp_path / "keep.txt").read_text() == "mine"
