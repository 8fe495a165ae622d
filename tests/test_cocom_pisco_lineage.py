"""COCOM's settings for the PISCO lineage's checkpoints (PISCO, CLaRa), which ``peft_ctx.convert`` sets: a fixed number
of memory tokens per passage, the compressor reading <ENC> BOS passage EOS truncated as one sequence at the positions
of a left-padded input, and a <SEP> after each passage's embeddings. On tiny random models with SmolLM2's tokenizer;
``tests/test_published.py`` checks them against CLaRa's own code."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import peft_ctx
from peft_ctx.cocom import CocomConfig, CompressedIndex
from peft_ctx.cocom.convert import PISCO_LINEAGE
from tests.helpers import clone, load_train_script
from tests.test_cocom import PASSAGES, QUESTIONS, captured_embeddings, cocom_model, module_of

LINEAGE = dict(memory_tokens_per_passage=3, **PISCO_LINEAGE)


def lineage_model(arch, tokenizer, seed=0, **overrides):
    return cocom_model(arch, tokenizer, seed=seed, **{**LINEAGE, **overrides})


def test_every_passage_gets_the_fixed_memory_tokens_then_its_sep(tokenizer):
    model, _ = lineage_model("llama", tokenizer)
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES)
    n_passages = [len(p) for p in PASSAGES]
    assert inputs["context_mask"].sum(1).tolist() == [n * (3 + 1) for n in n_passages]
    module = module_of(model)
    embeds, mask = captured_embeddings(model, inputs), inputs["context_mask"]
    # Every fourth slot of a row is the passage's <SEP>, the learned marker.
    for row in range(len(QUESTIONS)):
        slots = embeds[row][mask[row]].reshape(n_passages[row], 4, -1)
        for passage in slots:
            assert torch.equal(passage[3], module.sep_marker[0].to(passage.dtype))


def test_the_compressor_reads_bos_passage_eos_truncated_as_one_sequence_at_left_padded_positions(tokenizer):
    model, _ = lineage_model("llama", tokenizer, max_passage_tokens=14)
    config = model.active_peft_config
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS[:1], PASSAGES[:1])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    long, short = (tokenizer(p, add_special_tokens=False).input_ids for p in PASSAGES[0])
    assert len(long) > 14 > len(short) + 2
    ids, lengths = inputs["cocom_passage_ids"], inputs["cocom_passage_lengths"].tolist()
    assert lengths == [14, len(short) + 2]
    assert ids[0, :14].tolist() == ([bos] + long)[:14]  # the long passage loses its EOS
    assert ids[1, : lengths[1]].tolist() == [bos] + short + [eos]
    # What the PISCO lineage's code computes: the input left-padded to max_passage_tokens + 1 (masked pads), no
    # position ids, the memory tokens after it; its last hidden states at the memory tokens.
    module, layer = module_of(model), model.get_base_model().get_input_embeddings()
    expected = []
    with torch.no_grad():
        for row, n in zip(ids, lengths):
            pad = 14 - n
            sequence = torch.cat(
                [torch.zeros(pad, 64), module.enc_marker, layer.base_layer(row[:n]), module.memory]
            ).unsqueeze(0)
            attention = torch.tensor([[0] * pad + [1] * (1 + n + 3)])
            method = peft_ctx.get_method("cocom")
            with method._compressor_lora(model.get_base_model(), "default", config):
                hidden = model.get_base_model().model(inputs_embeds=sequence, attention_mask=attention)
            expected.append(hidden.last_hidden_state[0, -3:])
        compressed = method.compress(model.base_model, "default", config, ids, inputs["cocom_passage_lengths"])
    torch.testing.assert_close(compressed, torch.cat(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_save_load_round_trip_and_batching_are_exact(arch, tokenizer, tmp_path):
    model, reference = lineage_model(arch, tokenizer)
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(clone(reference), tmp_path)
    assert isinstance(loaded.active_peft_config, CocomConfig) and loaded.active_peft_config.passage_end_token
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
    batched = peft_ctx.generate(loaded, tokenizer, QUESTIONS, PASSAGES, max_new_tokens=3)
    single = [peft_ctx.generate(loaded, tokenizer, [q], [c], max_new_tokens=3)[0] for q, c in zip(QUESTIONS, PASSAGES)]
    assert batched == single


def test_an_index_carries_the_fixed_memory_tokens_and_generates_as_from_text(tokenizer, tmp_path):
    model, _ = lineage_model("llama", tokenizer, seed=3)
    corpus = [p for ps in PASSAGES for p in ps]
    index = CompressedIndex.load(peft_ctx.compress(model, tokenizer, corpus).save(str(tmp_path / "i.safetensors")))
    assert index.embeddings.shape[0] == 3 * len(corpus)
    selected = index.select([[0, 1], [2], [3, 4, 5]])
    assert peft_ctx.generate(model, tokenizer, QUESTIONS, selected, max_new_tokens=5) == peft_ctx.generate(
        model, tokenizer, QUESTIONS, PASSAGES, max_new_tokens=5
    )
    plain, _ = cocom_model("llama", tokenizer, seed=3, memory_tokens_per_passage=3)
    assert peft_ctx.cocom.adapter_fingerprint(plain) != peft_ctx.cocom.adapter_fingerprint(model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"memory_tokens_per_passage": 0}, "memory_tokens_per_passage=0"),
        ({"passage_truncation": "middle"}, "passage_truncation='middle'"),
        ({"passage_truncation": "sequence"}, "set passage_special_tokens=True with it"),
        ({"compressor_positions": "right"}, "compressor_positions='right'"),
        ({"passage_end_token": True, "compressor": "some/encoder"}, "passage_end_token set the LLM compressor"),
        ({"memory_tokens_per_passage": 2, "residual_pooling": True}, "Use one or the other"),
    ],
)
def test_bad_lineage_settings_are_named_in_the_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CocomConfig(**kwargs)


# ---- CLaRa's end-to-end retrieval by memory states (query_adapter) -------------------------------------------------
CORPUS = [p for ps in PASSAGES for p in ps] + ["An unrelated passage about the weather in the hills."]


def test_a_query_lora_compresses_questions_and_search_ranks_by_the_cosine_of_flattened_states(tokenizer, tmp_path):
    """query_adapter=True adds a third LoRA: a question goes through the compressor's path with it (as a passage does
    with the compressor LoRA); search ranks the index's passages by the cosine between the question's and each
    passage's states, flattened; the index (and its fingerprint) does not depend on the query LoRA."""
    model, _ = lineage_model("llama", tokenizer, query_adapter=True)
    config = model.active_peft_config
    assert config.query_adapter
    names = {n for n, _ in model.named_parameters()}
    assert any(".lora_A.default__query." in n for n in names) and any(
        ".lora_A.default__compressor." in n for n in names
    )
    index = peft_ctx.cocom.compress(model, tokenizer, CORPUS)
    fingerprint = peft_ctx.cocom.adapter_fingerprint(model)
    states = peft_ctx.cocom.retrieval.query_states(model, tokenizer, QUESTIONS)  # [q, 3, hidden]
    # The same question through the compressor LoRA instead: other states (the query LoRA is its own).
    as_passages = peft_ctx.cocom.compress(model, tokenizer, QUESTIONS).embeddings.view(len(QUESTIONS), 3, -1)
    assert not torch.allclose(states, as_passages)
    # The query path is the passages' path with the query LoRA in the compressor LoRA's place: a copy whose
    # compressor LoRA holds the query LoRA's weights compresses the questions as passages into the same states.
    swapped = clone(model)
    with torch.no_grad():
        params = dict(swapped.named_parameters())
        for name, param in params.items():
            if ".default__compressor." in name:
                param.copy_(params[name.replace(".default__compressor.", ".default__query.")])
    by_hand = peft_ctx.cocom.compress(swapped, tokenizer, QUESTIONS).embeddings.view(len(QUESTIONS), 3, -1)
    torch.testing.assert_close(states, by_hand, rtol=0, atol=0)
    found = index.search(model, tokenizer, QUESTIONS, k=2)
    flat_q, flat_p = states.flatten(1), index.embeddings.view(len(CORPUS), -1)
    cosine = torch.nn.functional.cosine_similarity(flat_q[:, None], flat_p[None], dim=-1)  # [q, N]
    for row, (ids, scores) in enumerate(zip(found.ids, found.scores)):
        assert ids == cosine[row].argsort(descending=True)[:2].tolist()
        torch.testing.assert_close(torch.tensor(scores), cosine[row, ids], rtol=1e-5, atol=1e-6)
    within = index.search(model, tokenizer, QUESTIONS[:1], k=1, candidates=[[4, 5]])
    assert within.ids[0][0] in (4, 5)
    answers = peft_ctx.generate(model, tokenizer, QUESTIONS, index.select(found.ids), max_new_tokens=2)
    assert peft_ctx.generate(model, tokenizer, QUESTIONS, index, retrieve_k=2, max_new_tokens=2) == answers
    # Saved and loaded: the query LoRA travels in the adapter; the index stays valid.
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(clone(model.get_base_model()).requires_grad_(False), tmp_path)
    assert peft_ctx.cocom.adapter_fingerprint(loaded) == fingerprint


