"""Published compressors converted by ``peft_ctx.convert`` against what their own code gives (issue 25).

``tests/fixtures/published/make_fixtures.py`` wrote, per family, a tiny checkpoint in the published layout and ran
the release's code on it (the release repositories as they are, transformers 4.40): the decoder's prompt ids, its
logits at every prompt position and its greedy tokens. Here the checkpoint is converted, loaded with plain
``PeftModel.from_pretrained`` onto the tiny base, and must render the same ids, give the same logits over the base
vocabulary (fp32, rtol 1e-4) and the same greedy tokens, through torch and through the llama.cpp engine.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_ctx
from peft_ctx.convert import main as convert_cli

FIXTURES = Path(__file__).parent / "fixtures" / "published"
BASE = FIXTURES / "base"
FAMILIES = ("spring", "xrag", "clara")
# CLaRa's code left-pads each passage to one length before compressing it; the padded attention sums in another order
# and the short passage's embeddings differ by ~1.5e-6 from ours (unpadded), which the tiny random decoder (weights of
# std 0.2) amplifies to ~1.5e-4 in logits of ~6. Given the same embeddings the decoder agrees exactly: see
# test_clara_compresses_like_its_code_and_decodes_its_embeddings_exactly.
END_TO_END_ATOL = {"clara": 5e-4}


def expected(family: str) -> dict:
    record = json.loads((FIXTURES / family / "expected.json").read_text())
    record["logits"] = load_file(FIXTURES / family / "expected.safetensors")["logits"]
    return record


def contexts(family: str, record: dict) -> list:
    """The documents as the reference read them: xRAG's as their retriever vectors, the others' as text."""
    if family == "xrag":
        vectors = load_file(FIXTURES / "xrag" / "inputs.safetensors")["retrieval_embeds"]  # [n_docs, d_r]
        return [[vector.unsqueeze(0) for vector in vectors]]
    return [record["passages"]]


@pytest.fixture(scope="module")
def fixture_tokenizer():
    return AutoTokenizer.from_pretrained(BASE)


def base_model():
    return AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each family's fixture converted by the command line, the family recognised from its files."""
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family) / "adapter"
        convert_cli([str(FIXTURES / family / "checkpoint"), str(folder), "--base_model", str(BASE)])
        out[family] = folder
    return out


def slot_ids(inputs: dict) -> list[int]:
    """The prompt's ids with each context slot as -1 (the fixtures' placeholder positions)."""
    ids, mask = inputs["input_ids"][0].tolist(), inputs["context_mask"][0].tolist()
    return [-1 if slot else token for token, slot in zip(ids, mask)]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_converted_checkpoint_gives_its_reference_codes_ids_logits_and_tokens(family, converted, fixture_tokenizer):
    record = expected(family)
    model = PeftModel.from_pretrained(base_model(), converted[family])
    assert model.active_peft_config.method == peft_ctx.convert.families()[family].method
    docs = contexts(family, record)
    inputs = peft_ctx.prepare_inputs(model, fixture_tokenizer, [record["question"]], docs)
    assert slot_ids(inputs) == record["prompt_ids"]
    with torch.no_grad():
        logits = model(**inputs).logits[0]  # [seq, base vocab]
    torch.testing.assert_close(logits, record["logits"], rtol=1e-4, atol=END_TO_END_ATOL.get(family, 1e-5))
    new = model.generate(**inputs, max_new_tokens=len(record["greedy_tokens"]), do_sample=False)
    assert new[0, inputs["input_ids"].shape[1] :].tolist() == record["greedy_tokens"]
    answer = peft_ctx.generate(model, fixture_tokenizer, [record["question"]], docs, max_new_tokens=8)
    assert answer == [fixture_tokenizer.decode(record["greedy_tokens"], skip_special_tokens=True).strip()]


