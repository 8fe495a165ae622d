"""Bad input fails with a clear error that names the value and the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file

import peft_ctx
from tests.helpers import TINY_ROWS, clone, encoder_for, tiny_adapter_config, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=TINY_ROWS)
def saved_adapter(request, tokenizer, encoder_dir, tmp_path):
    base = tiny_model("llama", tokenizer)
    reference = clone(base)
    model = get_peft_model(base, tiny_adapter_config(request.param, encoder_dir))
    model.save_pretrained(tmp_path / "adapter")
    return model, reference, tmp_path / "adapter"


@pytest.mark.parametrize("bad", ["", "   ", None, 42, ["nested"]])
def test_empty_or_non_string_passages_are_refused(tokenizer, encoder, saved_adapter, bad):
    model, _, _ = saved_adapter
    with pytest.raises(ValueError, match=r"contexts\[0\]\[1\]"):
        peft_ctx.prepare_inputs(
            model, tokenizer, ["q?"], [["a fine passage", bad]], encoder=encoder_for(model, encoder)
        )


def test_a_question_longer_than_the_model_context_is_refused(tokenizer, encoder, saved_adapter):
    model, _, _ = saved_adapter
    question = "why " * 1100
    with pytest.raises(ValueError, match=r"more than max_length=1024 \(the model's context\)"):
        peft_ctx.prepare_inputs(model, tokenizer, [question], [["a passage"]], encoder=encoder_for(model, encoder))


def test_more_documents_than_fit_are_refused(tokenizer, encoder, saved_adapter):
    model, _, _ = saved_adapter
    passages = [f"passage number {i} about the river" for i in range(1100)]
    with pytest.raises(ValueError, match="more than max_length=1024"):
        peft_ctx.prepare_inputs(model, tokenizer, ["q?"], [passages], encoder=encoder_for(model, encoder))


def test_adapter_on_a_base_with_another_vocabulary_is_refused(tokenizer, saved_adapter):
    _, _, path = saved_adapter
    other = tiny_model("llama", tokenizer)
    other.resize_token_embeddings(len(tokenizer) + 64)
    with pytest.raises(ValueError, match=f"{len(tokenizer)}-token vocabulary .* {len(tokenizer) + 64} embedding rows"):
        PeftModel.from_pretrained(other, path)


def test_truncated_safetensors_are_refused(saved_adapter):
    _, reference, path = saved_adapter
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a valid safetensors file .* truncated"):
        PeftModel.from_pretrained(clone(reference), path)


def test_corrupted_safetensors_are_refused(saved_adapter):
    _, reference, path = saved_adapter
    (path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        PeftModel.from_pretrained(clone(reference), path)


def test_a_pickle_where_safetensors_are_expected_is_refused_and_never_unpickled(saved_adapter, tmp_path):
    _, reference, path = saved_adapter
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    os.remove(path / "adapter_model.safetensors")
    torch.save({"weights": Payload()}, path / "adapter_model.bin")
    with pytest.raises(ValueError, match="is a pickle file"):
        PeftModel.from_pretrained(clone(reference), path)
    # A pickle under the safetensors name is refused too.
    os.replace(path / "adapter_model.bin", path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        PeftModel.from_pretrained(clone(reference), path)
    assert not marker.exists()


def test_load_adapter_checks_weights_too(saved_adapter, tmp_path):
    model, _, path = saved_adapter
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    save_file({"x": torch.zeros(4)}, str(broken / "adapter_model.safetensors"))
    (broken / "adapter_model.safetensors").write_bytes((broken / "adapter_model.safetensors").read_bytes()[:-8])
    with pytest.raises(ValueError, match="broken/adapter_model.safetensors is not a valid safetensors file"):
        model.load_adapter(broken, adapter_name="broken")


def test_adapter_config_from_a_newer_peft_ctx_is_refused(saved_adapter):
    _, reference, path = saved_adapter
    config = json.loads((path / "adapter_config.json").read_text())
    config["peft_ctx_version"] = "9.1.0"
    config["some_future_field"] = True
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="written by peft_ctx 9.1.0, newer than the installed"):
        PeftModel.from_pretrained(clone(reference), path)


def test_yaml_config_with_unknown_keys_is_refused(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "model_name_or_path: x\nencoder_name_or_path: y\ndataset_name: z\noutput_dir: out\n"
        "use_cpu: true\nbf16: false\nlearning_rat: 0.1\n"
    )
    result = subprocess.run([sys.executable, "train/xrag.py", "--config", str(config)], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0
    assert "learning_rat" in result.stderr and "Unknown arguments" in result.stderr
