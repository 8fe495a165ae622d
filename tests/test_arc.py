"""ARC-Encoder's compressor (peft_ctx.cocom.arc) against the reference code's outputs on a tiny checkpoint in the
published layout (tests/fixtures/published/make_arc_fixture.py ran kyutai-labs/ARC-Encoder's encoder and bridge)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModel

import peft_ctx
from peft_ctx.cocom.arc import ArcEncoder, from_reference_state_dict, pooling_groups, reference_config
from tests.helpers import tiny_model

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
