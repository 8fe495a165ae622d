"""xRAG on tiny random models of every supported architecture, with SmolLM2's real tokenizer (what every method's
adapter keeps, save / load, batching, the KV cache ...: tests/test_contract.py)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftConfig, get_peft_model

import peft_ctx
from peft_ctx.layer import ContextEmbedding
from tests.helpers import ARCHITECTURES, RETRIEVER_DIM, captured_embeddings, clone, tiny_model

QUESTIONS = ["Who wrote the report?", "Where is the lighthouse?", "When did the river flood?"]


def xrag_model(arch, tokenizer, seed=0, **config_kwargs):
    base = tiny_model(arch, tokenizer, seed=seed)
    reference = clone(base)
    config = peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM, **config_kwargs)
    return get_peft_model(base, config), reference


def random_vectors(counts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, RETRIEVER_DIM, generator=generator) for n in counts]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_only_the_projector_trains_and_the_slots_hold_its_projected_vectors(arch, tokenizer):
    model, reference = xrag_model(arch, tokenizer)
    hidden = model.get_base_model().get_input_embeddings().weight.shape[1]
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == RETRIEVER_DIM * hidden + hidden + hidden * hidden + hidden  # mlp2x_gelu
    assert all(".ctx_modules.default.projector." in name for name in trainable)
    vectors = random_vectors([2, 1, 3])
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, vectors)
    layer = model.get_base_model().get_input_embeddings()
    assert isinstance(layer, ContextEmbedding)
    embeds, mask = captured_embeddings(model, inputs), inputs["context_mask"]
    base_embeds = reference.get_input_embeddings()(inputs["input_ids"])
    assert torch.equal(embeds[~mask], base_embeds[~mask])
    projector = layer.ctx_modules["default"]
    assert torch.equal(embeds[mask], projector(torch.cat(vectors)).detach())
    assert mask.sum(1).tolist() == [2, 1, 3]


def test_merging_the_adapter_is_refused_with_a_clear_message(tokenizer):
    model, _ = xrag_model("llama", tokenizer)  # (merge_and_unload, refused for every method: test_contract.py)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()


def test_text_documents_are_encoded_like_precomputed_vectors(tokenizer, encoder, tmp_path):
    model, _ = xrag_model("llama", tokenizer)
    docs = [["The lighthouse stands on Skerry Point.", "It was built in 1874."], ["The report was by Ada Obi."]]
    questions = QUESTIONS[:2]
    from_text = peft_ctx.prepare_inputs(model, tokenizer, questions, docs, encoder=encoder)
    vectors = encoder.encode([d for ds in docs for d in ds])
    path = tmp_path / "index.safetensors"
    peft_ctx.save_vectors(str(path), vectors, encoder=encoder)
    loaded, meta = peft_ctx.load_vectors(str(path))
    assert meta["retriever_hidden_size"] == RETRIEVER_DIM and meta["retriever_pooling"] == "mean"
    from_index = peft_ctx.prepare_inputs(model, tokenizer, questions, [loaded[:2], loaded[2:]])
    for key in from_text:
        assert torch.equal(from_text[key], from_index[key]), key
    assert peft_ctx.generate(model, tokenizer, questions, docs, encoder=encoder, max_new_tokens=3) == (
        peft_ctx.generate(model, tokenizer, questions, [loaded[:2], loaded[2:]], max_new_tokens=3)
    )


def test_prompts_go_through_the_chat_template(tokenizer):
    model, _ = xrag_model("llama", tokenizer)
    inputs = peft_ctx.prepare_inputs(model, tokenizer, ["Who?"], random_vectors([2]))
    text = tokenizer.decode(inputs["input_ids"][0][~inputs["context_mask"][0]])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "Question: Who?" in text
    no_chat, _ = xrag_model("llama", tokenizer, use_chat_template=False)
    plain = peft_ctx.prepare_inputs(no_chat, tokenizer, ["Who?"], random_vectors([2]))
    assert "<|im_start|>" not in tokenizer.decode(plain["input_ids"][0])


# ---- bad input ------------------------------------------------------------------------------------------------


def test_placeholder_and_vector_count_mismatch_is_an_error(tokenizer):
    model, _ = xrag_model("llama", tokenizer)
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS[:2], random_vectors([1, 2]))
    inputs["retrieval_embeds"] = inputs["retrieval_embeds"][:2]
    with pytest.raises(ValueError, match="3 document placeholders but 2 retrieval vectors"):
        model(**inputs)


def test_wrong_vector_dimension_names_both_sizes(tokenizer, encoder):
    model, _ = xrag_model("llama", tokenizer)
    with pytest.raises(ValueError, match=f"dimension 7 .* retriever_hidden_size={RETRIEVER_DIM}"):
        peft_ctx.prepare_inputs(model, tokenizer, ["q?"], [torch.randn(1, 7)])
    other = get_peft_model(tiny_model("llama", tokenizer), peft_ctx.XRAGConfig(retriever_hidden_size=16))
    with pytest.raises(ValueError, match=f"makes {RETRIEVER_DIM}-d vectors .* trained with 16-d"):
        peft_ctx.prepare_inputs(other, tokenizer, ["q?"], [["a document"]], encoder=encoder)


def test_missing_vectors_are_an_error(tokenizer):
    model, _ = xrag_model("llama", tokenizer)
    inputs = peft_ctx.prepare_inputs(model, tokenizer, ["q?"], random_vectors([1]))
    del inputs["retrieval_embeds"]
    with pytest.raises(ValueError, match="no retrieval_embeds were given"):
        model(**inputs)
    with pytest.raises(ValueError, match="no encoder was given"):
        peft_ctx.prepare_inputs(model, tokenizer, ["q?"], [["some text"]])


def test_empty_document_list_is_an_error(tokenizer):
    model, _ = xrag_model("llama", tokenizer)
    with pytest.raises(ValueError, match="Example 1 has an empty document list"):
        peft_ctx.prepare_inputs(model, tokenizer, ["a?", "b?"], [[torch.randn(RETRIEVER_DIM)], []])
    with pytest.raises(ValueError, match="2 context lists for 1 questions"):
        peft_ctx.prepare_inputs(model, tokenizer, ["a?"], random_vectors([1, 1]))


def test_non_finite_vectors_are_an_error(tokenizer):
    model, _ = xrag_model("llama", tokenizer)
    vectors = random_vectors([2])
    vectors[0][1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"Retrieval vectors \[1\] contain NaN"):
        peft_ctx.prepare_inputs(model, tokenizer, ["q?"], vectors)


def test_text_containing_the_slot_marker_is_refused(tokenizer):
    model, _ = xrag_model("llama", tokenizer)
    with pytest.raises(ValueError, match="U\\+E000"):
        peft_ctx.prepare_inputs(model, tokenizer, ["what is \ue0000\ue001?"], random_vectors([1]))


def test_passing_inputs_embeds_with_context_slots_is_refused(tokenizer):
    model, _ = xrag_model("llama", tokenizer)
    inputs = peft_ctx.prepare_inputs(model, tokenizer, ["q?"], random_vectors([1]))
    embeds = model.get_base_model().get_input_embeddings()(inputs.pop("input_ids"))
    with pytest.raises(ValueError, match="never filled"):
        model(inputs_embeds=embeds, **inputs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "retriever_hidden_size=None"),
        ({"retriever_hidden_size": 0}, "retriever_hidden_size=0"),
        ({"retriever_hidden_size": 8, "projector_type": "linear"}, "projector_type='linear'"),
        ({"retriever_hidden_size": 8, "projector_type": "mlp0x_gelu"}, "at least one layer"),
        ({"retriever_hidden_size": 8, "task_type": "SEQ_CLS"}, "task_type='SEQ_CLS'"),
        ({"retriever_hidden_size": 8, "prompt_template": "Question: {question}"}, "missing: \\['context'\\]"),
        ({"retriever_hidden_size": 8, "retriever_pooling": "avg"}, "retriever_pooling='avg'"),
        ({"retriever_hidden_size": 8, "peft_ctx_version": "99.0.0"}, "newer than the installed"),
    ],
)
def test_bad_config_values_are_named_in_the_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peft_ctx.XRAGConfig(**kwargs)


def test_config_of_an_unknown_method_gives_a_clear_error(tmp_path):
    config = peft_ctx.XRAGConfig(retriever_hidden_size=8)
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["method"] = "teleport"
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="method 'teleport'"):
        PeftConfig.from_pretrained(tmp_path)


def test_projector_depth_follows_projector_type(tokenizer):
    base = tiny_model("llama", tokenizer)
    model = get_peft_model(base, peft_ctx.XRAGConfig(retriever_hidden_size=8, projector_type="mlp3x_gelu"))
    projector = model.get_base_model().get_input_embeddings().ctx_modules["default"].projector
    assert [type(m).__name__ for m in projector] == ["Linear", "GELU", "Linear", "GELU", "Linear"]


def test_peft_internals_that_changed_give_a_clear_error(monkeypatch):
    import aenum

    from peft_ctx import _registration

    def refuse(*args, **kwargs):
        raise TypeError("enum is frozen")

    monkeypatch.setattr(aenum, "extend_enum", refuse)
    monkeypatch.setattr(_registration, "PEFT_TYPE_NAME", "PEFT_CTX_NEXT")
    with pytest.raises(RuntimeError, match="could not add its adapter type 'PEFT_CTX_NEXT' .* enum is frozen"):
        _registration._extend_peft_type()
