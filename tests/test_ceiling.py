"""benchmarks/ceiling.py (issue 24's ceiling and pooled rows) on a tiny llama: what it fits, reads and writes."""

from __future__ import annotations

import json
import math

import torch

from benchmarks import ceiling
from tests.helpers import tiny_model
from tests.test_eval import qa_file

TEXTS = ["Item 3 is painted green. It is old.", "The letter was written by Ada in the spring of that year."]


def test_pooled_tokens_mean_each_run_of_xi_token_embeddings(tokenizer):
    embedding = torch.nn.Embedding(50, 6)
    ids = list(range(9))
    x4 = ceiling.pooled_tokens(embedding, ids, "x4")
    assert x4.shape == (3, 6)  # ceil(9 / 4)
    torch.testing.assert_close(x4[0], embedding.weight[0:4].mean(0))
    torch.testing.assert_close(x4[2], embedding.weight[8])  # the last, shorter run
    torch.testing.assert_close(ceiling.pooled_tokens(embedding, ids, "one")[0], embedding.weight[:9].mean(0))
    assert [ceiling.n_soft_tokens(s, 33) for s in ("one", "x4", "x16")] == [1, 9, 3]


def test_fitting_learns_each_passage_on_its_own(tokenizer):
    model = tiny_model("llama", tokenizer, initializer_range=0.2).requires_grad_(False)
    ids = [ceiling.passage_ids(tokenizer, t, 64) for t in TEXTS]
    inits = [ceiling.pooled_tokens(model.get_input_embeddings(), x, "x4") for x in ids]
    texts = [tokenizer.decode(x) for x in ids]
    before, _ = ceiling.reconstruction(model, tokenizer, texts, inits)
    together, _ = ceiling.fit_soft_tokens(model, tokenizer, texts, inits, steps=30, lr=0.05)
    after, _ = ceiling.reconstruction(model, tokenizer, texts, together)
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)  # the auto-encoding loss falls
    assert [t.shape for t in together] == [t.shape for t in inits]
    # Batched, yet each passage's fit is its own: alone it gives the same tokens (up to the padding's rounding).
    alone, _ = ceiling.fit_soft_tokens(model, tokenizer, texts[1:], inits[1:], steps=30, lr=0.05)
    torch.testing.assert_close(alone[0], together[1], atol=2e-3, rtol=2e-3)
    assert not torch.allclose(together[0], inits[0])


def test_the_benchmark_writes_its_rows_and_resumes(tokenizer, tmp_path):
    base = tmp_path / "base"
    tiny_model("llama", tokenizer, initializer_range=0.2).save_pretrained(base)
    tokenizer.save_pretrained(base)
    argv = [
        "--model", str(base), "--data", qa_file(tmp_path, n=40), "--n_test", "4", "--settings", "one,x4",
        "--steps", "3", "--fit_batch", "4", "--dtype", "fp32", "--work_dir", str(tmp_path / "work"),
        "--output", str(tmp_path / "out" / "ceiling.json"),
    ]  # fmt: skip
    rows = {r["method"]: r for r in ceiling.main(argv)}
    assert set(rows) == {"no_retrieval", "rag", "pooled_one", "oracle_one", "pooled_x4", "oracle_x4"}
    assert rows["no_retrieval"].get("choice_accuracy_wrong_passage") is None
    for name in ("rag", "pooled_one", "oracle_x4"):
        assert 0 <= rows[name]["choice_accuracy"] <= 1 and 0 <= rows[name]["choice_accuracy_wrong_passage"] <= 1
    assert rows["oracle_one"]["soft_tokens"] == 1 and rows["pooled_x4"]["soft_tokens"] > 1
    assert 0 <= rows["oracle_x4"]["reconstruction_accuracy_other_passage"] <= 1
    payload = json.loads((tmp_path / "out" / "ceiling.json").read_text())
    assert payload["n_test"] == 4 and len(payload["rows"]) == 6
    assert "| oracle, 1 token | 1.0 |" in (tmp_path / "out" / "ceiling.md").read_text()
    # --resume reads the fitted tokens back instead of fitting again (--steps 0 would leave them pooled).
    again = {r["method"]: r for r in ceiling.main(argv + ["--resume", "--steps", "0"])}
    for name in ("oracle_one", "oracle_x4"):
        assert math.isclose(
            again[name]["reconstruction_accuracy_at_fit"], rows[name]["reconstruction_accuracy_at_fit"]
        )
        assert again[name]["choice_accuracy"] == rows[name]["choice_accuracy"]
