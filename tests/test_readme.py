"""The README's Quick start runs as written, on a tiny model; every block, command and link of the README and docs/
points at something real."""

from __future__ import annotations

import json
import os
import re

import pytest
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


DOCS = [README] + sorted(
    os.path.join(os.path.dirname(README), "docs", name)
    for name in os.listdir(os.path.join(os.path.dirname(README), "docs"))
    if name.endswith(".md")
)


def _anchors(path: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"(?m)^#+ (.*)$", text)}


def test_every_code_block_link_and_command_in_the_readme_and_docs_points_at_something_real():
    """The README and docs/ run their Python blocks where a test gives them a model (Quick start here, COCOM and
    publishing in their modules); every other block must at least parse, every `python -m` module and script, YAML
    config and relative link must exist."""
    import importlib.util

    root = os.path.dirname(README)
    for path in DOCS:
        text = open(path).read()
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.S)):
            compile(code, f"{path} block {i}", "exec")
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for module in re.findall(r"python -m ([\w.]+)", block):
                if module.split(".")[0] in ("peft_ctx", "benchmarks"):
                    assert importlib.util.find_spec(module) is not None, (path, module)
            for script in re.findall(r"python ((?:train|examples|benchmarks)/[\w/]+\.py)", block):
                assert os.path.isfile(os.path.join(root, script)), (path, script)
            for config in re.findall(r"--config(?:_file)? (train/\S+\.yaml)", block):
                assert os.path.isfile(os.path.join(root, config)), (path, config)
        assert not re.search(r"\]\([^)]*\n", text), (path, "a link's target broken across lines")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            assert os.path.exists(resolved), (path, target)
            if anchor and resolved.endswith(".md"):
                assert anchor in _anchors(resolved), (path, target)


def test_the_readme_results_table_is_what_the_harness_writes_from_the_committed_results(tmp_path):
    from peft_ctx.harness import readme

    results = os.path.join(os.path.dirname(README), "benchmarks", "results", "demo.json")
    text = open(README).read()
    section = readme.results_section(json.load(open(results)), "benchmarks/results/demo.json")
    assert section in text and "| COCOM xi=16 | 40.0% |" in section
    copy = tmp_path / "README.md"
    copy.write_text(text)
    assert not readme.update_readme(str(copy), results, "benchmarks/results/demo.json")  # nothing edited by hand
    # A hand edit inside the block is written over; text around it is kept.
    copy.write_text(text.replace("| 36.0% | 33.0% |", "| 99.0% | 33.0% |").replace("## Install", "## Installing"))
    assert readme.update_readme(str(copy), results, "benchmarks/results/demo.json")
    assert copy.read_text() == text.replace("## Install", "## Installing")
    copy.write_text("# A README without the block\n")
    with pytest.raises(ValueError, match="has no results block"):
        readme.update_readme(str(copy), results)
