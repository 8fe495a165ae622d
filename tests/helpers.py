"""Shared test helpers: tiny random causal LMs of several architectures, parameter snapshots (the tiny encoder is
``benchmarks.cuda_check.tiny_encoder_dir``, through the ``encoder_dir`` fixture)."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import sys

import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
)

ARCHITECTURES = ("llama", "mistral", "mixtral", "qwen2", "gemma", "gpt2")
RETRIEVER_DIM = 32


def tiny_config(arch: str, vocab_size: int, hidden_size: int = 64):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "mixtral":
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "gemma":
        return GemmaConfig(**common, head_dim=hidden_size // 4)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=2, n_head=4, n_positions=1024)
    raise ValueError(arch)


def tiny_model(arch: str, tokenizer, seed: int = 0, hidden_size: int = 64, initializer_range: float = 0.02):
    """A random model; a larger ``initializer_range`` makes it sensitive enough to its inputs for training tests."""
    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer), hidden_size)
    config.pad_token_id = tokenizer.pad_token_id
    config.initializer_range = initializer_range
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def real_smollm2():
    """SmolLM2-135M-Instruct in fp32 and its tokenizer, from the offline asset (the slow / engine tests)."""
    from transformers import AutoTokenizer

    from peft_ctx.harness import assets

    path = assets.smollm2_model_dir()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def real_minilm():
    """all-MiniLM-L6-v2 as a peft_ctx Encoder, from the offline asset."""
    import peft_ctx
    from peft_ctx.harness import assets

    return peft_ctx.Encoder(assets.minilm_dir())


@contextlib.contextmanager
def writable(param: torch.Tensor):
    """Write ``param`` whole inside the block, also when DeepSpeed ZeRO-3 partitioned it (rank 0's values are kept;
    every rank writes the same)."""
    if not hasattr(param, "ds_id"):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        yield


def load_train_script(name: str, monkeypatch):
    """``train/<name>.py`` as a module (its ``main``, ``ScriptArguments`` ...), in ``sys.modules`` for the test's
    length only."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"train_{name}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while defining classes
    spec.loader.exec_module(module)
    return module


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    after = module.state_dict()
    return {name for name, tensor in before.items() if not torch.equal(tensor, after[name])}


# Gradient checkpointing recomputes the forward pass, whose tensors can reach the matrix kernels in other layouts
# (gpt2's Conv1D addmm): MKL's AVX2 gemm (AMD CPUs) then rounds them apart by up to 4.3e-5 of a gradient's top entry
# (measured with MKL_ENABLE_INSTRUCTIONS=AVX2; AVX-512 MKL gives the same bits). Each tensor is compared at its own
# scale, floored at 1e-3 of the largest gradient of all: entry-wise relative error only measures cancellation near
# zero, and a gradient that is zero in exact arithmetic (a BERT key bias: softmax ignores a per-query shift) is pure
# rounding, while a wrong gradient (a path lost, a double count) is off by its whole size.
CHECKPOINT_REL_TOL = 2e-4


def gradients_apart(
    expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], rel: float = CHECKPOINT_REL_TOL
) -> list[str]:
    """Names whose largest difference exceeds ``rel`` times the expected tensor's largest magnitude (floored at 1e-3
    of the largest expected gradient)."""
    floor = 1e-3 * max(float(t.abs().max()) for t in expected.values())
    return [
        name
        for name, want in expected.items()
        if float((actual[name] - want).abs().max()) > rel * max(float(want.abs().max()), floor)
    ]


def clone(model):
    return copy.deepcopy(model)


def positions(inputs: dict) -> torch.Tensor:
    """Position ids for a padded batch: a plain forward of an absolute-position model needs them with left padding
    (generate derives them from the attention mask itself).  # [batch, seq]"""
    return (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)


def captured_embeddings(model, inputs: dict) -> torch.Tensor:
    """What the peft_ctx embedding layer hands to the transformer in one forward.  # [batch, seq, hidden]"""
    layer = model.get_base_model().get_input_embeddings()
    captured = {}
    handle = layer.register_forward_hook(lambda mod, args, out: captured.setdefault("embeds", out))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return captured["embeds"]


def context_module(model, adapter_name: str = "default") -> torch.nn.Module:
    """An adapter's own module (projector, virtual tokens, compressor parts) inside the embedding wrapper."""
    return model.get_base_model().get_input_embeddings().ctx_modules[adapter_name]
