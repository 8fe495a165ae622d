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


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_vector_index_stores_half_or_single_floats_per_rank_and_reads_by_row(
    encoder, tmp_path, dtype, monkeypatch
):
    from safetensors import safe_open

    from peft_ctx.vectors import VectorIndex, build_vector_index

    rows = [[DOCS[0], DOCS[1]], [DOCS[2]], [DOCS[1]], [DOCS[0], DOCS[2], DOCS[1]], [DOCS[2]]]
    folder = str(tmp_path / "index")
    # Two ranks, each encoding its own contiguous share: rank r takes rows [r n / 2, (r + 1) n / 2), 2 and 3 rows.
    shards = [build_vector_index(folder, rows, encoder, dtype=dtype, rank=r, world_size=2) for r in range(2)]
    n_vectors = sum(map(len, rows))
    bytes_per_vector = RETRIEVER_DIM * (2 if dtype == torch.float16 else 4)
    with safe_open(shards[0], framework="pt") as f:
        assert f.get_slice("vectors").get_dtype() == ("F16" if dtype == torch.float16 else "F32")
        assert f.get_slice("vectors").get_shape() == [3, RETRIEVER_DIM]  # rows 0-1: 2 + 1 passages
    stored = sum(safe_open(p, framework="pt").get_slice("vectors").get_shape()[0] for p in shards)
    assert stored == n_vectors
    index = VectorIndex(folder)
    assert (len(index), index.dtype, index.bytes_per_vector) == (5, dtype, bytes_per_vector)
    # Reading a row asks for that row's slice only, never for the whole tensor.
    reads = []
    real_safe_open = safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.inner = real_safe_open(*args, **kwargs)

        def get_slice(self, key):
            inner = self.inner.get_slice(key)

            class Sliced:
                def __getitem__(self, item):
                    reads.append((item.start, item.stop))
                    return inner[item]

            return Sliced()

        def get_tensor(self, key):
            raise AssertionError("the index loaded a whole tensor")

    monkeypatch.setattr("peft_ctx.vectors.safe_open", Spy)  # the index opens its files at the first read
    expected = encoder.encode(rows[3]).to(dtype).float()
    torch.testing.assert_close(index[3], expected)
    assert reads == [(1, 4)]  # row 3 is the second row of rank 1's shard: its vectors 1..3
    with pytest.raises(IndexError, match="Row 5 is not in this vector index of 5 rows"):
        index[5]


def test_the_vector_index_is_reused_and_chunks_long_passages(encoder, tmp_path):
    from peft_ctx.vectors import VectorIndex, build_vector_index

    folder = str(tmp_path / "index")
    long_doc = " ".join(f"word{i}" for i in range(120))
    path = build_vector_index(folder, [[long_doc], [DOCS[0]]], encoder, chunk_tokens=32)
    stamp = (tmp_path / "index" / path.split("/")[-1]).stat().st_mtime_ns
    assert build_vector_index(folder, [[long_doc], [DOCS[0]]], encoder, chunk_tokens=32) == path
    assert (tmp_path / "index" / path.split("/")[-1]).stat().st_mtime_ns == stamp  # not encoded again
    index = VectorIndex(folder)
    assert index[0].shape[0] == len(encoder.chunk(long_doc, 32)) > 1 and index[1].shape[0] == 1
    build_vector_index(folder, [[DOCS[1]], [DOCS[0]]], encoder, chunk_tokens=32)  # other texts: encoded again
    torch.testing.assert_close(VectorIndex(folder)[0], encoder.encode([DOCS[1]]).half().float())