def test_clara_compresses_like_its_code_and_decodes_its_embeddings_exactly(converted, fixture_tokenizer):
    record = expected("clara")
    reference = load_file(FIXTURES / "clara" / "compressed.safetensors")["compressed"]  # [passages, k, hidden]
    model = PeftModel.from_pretrained(base_model(), converted["clara"])
    config = model.active_peft_config
    inputs = peft_ctx.prepare_inputs(model, fixture_tokenizer, [record["question"]], [record["passages"]])
    # Its compressor input is <ENC> + these ids (+ memory tokens), the short passage left-padded.
    for ids, length, theirs in zip(
        inputs["cocom_passage_ids"], inputs["cocom_passage_lengths"], record["compressor_ids"]
    ):
        assert theirs[-(int(length) + 1 + 4) : -4][1:] == ids[: int(length)].tolist()
    with torch.no_grad():
        ours = peft_ctx.get_method("cocom").compress(
            model.base_model, "default", config, inputs["cocom_passage_ids"], inputs["cocom_passage_lengths"]
        )
    ours = ours.reshape(reference.shape)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-4, atol=1e-5)  # the long passage: no padding there
    torch.testing.assert_close(ours[1], reference[1], rtol=1e-4, atol=1e-5)  # the left-padded one: ~1.5e-6
    stored = {k: v for k, v in inputs.items() if k not in ("cocom_passage_ids", "cocom_passage_lengths")}
    stored["cocom_context_embeds"] = reference.reshape(-1, reference.shape[-1])
    with torch.no_grad():
        logits = model(**stored).logits[0]
    # Bit-equal on the AMX Xeon the fixture was made on; through MKL's AVX2 gemm (an EPYC's path, `make test-avx2`)
    # the same embeddings give logits up to 9.6e-5 apart (of ~6; the tiny decoder's weights of std 0.2 amplify
    # rounding), so the fixture is compared within rtol 1e-4 plus that, doubled.
    torch.testing.assert_close(logits, record["logits"], rtol=1e-4, atol=2e-4)


def test_the_fixtures_would_catch_a_prompt_one_newline_short(converted, fixture_tokenizer):
    """SPRING's earlier converter wrote one newline between the passages and the virtual tokens; the release, two."""
    record = expected("spring")
    model = PeftModel.from_pretrained(base_model(), converted["spring"])
    model.active_peft_config.prompt_template = "{context}{virtual}Question: {question}\nAnswer:"
    inputs = peft_ctx.prepare_inputs(model, fixture_tokenizer, [record["question"]], contexts("spring", record))
    assert slot_ids(inputs) != record["prompt_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_converted_checkpoint_serves_its_prompt_embeddings_and_through_llama_cpp(
    family, converted, fixture_tokenizer, tmp_path
):
    record = expected(family)
    model = PeftModel.from_pretrained(base_model(), converted[family])
    docs = contexts(family, record)
    embeds = peft_ctx.prompt_embeds(model, fixture_tokenizer, [record["question"]], docs)[0]  # [seq, hidden]
    with torch.no_grad():
        logits = model.get_base_model()(inputs_embeds=embeds.unsqueeze(0)).logits[0]
    torch.testing.assert_close(logits, record["logits"], rtol=1e-4, atol=END_TO_END_ATOL.get(family, 1e-5))

    if os.environ.get("PEFT_CTX_REQUIRE_ENGINES") != "1":
        pytest.importorskip("llama_cpp", reason="llama-cpp-python is not built here (make install builds it)")
    from peft_ctx.serving import to_gguf

    peft_ctx.export_for_serving(model, str(tmp_path / "export"), tokenizer=fixture_tokenizer)
    # f32 weights: the engine then differs from torch by summation order only (~1e-6, on any CPU), far below the
    # fixtures' top-2 logit gaps (0.44-0.99), so the greedy answers compare exactly; f16 rounding would not be.
    engine = peft_ctx.LlamaCppEngine(to_gguf(str(tmp_path / "export"), "f32"))
    try:
        served = peft_ctx.generate(
            model, fixture_tokenizer, [record["question"]], docs, engine=engine, max_new_tokens=8
        )
    finally:
        engine.close()
    assert served == peft_ctx.generate(model, fixture_tokenizer, [record["question"]], docs, max_new_tokens=8)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_card_records_source_licence_paper_and_command(family, converted):
    card = (converted[family] / "README.md").read_text()
    assert "## Converted from a published checkpoint" in card and "nothing was trained" in card
    assert f"`python -m peft_ctx.convert {FIXTURES / family / 'checkpoint'}" in card
    assert "arXiv:" in card and peft_ctx.__version__ in card
    provenance = json.loads((converted[family] / "conversion.json").read_text())
    assert provenance["family"] == family and provenance["source"].endswith("checkpoint")
    pickled = "read with `torch.load(weights_only=True)`" in card  # SPRING's tensor, CLaRa's two .pth files
    if family == "spring":
        assert "license: mit" in card and pickled
    elif family == "clara":
        assert "license: other" in card and "apple-amlr" in card and pickled
        assert "`adapters.pth` (pickled tensors" in card and "`decoder_first_last_layers.pth` (pickled" in card
        assert "a passage of up to 34 tokens becomes 4 context embeddings and a <SEP>" in card  # not ceil(n / 8)
    else:
        assert "license:" not in card.split("---")[1] and "no licence file" in card and not pickled


