"""The README's Quick start runs as written, on a tiny model."""

from __future__ import annotations

import os
import re

import torch

from tests.helpers import tiny_model

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def section_code(heading: str) -> list[str]:
    text = open(README).read()
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


def test_readme_quick_start_runs_as_written(tokenizer, encoder_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = section_code("Quick start")
    assert len(blocks) >= 2
    from peft_ctx import Encoder

    corpus = ["Doc one is here.", "Doc two is there.", "Doc three.", "Doc four.", "Doc five.", "Doc six.",
              "Doc seven.", "Doc eight."]  # fmt: skip
    namespace = {
        "base_causal_lm": tiny_model("llama", tokenizer),
        "tokenizer": tokenizer,
        "questions": ["Who wrote it?", "Where is it?"],
        "corpus": corpus,
    }
    # The README names a placeholder path for the encoder; the tiny test encoder has 32-d vectors.
    code = "\n".join(blocks).replace('"path/to/all-MiniLM-L6-v2"', repr(encoder_dir))
    code = code.replace("retriever_hidden_size=384", f"retriever_hidden_size={Encoder(encoder_dir).hidden_size}")
    exec(compile(code, "README.md", "exec"), namespace)
    assert isinstance(namespace["answers"], list) and len(namespace["answers"]) == 1
    with torch.no_grad():
        assert torch.equal(
            namespace["model2"](**namespace["inputs"]).logits, namespace["model"](**namespace["inputs"]).logits
        )
    assert namespace["gen"].shape[0] == 1