def test_search_needs_a_query_lora_and_the_adapters_own_index(tokenizer):
    model, _ = lineage_model("llama", tokenizer)
    index = peft_ctx.cocom.compress(model, tokenizer, CORPUS)
    with pytest.raises(ValueError, match="query LoRA"):
        index.search(model, tokenizer, QUESTIONS, k=2)
    with pytest.raises(ValueError, match="query LoRA"):
        peft_ctx.generate(model, tokenizer, QUESTIONS, index)
    with pytest.raises(ValueError, match="retrieve_k"):
        peft_ctx.generate(model, tokenizer, QUESTIONS, [p[:1] for p in PASSAGES], retrieve_k=2)
    with pytest.raises(ValueError, match="query_adapter=True"):
        CocomConfig(query_adapter=True)
    other, _ = lineage_model("llama", tokenizer, seed=3, query_adapter=True)
    with pytest.raises(ValueError, match="another adapter"):
        index.search(other, tokenizer, QUESTIONS, k=2)


def test_the_training_script_makes_a_pisco_lineage_adapter(trainable_base_dir, monkeypatch):
    script = load_train_script("cocom", monkeypatch)
    args = script.ScriptArguments(
        model_name_or_path=str(trainable_base_dir), dataset_name="qa.jsonl", stage="qa", compression_rate=4,
        max_passage_tokens=16, memory_tokens_per_passage=4, pisco_lineage=True, lora_r=2,
    )  # fmt: skip
    config = script.build_model(args).active_peft_config
    assert {key: getattr(config, key) for key in PISCO_LINEAGE} == PISCO_LINEAGE
    assert config.memory_tokens_per_passage == 4
