from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoTokenizer

from tests.helpers import tiny_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer and chat template, from the offline asset package."""
    from peft_ctx.harness import assets

    tok = AutoTokenizer.from_pretrained(assets.smollm2_tokenizer_dir())
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory):
    """A tiny random BERT with all-MiniLM-L6-v2's real tokenizer, saved as a sentence-transformers folder."""
    import json
    import shutil

    from peft_ctx.harness import assets

    source = assets.minilm_dir()
    target = tmp_path_factory.mktemp("encoder")
    tok = AutoTokenizer.from_pretrained(source)
    tok.save_pretrained(target)
    tiny_bert(tok).save_pretrained(target)
    shutil.copy(os.path.join(source, "modules.json"), target / "modules.json")
    (target / "1_Pooling").mkdir()
    shutil.copy(os.path.join(source, "1_Pooling", "config.json"), target / "1_Pooling" / "config.json")
    with open(target / "1_Pooling" / "config.json") as f:
        pooling = json.load(f)
    pooling["word_embedding_dimension"] = tiny_bert(tok).config.hidden_size
    with open(target / "1_Pooling" / "config.json", "w") as f:
        json.dump(pooling, f)
    return str(target)


@pytest.fixture(scope="session")
def encoder(encoder_dir):
    import peft_ctx

    return peft_ctx.Encoder(encoder_dir)


@pytest.fixture()
def trainable_base_dir(tokenizer, tmp_path):
    """A tiny llama folder (with the tokenizer) sensitive enough to its inputs for the training-script tests."""
    from tests.helpers import tiny_model

    path = tmp_path / "base"
    tiny_model("llama", tokenizer, initializer_range=0.2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32) and its tokenizer; one per test module (tests adapt it in place)."""
    from tests.helpers import real_smollm2

    return real_smollm2()


@pytest.fixture(scope="module")
def minilm():
    """The real all-MiniLM-L6-v2 encoder."""
    from tests.helpers import real_minilm

    return real_minilm()
