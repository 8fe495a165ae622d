from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoTokenizer

from tests.helpers import RETRIEVER_DIM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# PEFT_CTX_TEST_THREADS runs the suite with another thread count (1 and 2 must both pass: issue 23).
torch.set_num_threads(int(os.environ.get("PEFT_CTX_TEST_THREADS") or max(1, min(2, os.cpu_count() or 1))))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")
    parser.addoption("--engines", action="store_true", default=False, help="run tests marked engines")


def pytest_collection_modifyitems(config, items):
    skips = {
        "slow": (config.getoption("--runslow"), "slow: run with --runslow (make test-all)"),
        "engines": (
            config.getoption("--engines"),
            "an engine server on real weights: run with --engines (make test-engines)",
        ),
    }
    for item in items:
        for marker, (run, reason) in skips.items():
            if marker in item.keywords and not run:
                item.add_marker(pytest.mark.skip(reason=reason))


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
    from peft_ctx.harness import assets
    from peft_ctx.harness.tiny import tiny_encoder_dir

    return tiny_encoder_dir(assets.minilm_dir(), str(tmp_path_factory.mktemp("encoder")), hidden=RETRIEVER_DIM)


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