class Payload:
    """Any Python object beside the tensors: the pickle a checkpoint must not carry."""


# ---- bad input ------------------------------------------------------------------------------------------------


def test_a_folder_of_no_known_family_is_refused_naming_what_each_family_needs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"not a checkpoint of any family .*xrag: .*spring: .*--family"):
        peft_ctx.convert(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="does not exist"):
        peft_ctx.convert(str(tmp_path / "missing"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="family='pisco-x' is not one peft_ctx converts"):
        peft_ctx.convert(str(tmp_path), str(tmp_path / "out"), family="pisco-x")
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_kept_unless_overwrite_and_kept_when_conversion_fails(tmp_path):
    source = FIXTURES / "spring" / "checkpoint"
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        peft_ctx.convert(str(source), str(out))
    broken = tmp_path / "broken"
    shutil.copytree(FIXTURES / "xrag" / "checkpoint", broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["projector.projector.0.weight"] = tensors["projector.projector.0.weight"][:, :5].contiguous()  # mis-shaped
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"first projector layer has shape \(64, 5\)"):
        peft_ctx.convert(str(broken), str(out), overwrite=True)
    assert (out / "mine.txt").read_text() == "keep me" and sorted(os.listdir(out)) == ["mine.txt"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".peft_ctx-convert-")]  # no staging left behind
    peft_ctx.convert(str(source), str(out), overwrite=True, base_model_name_or_path=str(BASE))
    assert not (out / "mine.txt").exists() and (out / "adapter_model.safetensors").is_file()


