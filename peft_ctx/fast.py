"""Fast greedy decoding shared by every method and by the text-RAG baseline alike.

Decoding a small model on a CPU is bound by the bytes of weights read per generated token, so the levers are fewer
bytes per token (``quantize_int8``: dynamic int8 ``nn.Linear`` weights, about a quarter of fp32) and fewer
re-allocations per token (a static KV cache, written in place instead of concatenated). ``greedy_generate`` is a
plain KV-cache loop: one prefill call on the full prompt (through the PeftModel, so context slots are filled), then
one call per token straight on the base model, with the time to the first token recorded. ``benchmarks/decoding.py``
measures these options against each other and against fp32; the benchmarks use the winner for every method.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

CACHES = ("static", "dynamic")


@dataclass
class GenerationResult:
    """Greedy output and its timings (wall clock; CUDA is synchronised before each reading)."""

    tokens: torch.Tensor  # [batch, new_tokens]
    ttft_s: float  # prompt in -> first token out
    e2e_s: float  # prompt in -> last token out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _base_lm(model) -> nn.Module:
    # A PeftModel is only needed for the prefill (it fills the context slots); later steps go straight to the LM.
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _make_cache(kind: str, config, max_len: int):
    from transformers import DynamicCache, StaticCache

    if kind == "static":
        return StaticCache(config=config, max_cache_len=max_len)
    if kind == "dynamic":
        return DynamicCache(config=config)
    raise ValueError(f"cache={kind!r}; choose one of {', '.join(CACHES)}.")


@torch.no_grad()
def greedy_generate(
    model,
    inputs: dict[str, Any],
    max_new_tokens: int,
    *,
    cache: str = "static",
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    on_token: Optional[Callable[[int], None]] = None,
) -> GenerationResult:
    """Greedy decoding with a KV cache; the same tokens as ``model.generate(**inputs, do_sample=False)``.

    Args:
        model: a causal LM or a PeftModel (with a peft_ctx adapter active, or inside ``disable_adapter()``).
        inputs: left-padded model inputs, e.g. from ``peft_ctx.prepare_inputs`` (``input_ids``, ``attention_mask``
            and the method's context inputs).
        max_new_tokens: tokens to generate. With ``eos_token_id`` None every row gets exactly this many (what a
            benchmark wants: all methods then decode the same number of tokens).
        cache: "static" (preallocated, written in place) or "dynamic" (grows by concatenation).
        eos_token_id: stop a row at this token (later positions hold ``pad_token_id``, by default the eos token);
            stop when all rows have.
        on_token: called with the step number (0 = the prefill) as soon as each token is chosen, e.g. to read a FLOP
            counter between prefill and decoding.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; generate at least one token.")
    if "input_ids" not in inputs:
        raise ValueError("inputs need input_ids (build them with peft_ctx.prepare_inputs or a tokenizer).")
    inputs = dict(inputs)
    input_ids = inputs.pop("input_ids")  # [batch, prompt]
    attention_mask = inputs.pop("attention_mask", None)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    lm = _base_lm(model)
    past = _make_cache(cache, lm.config, prompt_len + max_new_tokens)
    # Room for the whole answer up front: each step then takes a slice instead of concatenating a new mask.
    full_mask = torch.ones(batch, prompt_len + max_new_tokens, dtype=attention_mask.dtype, device=device)
    full_mask[:, :prompt_len] = attention_mask
    # Left padding: positions count real tokens only, as transformers' generate does.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [batch, prompt]
    next_position = position_ids[:, -1:] + 1  # [batch, 1]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)

    _sync(device)
    start = time.perf_counter()
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past,
        use_cache=True,
        cache_position=torch.arange(prompt_len, device=device),
        logits_to_keep=1,
        **inputs,
    ).logits  # [batch, 1, vocab]
    token = logits[:, -1].argmax(-1)  # [batch]
    _sync(device)
    ttft = time.perf_counter() - start
    n_new = max_new_tokens
    for step in range(max_new_tokens):
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id if pad_token_id is None else pad_token_id)
            finished |= token == eos_token_id
        out[:, step] = token
        if on_token is not None:
            on_token(step)
        if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
            n_new = step + 1
            break
        length = prompt_len + step + 1
        logits = lm(
            input_ids=token.unsqueeze(-1),
            attention_mask=full_mask[:, :length],
            position_ids=next_position + step,
            past_key_values=past,
            use_cache=True,
            cache_position=torch.tensor([length - 1], device=device),
        ).logits  # [batch, 1, vocab]
        token = logits[:, -1].argmax(-1)
    _sync(device)
    e2e = time.perf_counter() - start
    return GenerationResult(tokens=out[:, :n_new], ttft_s=ttft, e2e_s=e2e)


def _is_adapter_module(name: str) -> bool:
    # peft_ctx adapter modules (projectors, virtual tokens, compressors) and LoRA matrices stay in full precision:
    # they are small, and some of them train.
    parts = name.split(".")
    return "ctx_modules" in parts or any(p.startswith("lora_") for p in parts)


def quantize_int8(model: nn.Module, *, include_lm_head: bool = True) -> nn.Module:
    """Dynamic int8 quantization (per output channel) of the LM's ``nn.Linear`` weights, in place; returns the model.

    Activations are quantized on the fly per call, so nothing needs calibrating. peft_ctx adapter modules and LoRA
    matrices are left in full precision. The input embedding stays fp32 (a lookup reads a few rows only); the output
    projection gets its own int8 copy when ``include_lm_head`` (it is a fifth of SmolLM2's weights, read every token).
    CPU only (fbgemm / onednn kernels); inference only.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("quantize_int8 runs on CPU models only (torch's dynamic int8 kernels are CPU kernels).")
    output = getattr(_base_lm(model), "get_output_embeddings", lambda: None)()
    names = {
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not _is_adapter_module(name) and (include_lm_head or module is not output)
    }
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize.")
    with warnings.catch_warnings():
        # torch points eager-mode quantization users at torchao; the eager kernels are what run fastest here.
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8, inplace=True)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights and buffers as stored (int8 packed weights count one byte each; shared once)."""
    seen: set[int] = set()
    total = 0

    def visit(value) -> None:
        nonlocal total
        if isinstance(value, (tuple, list)):
            for item in value:
                visit(item)
        elif isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key = storage.data_ptr()
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()

    for value in model.state_dict(keep_vars=True).values():
        visit(value)
    return total
