"""Killed training runs resume from their last complete checkpoint and end with the uninterrupted run's adapter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from peft_ctx.training import COMPLETE_MARKER, last_complete_checkpoint, resolve_resume, save_adapter
from tests.helpers import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_command(script, base_dir, encoder_dir, output_dir, *extra):
    common = [
        "--model_name_or_path", str(base_dir), "--dataset_name", "train/data/example_stage2.jsonl",
        "--output_dir", str(output_dir), "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "2",
        "--per_device_train_batch_size", "2", "--learning_rate", "0.01", "--disable_tqdm", "true",
        "--dtype", "fp32",  # the shipped configs say auto; these runs compare adapters exactly, on any CPU
        "--dataloader_num_workers", "0", *extra,
    ]  # fmt: skip
    if script == "xrag":
        return [sys.executable, "train/xrag.py", "--config", "train/configs/xrag_stage2.yaml",
                "--encoder_name_or_path", encoder_dir, "--adapter_init", "", *common]  # fmt: skip
    if script == "cocom":
        # LoRA dropout stays on: the resumed run must restore the RNG state the checkpoint saved.
        return [sys.executable, "train/cocom.py", "--config", "train/configs/cocom_qa.yaml", "--adapter_init", "",
                "--compression_rate", "4", "--lora_r", "4", *common]  # fmt: skip
    # SPRING draws k per batch: the resumed run must draw what the uninterrupted one drew.
    return [sys.executable, "train/spring.py", "--config", "train/configs/spring.yaml", "--num_virtual_tokens", "6",
            *common]  # fmt: skip


def adapter_weights(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


@pytest.mark.parametrize("script", ["xrag", "spring", "cocom"])
def test_a_sigkilled_run_resumes_to_the_same_adapter(script, trainable_base_dir, encoder_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "uninterrupted"
    subprocess.run(script_command(script, trainable_base_dir, encoder_dir, reference), cwd=REPO, env=env, check=True,
                   capture_output=True)  # fmt: skip

    killed = tmp_path / "killed"
    process = subprocess.Popen(script_command(script, trainable_base_dir, encoder_dir, killed), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and not os.path.isfile(killed / "checkpoint-4" / COMPLETE_MARKER):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert last_complete_checkpoint(str(killed)) is not None, "the run never wrote a checkpoint"
    assert not (killed / "adapter_config.json").exists(), "the run finished before it was killed"

    resume = script_command(script, trainable_base_dir, encoder_dir, killed, "--resume_from_checkpoint", "auto")
    subprocess.run(resume, cwd=REPO, env=env, check=True, capture_output=True)
    expected, resumed = adapter_weights(reference), adapter_weights(killed)
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-5, rtol=1e-4)


def test_a_half_written_checkpoint_is_never_resumed_from(tmp_path):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoint-6").mkdir()  # killed while writing: no marker
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert resolve_resume("auto", str(tmp_path)) == str(tmp_path / "checkpoint-4")
    with pytest.raises(ValueError, match="not a complete peft_ctx checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-6"), str(tmp_path))
    assert resolve_resume(None, str(tmp_path)) is None


def test_saving_an_adapter_never_leaves_a_complete_looking_half(tokenizer, tmp_path, monkeypatch):
    from peft import get_peft_model

    import peft_ctx

    model = get_peft_model(tiny_model("llama", tokenizer), peft_ctx.XRAGConfig(retriever_hidden_size=8))
    out = tmp_path / "adapter"
    save_adapter(model, str(out))
    with pytest.raises(FileExistsError):
        save_adapter(model, str(out))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(OSError):
        save_adapter(model, str(tmp_path / "fresh"))
    assert not (tmp_path / "fresh").exists()
