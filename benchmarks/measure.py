"""Counting FLOPs, peak memory and time of one greedy generation; the training-step timer."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Optional

import torch
from datasets import Dataset
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from peft_ctx.harness.fast import _base_lm, greedy_generate
from peft_ctx.training import ContextSFTConfig, ContextSFTTrainer


def _prod(shape) -> int:
    return math.prod(int(s) for s in shape)


# FlopCounterMode knows float matmuls but neither torch's dynamic fp16 / int8 linear layers nor the CPU
# flash-attention kernel that SDPA picks on CPU; these formulas count them like their float counterparts (2 FLOPs per
# multiply-add).
def _linear_dynamic_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _prod(x_shape) * int(out_shape[-1])  # [..., in] @ [in, out]


def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    batch, heads, q_len, head_dim = (int(s) for s in q_shape)
    k_len = int(k_shape[-2])
    return 4 * batch * heads * q_len * k_len * head_dim  # Q K^T and P V, counted dense (causal masking not subtracted)


def _custom_flops() -> dict:
    mapping = {}
    quantized = getattr(torch.ops, "quantized", None)
    for name in ("linear_dynamic", "linear_dynamic_fp16"):
        if quantized is not None and hasattr(quantized, name):
            mapping[getattr(quantized, name)] = _linear_dynamic_flops
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    return mapping


ATTENTION_OPS = ("_scaled_dot_product", "_flash_attention", "_efficient_attention", "bmm")


def profile_generation(
    model, inputs, new_tokens: int, cache: str, device: torch.device, memory: bool = True
) -> tuple[dict, Optional[int]]:
    """FLOPs of a greedy generation of ``new_tokens`` tokens (prefill = prompt -> first token, decode = the rest, and
    the attention part) and, with ``memory``, the peak bytes of tensors it allocates (see ``peak_memory_bytes``).

    Only the prefill and two decoding steps run (counted op by op, which is slow): a decoding step's FLOPs grow
    linearly with the number of cached positions, so two steps give every later one exactly. Peak memory comes from
    the same short run: a static cache is allocated whole before the prefill, so later steps add one token's
    activations at most (a dynamic cache grows by a few more positions).
    """
    counter = FlopCounterMode(display=False, custom_mapping=_custom_flops())
    marks: list[int] = []
    attention_marks: list[int] = []

    def attention_so_far() -> int:
        by_op = counter.get_flop_counts().get("Global", {})
        return sum(v for op, v in by_op.items() if any(name in str(op) for name in ATTENTION_OPS))

    def on_token(step: int) -> None:
        marks.append(counter.get_total_flops())
        attention_marks.append(attention_so_far())

    def run() -> None:
        with counter:
            greedy_generate(
                model,
                inputs,
                min(new_tokens, 3),
                cache=cache,
                on_token=on_token,
                cache_length=inputs["input_ids"].shape[1] + new_tokens,  # the shapes of the full generation
            )

    peak = peak_memory_bytes(run, device) if memory else run()

    def extrapolate(values: list[int]) -> tuple[int, int]:
        prefill = values[0]
        steps = [b - a for a, b in zip(values, values[1:])]  # FLOPs of each decoding step that ran
        n_steps = new_tokens - 1
        if len(steps) < 2 or n_steps <= len(steps):
            return prefill, sum(steps[:n_steps])
        first, growth = steps[0], steps[1] - steps[0]
        return prefill, n_steps * first + growth * n_steps * (n_steps - 1) // 2

    prefill, decode = extrapolate(marks)
    attention = sum(extrapolate(attention_marks))
    flops = {
        "flops": int(prefill + decode),
        "flops_prefill": int(prefill),
        "flops_decode": int(decode),
        "flops_attention": int(attention),
    }
    return flops, peak


def flops_estimate(model, prompt_tokens_total: int, batch: int, new_tokens: int) -> int:
    """2 x parameters x tokens: every token through every weight matrix of the transformer, plus the output head
    for the ``new_tokens`` positions whose logits are computed (the input embedding is a lookup, no FLOPs). Adapter
    modules (projectors, compressors, LoRA) are left out: the estimate is the base LLM's."""

    lm = _base_lm(model)
    embedding, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    adapter_params: set[int] = set()
    for module in lm.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.adapter_layer_names:
                adapter_params.update(id(p) for p in getattr(module, name).parameters())
    skip = {id(p) for p in embedding.parameters()} | adapter_params
    body = head_params = 0
    for module in lm.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in skip]
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):  # int8 layers keep weights outside parameters
            own.append(packed._weight_bias()[0])
        n = sum(p.numel() for p in own)
        if module is head:
            head_params = n
        else:
            body += n
        skip.update(id(p) for p in own)
    if head is not None and head_params == 0:  # tied to the input embedding
        weight = head.weight() if callable(head.weight) else head.weight
        head_params = weight.numel()
    tokens = prompt_tokens_total + batch * (new_tokens - 1)  # the last token is chosen, never fed back
    return int(2 * body * tokens + 2 * head_params * batch * new_tokens)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensors allocated during ``fn()`` above what was allocated before it.

    CUDA: the caching allocator's peak statistic. CPU: torch.profiler's memory events (every allocation and free of
    tensor memory, in time order) summed into a running total; this sees tensors only, not the Python heap or the
    allocator's slack, which is what a comparison of methods needs (process RSS mixes in everything else).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return int(peak)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def make_train_step(model, batch: dict, loss: Callable, lr: float = 1e-4) -> Callable[[], float]:
    """One optimiser step (forward, backward, AdamW) on a fixed batch with ``loss(model, batch)``; returns the loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to benchmark a training step with.")
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()

    def step() -> float:
        value = loss(model, dict(batch))  # a copy: the trainer's loss takes the labels out of its inputs
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(value.detach())

    return step


def one_stack_loss(model, tokenizer, device: torch.device, output_dir: str) -> Callable:
    """The loss of peft_ctx's one training stack, ``ContextSFTTrainer.compute_loss`` (answer-span NLL), for ``model``
    (a peft_ctx adapter or the LoRA baseline alike)."""
    args = ContextSFTConfig(
        output_dir=output_dir,
        report_to=[],
        use_cpu=device.type == "cpu",
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    trainer = ContextSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"question": "unused"}]),  # the steps get their batches directly
        data_collator=lambda rows: rows,
        processing_class=tokenizer,
    )
    return trainer.compute_loss
