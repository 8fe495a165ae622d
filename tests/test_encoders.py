"""peft_ctx.Encoder: sentence-transformers settings, poolings, normalisation, vector files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import peft_ctx
from tests.helpers import RETRIEVER_DIM

DOCS = ["The lighthouse stands on Skerry Point.", "Ada Obi wrote the report.", "Floods come in spring."]


def test_sentence_transformers_settings_are_read_from_the_model_folder(encoder, encoder_dir):
    assert encoder.pooling == "mean" and encoder.normalize is True
    assert encoder.hidden_size == RETRIEVER_DIM
    vectors = encoder.encode(DOCS)
    assert vectors.shape == (3, RETRIEVER_DIM)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3))


def test_mean_pooling_ignores_padding(encoder):
    together = encoder.encode(DOCS, batch_size=3)
    alone = torch.cat([encoder.encode([d]) for d in DOCS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "last_token", "max", "mean"])
def test_a_plain_transformers_encoder_takes_the_chosen_pooling(encoder_dir, tmp_path, pooling):
    plain = tmp_path / "plain"
    shutil.copytree(encoder_dir, plain, ignore=shutil.ignore_patterns("modules.json", "1_Pooling"))
    enc = peft_ctx.Encoder(str(plain), pooling=pooling)
    assert enc.pooling == pooling and enc.normalize is False
    batch = enc.tokenizer(DOCS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = enc.model(**batch).last_hidden_state
    lengths = batch["attention_mask"].sum(1)
    expected = {
        "cls": hidden[:, 0],
        "last_token": hidden[torch.arange(3), lengths - 1],
        "max": torch.stack([hidden[i, : lengths[i]].max(0).values for i in range(3)]),
        "mean": torch.stack([hidden[i, : lengths[i]].mean(0) for i in range(3)]),
    }[pooling]
    torch.testing.assert_close(enc.encode(DOCS), expected, atol=1e-5, rtol=1e-5)
    normalised = peft_ctx.Encoder(str(plain), pooling=pooling, normalize=True).encode(DOCS)
    torch.testing.assert_close(normalised, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5, rtol=1e-5)


def test_unknown_pooling_is_an_error_naming_it(encoder_dir):
    with pytest.raises(ValueError, match="pooling='avg' is not supported"):
        peft_ctx.Encoder(encoder_dir, pooling="avg")


def test_unsupported_sentence_transformers_module_is_an_error(encoder_dir, tmp_path):
    folder = tmp_path / "dense"
    shutil.copytree(encoder_dir, folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="has a 'Dense' module"):
        peft_ctx.Encoder(str(folder))


def test_bad_documents_are_errors(encoder):
    with pytest.raises(ValueError, match="single string"):
        encoder.encode("one document")
    with pytest.raises(ValueError, match="Document 1 is ''"):
        encoder.encode(["fine", ""])


def test_vector_files_round_trip_and_never_overwrite(encoder, tmp_path):
    vectors = encoder.encode(DOCS)
    path = str(tmp_path / "index.safetensors")
    peft_ctx.save_vectors(path, vectors, encoder=encoder)
    loaded, meta = peft_ctx.load_vectors(path)
    assert torch.equal(loaded, vectors)
    assert meta["retriever_name_or_path"] == encoder.name_or_path and meta["retriever_normalize"] is True
    with pytest.raises(FileExistsError):
        peft_ctx.save_vectors(path, vectors)
    peft_ctx.save_vectors(path, vectors[:1], overwrite=True)
    assert peft_ctx.load_vectors(path)[0].shape == (1, RETRIEVER_DIM)
    (tmp_path / "broken.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="broken.safetensors"):
        peft_ctx.load_vectors(str(tmp_path / "broken.safetensors"))
