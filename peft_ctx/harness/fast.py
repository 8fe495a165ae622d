"""Fast greedy decoding shared by every method and by the text-RAG baseline alike.

Decoding a small model on a CPU is bound by the bytes of weights read per generated token, so the levers are fewer
bytes per token (``quantize_linear`` / ``convert_weights``: fp16 weights with fp32 compute, or dynamic int8) and fewer
re-allocations per token (a static KV cache, written in place instead of concatenated). ``greedy_generate`` is a
plain KV-cache loop: one prefill call on the full prompt (through the PeftModel, so context slots are filled), then
one call per token straight on the base model, with the time to the first token recorded. ``benchmarks/decoding.py``
measures these options against each other and their answers against fp32; the benchmarks use the fastest set-up
whose answers hold, for every method.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.ao.quantization import float16_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic
from transformers import DynamicCache, StaticCache

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
    cache_length: Optional[int] = None,
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
        cache_length: positions the static cache holds (default: prompt + max_new_tokens); a larger one lets a short
            run have exactly the shapes of a longer one.
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
    if cache_length is None:
        cache_length = prompt_len + max_new_tokens
    elif cache_length < prompt_len + max_new_tokens:
        raise ValueError(f"cache_length={cache_length} cannot hold {prompt_len} prompt + {max_new_tokens} new tokens.")
    past = _make_cache(cache, lm.config, cache_length)
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


WEIGHT_FORMATS = ("fp32", "bf16", "fp16w", "int8")


def quantize_linear(
    model: nn.Module, dtype: torch.dtype = torch.float16, *, include_lm_head: bool = True
) -> nn.Module:
    """Store the LM's ``nn.Linear`` weights in fewer bytes for CPU inference, in place; returns the model.

    ``torch.float16``: fp16 weights, fp32 activations and accumulation (fbgemm's packed fp16 GEMM): half the bytes of
    fp32 with logits within a few hundredths of fp32's. ``torch.qint8``: dynamic int8 (per-channel weights,
    activations quantized per call): a quarter of the bytes, but activation outliers can change the answers (SmolLM2's
    do; ``benchmarks/decoding.py`` measures it). peft_ctx adapter modules and LoRA matrices stay in full precision
    (small, and some of them train). The input embedding stays as it is (a lookup reads a few rows); the output head
    gets its own copy when ``include_lm_head`` (a fifth of SmolLM2's weights, read for every token). CPU, inference.
    """

    qconfigs = {torch.float16: float16_dynamic_qconfig, torch.qint8: per_channel_dynamic_qconfig}
    if dtype not in qconfigs:
        raise ValueError(f"dtype={dtype}; quantize_linear stores weights as torch.float16 or torch.qint8.")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError(
            "quantize_linear runs on CPU models only (torch's dynamic quantized kernels are CPU kernels)."
        )
    output = getattr(_base_lm(model), "get_output_embeddings", lambda: None)()
    names = {
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not _is_adapter_module(name) and (include_lm_head or module is not output)
    }
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize.")
    with warnings.catch_warnings():
        # torch points eager-mode quantization users at torchao; these eager kernels need no extra package.
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {name: qconfigs[dtype] for name in names}, dtype=dtype, inplace=True)
    return model


def convert_weights(model: nn.Module, weights: str) -> nn.Module:
    """``model`` with its weights in one of ``WEIGHT_FORMATS`` ("fp16w": fp16 weights with fp32 compute)."""
    if weights == "fp32":
        return model.float()
    if weights == "bf16":
        return model.to(torch.bfloat16)
    if weights == "fp16w":
        return quantize_linear(model, torch.float16)
    if weights == "int8":
        return quantize_linear(model, torch.qint8)
    raise ValueError(f"weights={weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}.")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights and buffers as stored (packed fp16 / int8 weights at 2 / 1 byte; shared once)."""
    seen: set[int] = set()
    total = 0

    def add(tensor: torch.Tensor) -> None:
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()

    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            # Unpacking hands back fresh tensors (fp32 for fp16-packed weights) whose addresses get reused once freed:
            # count what the packed form holds, without address bookkeeping (a packed module is never shared).
            weight, bias = packed._weight_bias()
            total += weight.numel() * (2 if packed.dtype == torch.float16 else 1)
            total += 0 if bias is None else bias.numel() * bias.element_size()
            continue
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            add(tensor)
    return total
