"""Shared test helpers: tiny random causal LMs of several architectures, parameter snapshots (the tiny encoder is
``peft_ctx.harness.tiny.tiny_encoder_dir``, through the ``encoder_dir`` fixture)."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import sys

import pytest
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

from peft_ctx.harness.rows import encoder_for, tiny_configs  # noqa: F401 (encoder_for: the tests')
from peft_ctx.harness.tiny import RETRIEVER_DIM  # noqa: F401 (the tests' retriever width, the tiny encoder's)

ARCHITECTURES = ("llama", "mistral", "mixtral", "qwen2", "gemma", "gpt2")
# Every tiny row of the methods peft_ctx registers (peft_ctx.harness.rows), read once when the suite starts, so that a
# method a test module registers (the fourth method) does not change other modules' parameters: that module checks
# each of these places for its own method.
TINY_ROWS = tuple(sorted(tiny_configs()))


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


def tiny_adapter_config(row: str, encoder_dir: str):
    """The config of tiny row ``row`` (one of ``TINY_ROWS``, or a method registered since); ``encoder_dir``: the tiny
    encoder (COCOM-light's compressor)."""
    return tiny_configs(encoder_dir)[row]()


def perturb(model, seed: int = 1):
    """Random values in every adapter tensor, so that LoRA (zero-initialised B) and the slots change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                with writable(param):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def tiny_adapter(row: str, arch: str, tokenizer, encoder_dir: str, seed: int = 0):
    """Tiny row ``row`` on a tiny ``arch`` model sensitive to its inputs, every adapter tensor random, in eval mode."""
    from peft import get_peft_model

    base = tiny_model(arch, tokenizer, seed=seed, initializer_range=0.2)
    return perturb(get_peft_model(base, tiny_adapter_config(row, encoder_dir)).eval(), seed=seed + 1)


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


# ---- engines on the real SmolLM2 (tests/test_llama_cpp.py, tests/test_vllm.py) --------------------------------------
def cpkc_rows(n: int) -> tuple[list[str], list[list[str]]]:
    """The first ``n`` held-out CPKC test questions with their one passage each (evaluation only)."""
    from peft_ctx.harness.data import load_qa

    test = load_qa("cpkc")["test"].select(range(n))
    return [r["question"] for r in test], [r["contexts"][:1] for r in test]


def every_method(base, minilm):
    """One PeftModel on ``base`` with an adapter of every method (xrag, spring, cocom_xi16, cocom_light); LoRA B drawn
    at random, so that COCOM's merged export differs from the base model."""
    from peft import get_peft_model

    import peft_ctx
    from peft_ctx.harness import assets

    configs = {
        "xrag": peft_ctx.XRAGConfig(**minilm.describe()),
        "spring": peft_ctx.SpringConfig(num_virtual_tokens=8),
        "cocom_xi16": peft_ctx.CocomConfig(compression_rate=16, max_passage_tokens=256, lora_r=8),
        "cocom_light": peft_ctx.CocomConfig(
            compression_rate=4, max_passage_tokens=256, lora_r=8, compressor=assets.hub_id(assets.minilm_dir())
        ),
    }
    names = list(configs)
    model = get_peft_model(base, configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, 0.01)
    return model.eval()


def row_prompts(model, tokenizer, row: str, questions, contexts, minilm):
    """The batches of 8 that ``peft_ctx.generate`` builds for a row of ``every_method``'s model ("rag": text RAG with
    xRAG's prompt, to be run with the adapter disabled), and their engine prompts."""
    import peft_ctx

    batches = [slice(i, i + 8) for i in range(0, len(questions), 8)]
    if row == "rag":
        config = model.peft_config["xrag"]
        inputs = [
            peft_ctx.inference.collate(
                config, peft_ctx.inference.text_examples(config, tokenizer, questions[b], contexts[b]), tokenizer
            )
            for b in batches
        ]
    else:
        encoder = minilm if row == "xrag" else None
        inputs = [
            peft_ctx.prepare_inputs(model, tokenizer, questions[b], contexts[b], encoder=encoder) for b in batches
        ]
    return inputs, [p for batch in inputs for p in peft_ctx.inference.batch_prompts(model, batch)]


def torch_greedy_ids(model, tokenizer, batches, new_tokens: int) -> list[list[int]]:
    """Greedy ``model.generate`` on each padded batch: per question its new token ids, the end token dropped."""
    import peft_ctx

    out = []
    stop = set(peft_ctx.inference.eos_ids(model, tokenizer))
    for inputs in batches:
        generated = model.generate(
            **inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )[:, inputs["input_ids"].shape[1] :]
        for row in generated.tolist():
            while row and row[-1] in stop:  # padding after the end token, and the end token itself
                row.pop()
            out.append(row)
    return out


def assert_engine_agrees(model, tokenizer, engine, row: str, questions, contexts, minilm, new_tokens: int) -> None:
    """An engine's greedy answers for a row of ``every_method``'s model (its adapter active; "rag": xRAG's, whose
    export is the base model) against the torch path's: first tokens on >= 95% of the questions, whole answers on
    >= 90%, and ``peft_ctx.generate`` with ``engine=`` returning those very tokens as text."""
    import peft_ctx

    if row == "rag":
        engine.check_base(model)
        with model.disable_adapter():
            inputs, prompts = row_prompts(model, tokenizer, row, questions, contexts, minilm)
            expected = torch_greedy_ids(model, tokenizer, inputs, new_tokens)
    else:
        engine.check_model(model)
        inputs, prompts = row_prompts(model, tokenizer, row, questions, contexts, minilm)
        expected = torch_greedy_ids(model, tokenizer, inputs, new_tokens)
    got = engine.generate_prompts(prompts, new_tokens, peft_ctx.inference.eos_ids(model, tokenizer))
    first = sum(a[:1] == b[:1] for a, b in zip(expected, got, strict=True)) / len(got)
    whole = sum(a == b for a, b in zip(expected, got, strict=True)) / len(got)
    print(f"{engine.name} {row}: first token {first:.0%}, answers {whole:.0%}")
    # The public entry points decode the same prompts with the engine: their strings are these token ids.
    if row == "rag":
        public = peft_ctx.generate_baseline(
            model, tokenizer, questions[:8], contexts[:8], max_new_tokens=new_tokens, engine=engine
        )
    else:
        encoder = minilm if row == "xrag" else None
        public = peft_ctx.generate(
            model, tokenizer, questions[:8], contexts[:8], encoder=encoder, max_new_tokens=new_tokens, engine=engine
        )
    assert public == [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in got[:8]]
    assert first >= 0.95, (row, first)
    assert whole >= 0.90, (row, whole)
    assert len({tuple(ids) for ids in expected}) > 1  # the answers depend on the question: not a constant output


def assert_engine_refuses(model, tokenizer, engines: dict, questions, contexts, served_model: str) -> None:
    """Engines of ``every_method``'s adapters refuse another adapter's embeddings, a merged COCOM export for the
    baselines, sampling, and embeddings of another width (``served_model``: how the engine names its model)."""
    from peft import get_peft_model

    import peft_ctx

    model.set_adapter("spring")
    with pytest.raises(ValueError, match="serves 'xrag' embeddings, but the active adapter is 'spring'"):
        peft_ctx.generate(model, tokenizer, questions[:1], contexts[:1], engine=engines["xrag"])
    model.set_adapter("cocom_xi16")
    with pytest.raises(ValueError, match="made for another cocom adapter"):
        peft_ctx.generate(model, tokenizer, questions[:1], contexts[:1], engine=engines["cocom_light"])
    with pytest.raises(ValueError, match="decoder LoRA merged; the baselines"):
        peft_ctx.generate_baseline(model, tokenizer, questions[:1], contexts[:1], engine=engines["cocom_xi16"])
    with pytest.raises(ValueError, match="decodes greedily"):
        peft_ctx.generate(model, tokenizer, questions[:1], contexts[:1], engine=engines["cocom_xi16"], do_sample=True)
    # Embeddings of another width (a tiny model's) reach the engine directly: refused, naming both widths.
    tiny = get_peft_model(tiny_model("llama", tokenizer), peft_ctx.SpringConfig(num_virtual_tokens=4))
    prompts = peft_ctx.serving.serving_prompts(tiny, tokenizer, ["Who?"], [["A passage."]])
    with pytest.raises(ValueError, match=f"width 64, the {served_model}'s hidden size is 576"):
        engines["spring"].generate_prompts(prompts, 4)


# ---- training with the one stack on the CPU ------------------------------------------------------------------------
def cpu_sft_config(tmp_path, steps: int, lr: float, batch_size: int, **overrides):
    """A ``ContextSFTConfig`` for a few CPU steps in fp32 that saves nothing and logs every step (seed 0)."""
    from peft_ctx.training import ContextSFTConfig

    settings = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=lr,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    return ContextSFTConfig(**{**settings, **overrides})


def sft_trainer(model, args, rows: list[dict], collator, tokenizer):
    """The one training stack's trainer on ``rows`` (a list of dicts) with ``collator``."""
    from datasets import Dataset

    from peft_ctx.training import ContextSFTTrainer

    return ContextSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=collator,
        processing_class=tokenizer,
    )
