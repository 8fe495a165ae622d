"""Training scripts under `accelerate launch` with 2 processes (DDP over gloo on the CPU) match one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = {"fsdp2": "fsdp_worker.py", "zero3": "zero3_worker.py"}
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


def script_args(script, base_dir, encoder_dir, output_dir, per_device_batch, launcher="ddp"):
    common = [
        "--model_name_or_path", str(base_dir), "--output_dir", str(output_dir), "--max_steps", "4",
        "--per_device_train_batch_size", str(per_device_batch), "--learning_rate", "0.01", "--disable_tqdm", "true",
        "--dtype", "fp32",  # the shipped configs say auto; these runs compare adapters exactly, on any CPU
        # SGD: AdamW's normalisation magnifies the rounding of another reduction order wherever a gradient is near
        # zero (a COCOM element came out 8e-5 apart after 4 steps), which says nothing about the sharding.
        "--optim", "sgd",
        "--dataset_name", "train/data/example_stage2.jsonl",
    ]  # fmt: skip
    if script == "xrag":
        # The cached teacher needs whole weights before training (a ZeRO-3 init refuses it): distil with it under DDP.
        teacher = ["--a_kl", "0.0"] if launcher == "zero3" else []
        return ["train/xrag.py", "--config", "train/configs/xrag_stage2.yaml", "--encoder_name_or_path", encoder_dir,
                "--adapter_init", "", *teacher, *common]  # fmt: skip
    if script == "cocom":
        # No LoRA dropout: each process draws its own dropout masks, which no one-process run reproduces.
        return ["train/cocom.py", "--config", "train/configs/cocom_qa.yaml", "--adapter_init", "",
                "--compression_rate", "4", "--lora_r", "4", "--lora_dropout", "0", *common]  # fmt: skip
    # A fixed k: the per-batch draw depends on each process's rows, which differ from the one-process batches.
    return ["train/spring.py", "--config", "train/configs/spring.yaml", "--num_virtual_tokens", "4",
            "--min_virtual_tokens", "3", "--max_virtual_tokens", "3", *common]  # fmt: skip


LAUNCHERS = {
    "ddp": ["--config_file", "train/configs/accelerate/ddp.yaml"],
    # The shipped ZeRO-3 config, the base loaded partitioned (zero3_init_flag), fp32 for an exact comparison.
    # DeepSpeed compiles its CPU shared-memory collectives on first use (1.5 min on two cores): slow.
    "zero3": ["--config_file", "train/configs/accelerate/deepspeed_zero3.yaml", "--mixed_precision", "no",
              "--zero3_init_flag", "true"],
}  # fmt: skip
CASES = [("xrag", "ddp"), ("spring", "ddp"), ("cocom", "ddp")] + [
    pytest.param(script, "zero3", marks=pytest.mark.slow) for script in ("xrag", "spring", "cocom")
]


@pytest.mark.parametrize(("script", "launcher"), CASES)
def test_two_process_training_gives_the_one_process_adapter(
    script, launcher, trainable_base_dir, encoder_dir, tmp_path
):
    """accelerate launch of the real script, 2 processes over gloo on the CPU, DDP or DeepSpeed ZeRO-3 (through the
    Trainer's own DeepSpeed integration, saving with gathered_adapter_state_dict)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    one = tmp_path / "one"
    command = [sys.executable, *script_args(script, trainable_base_dir, encoder_dir, one, 2, launcher)]
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    two = tmp_path / "two"
    launched = subprocess.run(
        [ACCELERATE, "launch", *LAUNCHERS[launcher], "--num_processes", "2",
         *script_args(script, trainable_base_dir, encoder_dir, two, 1, launcher)],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    # 4 steps x 2 processes x 1 example = 2 epochs of the 4-row dataset; one process alone would log 1 epoch.
    assert "'train_loss'" in launched.stdout and "'epoch': '2'" in launched.stdout.split("'train_loss'")[-1]
    single, ddp = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], atol=1e-5, rtol=1e-4)


# Trained tensors of values up to 0.8 after 3 steps, sharded against one process: within 1e-5 for every row but
# CLaRa's settings under ZeRO-3 through MKL's AVX2 gemm (MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2, 1
# thread), where its memory tokens and compressor LoRA came out up to 2.7e-5 apart (the others at most 9.2e-6).
SHARDED_ATOL = {"cocom_clara": 1e-4}


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_two_process_sharded_training_of_every_method_saves_the_gathered_adapter(
    engine, tokenizer, encoder_dir, encoder, trainable_base_dir, tmp_path
):
    """FSDP2 (torch's ``fully_shard``) and DeepSpeed ZeRO-3 (weights partitioned as they load, every tensor
    partitioned), 2 processes over gloo on the CPU: each method's adapter is sharded with the base; training matches
    one process that averages the two ranks' losses, and ``gathered_adapter_state_dict`` + ``save_adapter`` write
    the whole trained tensors, which ``PeftModel.from_pretrained`` loads bit for bit."""
    from peft import PeftModel

    import peft_ctx
    from tests.distributed_case import LR, METHOD_NAMES, STEPS, build, rank_inputs
    from tests.helpers import tiny_model

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"tests/{WORKERS[engine]}",
         str(tmp_path), encoder_dir, str(trainable_base_dir)],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    for method in METHOD_NAMES:
        model = build(method, tokenizer, encoder_dir)
        initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        model.train()
        for step in range(STEPS):
            losses = [model(**rank_inputs(method, model, tokenizer, encoder, r, 2, step)).loss for r in range(2)]
            (sum(losses) / 2).backward()
            optimizer.step()
            optimizer.zero_grad()
        sharded = load_file(tmp_path / method / "trained.safetensors")
        single = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        assert set(sharded) == set(single)

        # The same tensors moved (not COCOM's <AE> marker, which QA rows do not read, nor BERT's key biases, whose
        # gradient is zero but for rounding) to the same values.
        def moved(trained, initial=initial):
            return {n for n in initial if (trained[n] - initial[n]).abs().max() > 1e-6}

        assert moved(sharded) and moved(sharded) == moved(single), method
        for name in single:
            torch.testing.assert_close(
                sharded[name], single[name], atol=SHARDED_ATOL.get(method, 1e-5), rtol=1e-4, msg=f"{method} {name}"
            )
        loaded = PeftModel.from_pretrained(tiny_model("llama", tokenizer, initializer_range=0.2), tmp_path / method)
        params = dict(loaded.named_parameters())
        for name, value in sharded.items():
            assert torch.equal(params[name], value), f"{method}: {name} differs from the trained tensor"
        assert list(peft_ctx.gathered_adapter_state_dict(model)) == peft_ctx.distributed.adapter_keys(model)
