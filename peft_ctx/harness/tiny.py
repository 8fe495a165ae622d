"""The tiny encoders the tests, the CUDA check and the planner build their tiny adapters with: a BERT (the retriever,
COCOM-light's compressor) and, in its ``llama`` subfolder, a Llama-style encoder (ARC's compressor).

Example::

    from peft_ctx.harness import assets
    from peft_ctx.harness.tiny import tiny_encoder_dir

    encoder_dir = tiny_encoder_dir(assets.minilm_dir(), "/tmp/tiny-encoder")  # a 32-wide random BERT
    llama_dir = os.path.join(encoder_dir, LLAMA_SUBFOLDER)  # a 32-wide random Llama, same tokenizer
"""

from __future__ import annotations

import json
import os
import shutil

import torch

# The tiny encoder's width, which the tiny xRAG rows read as retriever_hidden_size.
RETRIEVER_DIM = 32
# Where tiny_encoder_dir writes the Llama-style encoder, inside the BERT's folder.
LLAMA_SUBFOLDER = "llama"


def tiny_encoder_dir(source: str, out: str, hidden: int = RETRIEVER_DIM) -> str:
    """A random BERT of width ``hidden`` (seed 0) with the tokenizer and pooling of the sentence-transformers folder
    ``source`` (MiniLM's), saved as a sentence-transformers folder in ``out``, and a random 2-layer Llama of the same
    width and tokenizer in ``out/llama``; returns ``out``."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaModel

    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=512,
    )  # fmt: skip
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.copy(os.path.join(source, "modules.json"), out)
    os.makedirs(os.path.join(out, "1_Pooling"), exist_ok=True)
    with open(os.path.join(source, "1_Pooling", "config.json")) as f:
        pooling = json.load(f)
    pooling["word_embedding_dimension"] = hidden
    with open(os.path.join(out, "1_Pooling", "config.json"), "w") as f:
        json.dump(pooling, f)
    llama = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
    )  # fmt: skip
    llama_dir = os.path.join(out, LLAMA_SUBFOLDER)
    LlamaModel(llama).save_pretrained(llama_dir)
    tokenizer.save_pretrained(llama_dir)
    return out
