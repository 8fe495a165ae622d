"""Shared by the benchmark scripts: loading the model, describing the machine, medians."""

from __future__ import annotations

import json
import os
import platform
import statistics
from typing import Optional

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_ctx.harness import assets

DEFAULT_MODEL = assets.SMOLLM2_HUB_ID  # SmolLM2-135M-Instruct, offline through peft_ctx.harness.assets


def set_threads(threads: Optional[int]) -> int:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads={threads}; give a positive number of CPU threads.")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={device} but torch sees no CUDA GPU; use --device cpu or auto.")
    return torch.device(device)


def load_model(name_or_path: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode with SDPA attention; ``name_or_path`` may be an offline asset's alias or Hub id
    (``peft_ctx.harness.assets``)."""
    path = assets.resolve(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def machine() -> dict:
    """What the numbers were measured on, including how busy the machine was (timings on a shared CPU are noisy)."""

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_report(out: str, name: str, result: dict, markdown) -> str:
    """``<out>/<name>.json`` and ``<name>.md`` (``markdown(result)``), printed too; returns the markdown."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    text = markdown(result)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text)
    print(text)
    return text


def median(values) -> float:
    return float(statistics.median(values))
