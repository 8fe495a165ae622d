"""The prepared CUDA check (benchmarks/cuda_check.py), run here on the CPU so that it works the day a GPU is lent:
its training check compares a bf16 base under bf16 autocast with the fp32 reference for every method, its gradient
comparison rejects gradients that are off, and its benchmark part runs the batch-1 rows on random weights."""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import cuda_check


def test_the_bf16_training_check_passes_for_every_method_on_the_cpu(tmp_path):
    assert cuda_check.main(["run", "--device", "cpu", "--skip-bench", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "cuda_check.json") as f:
        rows = json.load(f)["train"]
    assert [r["method"] for r in rows] == cuda_check.methods()
    for row in rows:
        assert row["ok"] and row["base_dtype"] == "bfloat16" and row["trainable_dtypes"] == ["float32"]
        assert row["base_tensors_moved"] == 0 and row["compared_tensors"] >= 1
        assert row["cosine"] >= cuda_check.MIN_COSINE and row["relative_error"] <= cuda_check.MAX_RELATIVE


def test_the_gradient_comparison_rejects_gradients_that_are_off():
    generator = torch.Generator().manual_seed(0)
    reference = {f"t{i}": torch.randn(8, 4, generator=generator) for i in range(3)}
    assert cuda_check.compare(reference, {n: g * (1 + 1e-3) for n, g in reference.items()})["ok"]
    one_off = dict(reference, t1=reference["t1"] * 1.5)  # one tensor 50% off, the others exact
    result = cuda_check.compare(reference, one_off)
    assert not result["ok"] and result["worst_tensor"] == "t1"
    assert not cuda_check.compare(reference, {n: -g for n, g in reference.items()})["ok"]
    assert not cuda_check.compare(reference, {"t0": reference["t0"]})["ok"]  # gradients missing


def test_the_benchmark_part_runs_the_batch_1_rows_on_random_weights(tmp_path):
    assets = str(tmp_path / "assets")
    cuda_check.prepare(assets, wheels=False)
    assert sorted(os.listdir(assets)) == ["minilm", "smollm2", "wiki.json"]
    carried = os.listdir(os.path.join(assets, "smollm2"))
    assert "tokenizer.json" in carried and not any(
        name.endswith((".safetensors", ".bin", ".gguf")) for name in carried
    )
    short = ("--methods", "xrag", "--docs", "1", "--doc-tokens", "16", "--new-tokens", "2", "--repeats", "1",
             "--skip-training", "--encode-passages", "2")  # fmt: skip
    result = cuda_check.bench(assets, torch.device("cpu"), str(tmp_path / "out"), short)
    rows = {(r["method"], r["batch"], r["engine"]) for r in result["rows"]}
    assert rows == {("rag", 1, "torch"), ("xrag", 1, "torch")}
    assert (tmp_path / "out" / "bench.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_without_a_gpu_the_cuda_run_says_so(tmp_path):
    with pytest.raises(SystemExit, match="sees no CUDA GPU"):
        cuda_check.main(["run", "--device", "cuda", "--out", str(tmp_path)])