def test_missing_tensors_a_wider_base_and_a_pickle_with_objects_are_refused(tmp_path, tokenizer):
    from tests.helpers import tiny_model

    no_projector = tmp_path / "no_projector"
    shutil.copytree(FIXTURES / "xrag" / "checkpoint", no_projector)
    tensors = {k: v for k, v in load_file(no_projector / "model.safetensors").items() if "projector" not in k}
    save_file(tensors, no_projector / "model.safetensors")
    with pytest.raises(ValueError, match="No projector weights"):
        peft_ctx.convert(str(no_projector), str(tmp_path / "out"))

    wide = str(tmp_path / "wide")
    tiny_model("llama", tokenizer, hidden_size=96).save_pretrained(wide)
    for family in FAMILIES:
        with pytest.raises(ValueError, match=r"64-d .* has hidden size 96"):
            peft_ctx.convert(
                str(FIXTURES / family / "checkpoint"), str(tmp_path / "out"), base_model_name_or_path=wide
            )

    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"tokens": torch.zeros(4, 64), "payload": Payload()}, evil / "m.added_token_embeddings.pt")
    with pytest.raises(ValueError, match="will not unpickle"):
        peft_ctx.convert(str(evil), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_clara_checkpoints_it_cannot_convert_exactly_are_refused_naming_the_file(tmp_path):
    def copy(name):
        folder = tmp_path / name
        shutil.copytree(FIXTURES / "clara" / "checkpoint", folder)
        return folder

    extra = copy("extra")
    adapters = torch.load(extra / "adapters.pth", weights_only=True)
    adapters["some_other_adapter"] = adapters["encoder_adapter"]
    torch.save(adapters, extra / "adapters.pth")
    with pytest.raises(ValueError, match=r"adapters.pth holds the LoRAs .*unexpected \['some_other_adapter'\]"):
        peft_ctx.convert(str(extra), str(tmp_path / "out"))

    separate = copy("separate")
    settings = json.loads((separate / "config.json").read_text())
    (separate / "config.json").write_text(json.dumps({**settings, "compr_model_name": "meta-llama/Llama-3.2-1B"}))
    with pytest.raises(ValueError, match="names a separate compressor model"):
        peft_ctx.convert(str(separate), str(tmp_path / "out"))

    no_layers = copy("no_layers")
    (no_layers / "decoder_first_last_layers.pth").unlink()
    with pytest.raises(ValueError, match="has no decoder_first_last_layers.pth"):
        peft_ctx.convert(str(no_layers), str(tmp_path / "out"))

    with pytest.raises(ValueError, match="embedding_module: not a setting of a CLaRa conversion"):
        convert_cli([str(FIXTURES / "clara" / "checkpoint"), str(tmp_path / "out"), "--embedding_module", "x.y"])

    evil = copy("evil")
    torch.save({"encoder_adapter": {}, "decoder_adapter": {}, "note": Payload()}, evil / "adapters.pth")
    with pytest.raises(ValueError, match="will not unpickle"):
        peft_ctx.convert(str(evil), str(tmp_path / "out"))

    narrow = copy("narrow")
    layers = torch.load(narrow / "decoder_first_last_layers.pth", weights_only=True)
    layers["model.embed_tokens.weight"] = layers["model.embed_tokens.weight"][:300]
    torch.save(layers, narrow / "decoder_first_last_layers.pth")
    with pytest.raises(ValueError, match="the embedding has 300 rows"):
        peft_ctx.convert(str(narrow), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_clara_config_without_pure_inference_decodes_as_its_loading_does_without_the_decoder_lora(
    fixture_tokenizer, tmp_path
):
    """CLaRa.from_pretrained skips a stage1_2 checkpoint's stored decoder_adapter unless config.json says
    pure_inference; the fixture script ran its code on such a copy too."""
    record = expected("clara")
    variant = tmp_path / "variant"
    shutil.copytree(FIXTURES / "clara" / "checkpoint", variant)
    settings = json.loads((variant / "config.json").read_text())
    del settings["pure_inference"]
    (variant / "config.json").write_text(json.dumps(settings))
    with pytest.warns(UserWarning, match="leaves its decoder_adapter unused"):
        peft_ctx.convert(str(variant), str(tmp_path / "adapter"), base_model_name_or_path=str(BASE))
    model = PeftModel.from_pretrained(base_model(), tmp_path / "adapter")
    inputs = peft_ctx.prepare_inputs(model, fixture_tokenizer, [record["question"]], [record["passages"]])
    want = load_file(FIXTURES / "clara" / "expected_without_pure_inference.safetensors")["logits"]
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=END_TO_END_ATOL["clara"])
    assert not torch.allclose(want, record["logits"], atol=1e-2)  # the decoder LoRA matters in this fixture
    new = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert new.tolist() == record["without_pure_inference"]["greedy_tokens"]


def test_clara_end_to_end_retrieves_by_memory_states_as_its_code_does(fixture_tokenizer, tmp_path):
    """apple/ml-clara's generate_from_questions on a tiny end-to-end checkpoint (make_fixtures.py, family clara_e2e):
    each question's query states (its query LoRA), each document's states (its encoder LoRA), the cosine scores and
    the top-2 order; then the chosen documents' states, best first, in its prompt, and its greedy tokens. The
    converted adapter searches an index of each question's documents and gives the same."""
    folder = FIXTURES / "clara_e2e"
    record = json.loads((folder / "expected.json").read_text())
    tensors = load_file(folder / "expected.safetensors")
    convert_cli([str(folder / "checkpoint"), str(tmp_path / "adapter"), "--base_model", str(BASE)])
    model = PeftModel.from_pretrained(base_model(), tmp_path / "adapter").eval()
    assert model.active_peft_config.query_adapter
    # States of values up to 3.4: within 6e-6 of the reference's on an AMX Xeon; MKL's AVX2 gemm rounds the document
    # states up to 8.5e-5 apart (MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2, 1 thread), hence atol 2e-4.
    # The scores then differ by 3.5e-6 at most, far below the 0.01 gaps between the ranked documents.
    queries = peft_ctx.cocom.query_states(model, fixture_tokenizer, record["questions"])
    torch.testing.assert_close(queries, tensors["query_states"], rtol=1e-4, atol=2e-4)
    for i, (question, documents) in enumerate(zip(record["questions"], record["documents"])):
        index = peft_ctx.cocom.compress(model, fixture_tokenizer, documents)
        states = index.embeddings.view(len(documents), *tensors["query_states"].shape[1:])
        torch.testing.assert_close(states, tensors["document_states"][i], rtol=1e-4, atol=2e-4)
        found = index.search(model, fixture_tokenizer, [question], k=record["generation_top_k"])
        assert found.ids == [record["topk_indices"][i]]
        torch.testing.assert_close(
            torch.tensor(found.scores[0]), tensors["scores"][i, found.ids[0]], rtol=1e-4, atol=1e-5
        )
        inputs = peft_ctx.prepare_inputs(model, fixture_tokenizer, [question], index.select(found.ids))
        real = [t for t, keep in zip(record["prompt_ids"][i], record["prompt_attention_mask"][i]) if keep]
        assert slot_ids(inputs) == real
        new = model.generate(**inputs, max_new_tokens=len(record["greedy_tokens"][i]), do_sample=False)
        assert new[0, inputs["input_ids"].shape[1] :].tolist() == record["greedy_tokens"][i]
