"""The adapter contract: what every registered method's adapter keeps, checked once for every tiny row (``TINY_ROWS``,
the registry's tiny configurations) on tiny random models with SmolLM2's real tokenizer. Method-specific behaviour
(what the slots hold, the options, the training recipes) is in each method's own test module.

* Save / load: ``save_pretrained`` then ``PeftModel.from_pretrained`` (also with ``low_cpu_mem_usage``) gives back the
  config and bit-identical logits; the saved file names no adapter, and an adapter loaded for inference is frozen.
* Disabled = base: inside ``disable_adapter()`` the logits are the base model's bit for bit, context inputs given or
  not; enabled, the adapter changes them.
* Batched = one by one: in a left-padded batch each question gets the next-token logits it gets alone, and the same
  greedy answer.
* KV cache: greedy generation with the cache gives the tokens (and the step logits) it gives without, and each cached
  decoding step's logits are a full forward pass's over the generated sequence.
* Parameters: ``requires_grad`` exactly on the adapter's own tensors (named by the adapter), the base tensors frozen
  and bit for bit the base model's, also after disabling / switching adapters and after loading with
  ``is_trainable=True``; a bf16 base keeps fp32 adapter tensors and runs; an adapter refuses a base of another hidden
  size.
* Several adapters: adapters of the same and of another method on one base switch with ``set_adapter`` (each gives its
  own logits exactly), save apart, and ``delete_adapter`` removes one and leaves the others.
* Unload: ``unload()`` and deleting the last adapter give back the base model exactly; ``merge_and_unload()`` is
  refused (context slots are no weight delta).

Cost: save / load, the batch's logits and the parameters run on every row x architecture (forward passes only);
disabled = base, greedy generation (batched, KV cache), unload and the other ways of loading (``low_cpu_mem_usage``,
``is_trainable``) on every row on llama (rotary positions, tied embeddings) and gpt2 (absolute positions, Conv1D
layers); several adapters, bf16 and the hidden size on llama. One adapter per row x architecture is built per module
(``case``) and shared read-only; a test that changes a model changes a copy. Logits are compared at the prompt's last
``KEEP`` positions.

Tolerances: save / load, switching adapters, disabling and unloading run the same weights through the same path and
are compared exactly (``torch.equal``; the separate base model is frozen as PEFT freezes the adapter's copy). A batch
against one by one and a cached decoding step against a full forward run other kernels (other shapes, other
padding), so their logits are compared with ``CROSS_PATH``.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors import safe_open

import peft_ctx
from peft_ctx.layer import ContextEmbedding
from tests.helpers import (
    ARCHITECTURES,
    TINY_ROWS,
    clone,
    encoder_for,
    perturb,
    positions,
    tiny_adapter_config,
    tiny_model,
)

QUESTIONS = ["Who wrote the report?", "Where is the lighthouse?", "When did the river flood?"]
# 2, 1 and 3 passages of different lengths (the first longer than the tiny COCOM's 16 passage tokens): prompts of three
# lengths, so that the batch is left-padded.
PASSAGES = [
    ["The report was written by Ada Obi for the river authority in the spring of 2019.", "Ada Obi lives in Verrin."],
    ["The lighthouse stands on Skerry Point."],
    ["The river floods each spring.", "Snow melts in the Aldor hills in April.", "The flood of 1950 was the worst."],
]
NEW_TOKENS = 3
# Logits are compared at the prompt's last KEEP positions (the end of the question and the chat template's turn, each
# attending to every context slot): the whole vocabulary at every position is 36 MB a forward pass, which made most of
# this module's time, and much more of it on a busy machine.
KEEP = 8
# The tiny models (initializer_range 0.2) have logits up to about 8 in magnitude and amplify rounding. Measured on an
# AVX-512 CPU: a batch's last-position logits are at most 7.5e-5 from one by one's (COCOM-light on gemma), a cached
# decoding step's at most 6.6e-5 from the full forward's on llama and gpt2 (3.6e-4 on mixtral, COCOM with a separate
# compressor LoRA, where one step amplifies the rounding).
CROSS_PATH = dict(rtol=1e-4, atol=1e-3)

# Every row on every architecture; llama and gpt2 first, so that the shorter lists are prefixes of this one: pytest
# groups the tests by the index of the module-scoped ``case`` parameter and builds each adapter once.
ARCHS = ("llama", "gpt2", *(a for a in ARCHITECTURES if a not in ("llama", "gpt2")))
SWEEP = [(row, arch) for arch in ARCHS for row in TINY_ROWS]
GENERATE = SWEEP[: 2 * len(TINY_ROWS)]  # llama and gpt2
LLAMA = SWEEP[: len(TINY_ROWS)]
IDS = [f"{row}-{arch}" for row, arch in SWEEP]


@dataclass
class Case:
    """One tiny row on one architecture, built once per module."""

    row: str
    arch: str
    model: PeftModel  # the row's adapter, every tensor random, eval mode: read it, change a copy
    base: torch.nn.Module  # the same base model, without the adapter
    encoder: object  # the tiny retriever encoder when the row reads retriever vectors (xRAG), else None
    inputs: dict  # QUESTIONS and PASSAGES through prepare_inputs, left-padded
    logits: torch.Tensor  # the adapter's on inputs  # [batch, KEEP, vocab]

    @functools.cached_property
    def base_logits(self) -> torch.Tensor:
        """The base model's on the same token ids.  # [batch, KEEP, vocab]"""
        with torch.no_grad():
            return self.base(**plain(self.inputs)).logits


def assert_same_as_base(got: torch.Tensor, base: torch.Tensor) -> None:
    """The adapter's model (disabled, unloaded or emptied) against the separate, equally frozen base model: the same
    weights through the same kernels, so bit for bit."""
    assert torch.equal(got, base), float((got - base).abs().max())


def plain(inputs: dict) -> dict:
    """The token ids and attention mask alone (what the base model reads), with the position ids of the padding."""
    return {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "position_ids": positions(inputs),
        "logits_to_keep": KEEP,
    }


def forward(model, inputs: dict, keep: int = KEEP) -> torch.Tensor:
    """Logits at the last ``keep`` positions of a forward pass on a left-padded batch (position ids from the mask, as
    generate derives them).  # [batch, keep, vocab]"""
    with torch.no_grad():
        return model(**inputs, position_ids=positions(inputs), logits_to_keep=keep).logits


def adapter_tensors(model, base) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's parameters split into the base model's (by their name in ``base``) and the adapter's own."""
    base_names = {name for name, _ in base.named_parameters()}
    ours, theirs = {}, {}
    for name, param in model.named_parameters():
        in_base = name.removeprefix("base_model.model.").replace(".base_layer", "")
        (theirs if in_base in base_names else ours)[in_base if in_base in base_names else name] = param
    return ours, theirs


def adapter_on(base, row: str, encoder_dir: str, seed: int = 1):
    """Tiny row ``row`` on a copy of ``base``, every adapter tensor random (``seed``), in eval mode: ``tiny_adapter``
    with the base model kept apart."""
    return perturb(get_peft_model(clone(base), tiny_adapter_config(row, encoder_dir)).eval(), seed=seed)


def trainable(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def as_saved(config) -> dict:
    """A config as its JSON file has it (tuples as lists, int keys as strings), without the load-time mode."""
    values = json.loads(json.dumps(config.to_dict(), default=str))
    values.pop("inference_mode")
    return values


@pytest.fixture(scope="module")
def base_of(tokenizer):
    """The tiny base model of an architecture, built once while its cases run (they come by architecture); frozen as
    PEFT freezes the adapter's copy, so that both take the same matmul path (docs/testing.md: MKL's AVX2 gemm rounds
    the head's folded and unfolded layouts apart, and torch folds only for weights without a gradient)."""
    return functools.lru_cache(maxsize=1)(
        lambda arch: tiny_model(arch, tokenizer, initializer_range=0.2).requires_grad_(False)
    )


@pytest.fixture(scope="module")
def case(request, base_of, tokenizer, encoder_dir, encoder) -> Case:
    row, arch = request.param
    base = base_of(arch)
    model = adapter_on(base, row, encoder_dir)
    enc = encoder_for(model, encoder)
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES, encoder=enc)
    assert not inputs["attention_mask"][:, 0].all() and inputs["context_mask"].any(-1).all()  # padded, slots
    return Case(row, arch, model, base, enc, inputs, forward(model, inputs))


def rows_on(cases):
    """Parametrise a test over ``cases`` (a prefix of SWEEP) through the module-scoped ``case`` fixture."""
    return pytest.mark.parametrize("case", cases, indirect=True, ids=IDS[: len(cases)])


# ---- save / load ----------------------------------------------------------------------------------------------------


@rows_on(SWEEP)
def test_save_and_load_give_back_the_config_and_identical_logits(case, tmp_path):
    case.model.save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert type(config) is peft_ctx.get_method(case.model.active_peft_config.method).config_class
    assert as_saved(config) == as_saved(case.model.active_peft_config)
    with safe_open(os.path.join(tmp_path, "adapter_model.safetensors"), framework="pt") as f:
        assert not any("default" in key for key in f.keys())  # loads under any adapter name
    loaded = PeftModel.from_pretrained(clone(case.base), tmp_path).eval()
    assert not trainable(loaded)  # loaded for inference: every adapter tensor frozen
    assert torch.equal(forward(loaded, case.inputs), case.logits)
    if (case.row, case.arch) in GENERATE:  # the other ways of loading, on llama and gpt2
        loaded = PeftModel.from_pretrained(clone(case.base), tmp_path, low_cpu_mem_usage=True).eval()
        assert torch.equal(forward(loaded, case.inputs), case.logits)  # the adapter built on the meta device first
        # Loaded to train on: exactly the tensors that train in a new adapter.
        loaded = PeftModel.from_pretrained(clone(case.base), tmp_path, is_trainable=True)
        assert trainable(loaded) == trainable(case.model)


# ---- disabled = base ------------------------------------------------------------------------------------------------


@rows_on(GENERATE)
def test_the_disabled_adapter_gives_exactly_the_base_model_logits(case):
    model, inputs = case.model, case.inputs
    assert not torch.equal(case.logits, case.base_logits)  # enabled, the adapter changes the logits
    with model.disable_adapter():
        assert_same_as_base(forward(model, inputs), case.base_logits)  # the context inputs are ignored
        with torch.no_grad():
            assert_same_as_base(model(**plain(inputs)).logits, case.base_logits)  # and LoRA is off too
    assert torch.equal(forward(model, inputs), case.logits)  # enabled again on leaving


# ---- batched = one by one -------------------------------------------------------------------------------------------


@rows_on(SWEEP)
def test_each_question_of_a_padded_batch_gets_the_logits_it_gets_alone(case, tokenizer):
    for i, (question, passages) in enumerate(zip(QUESTIONS, PASSAGES)):
        one = peft_ctx.prepare_inputs(case.model, tokenizer, [question], [passages], encoder=case.encoder)
        assert not (one["attention_mask"] == 0).any()
        torch.testing.assert_close(forward(case.model, one, keep=1)[0, -1], case.logits[i, -1], **CROSS_PATH)


@rows_on(GENERATE)
def test_batched_generation_gives_the_answers_of_one_by_one(case, tokenizer):
    options = dict(encoder=case.encoder, max_new_tokens=NEW_TOKENS)
    batched = peft_ctx.generate(case.model, tokenizer, QUESTIONS, PASSAGES, batch_size=len(QUESTIONS), **options)
    single = [
        peft_ctx.generate(case.model, tokenizer, [question], [passages], batch_size=1, **options)[0]
        for question, passages in zip(QUESTIONS, PASSAGES)
    ]
    assert batched == single


# ---- KV cache -------------------------------------------------------------------------------------------------------


@rows_on(GENERATE)
def test_kv_cache_decoding_equals_decoding_without_cache_and_a_full_forward(case):
    model, inputs = case.model, case.inputs
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        cached = model.generate(**inputs, **options)
        uncached = model.generate(**inputs, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    steps = torch.stack(cached.logits, 1)  # [batch, new_tokens, vocab]
    torch.testing.assert_close(torch.stack(uncached.logits, 1), steps, **CROSS_PATH)
    length = inputs["input_ids"].shape[1]
    assert cached.sequences.shape == (len(QUESTIONS), length + NEW_TOKENS)
    # The whole generated sequence in one forward pass: the prompt's context slots again, none after it.
    after = torch.ones(len(QUESTIONS), NEW_TOKENS, dtype=inputs["attention_mask"].dtype)
    full = dict(
        inputs,
        input_ids=cached.sequences,
        attention_mask=torch.cat([inputs["attention_mask"], after], 1),
        context_mask=torch.cat([inputs["context_mask"], torch.zeros_like(after, dtype=torch.bool)], 1),
    )
    torch.testing.assert_close(steps, forward(model, full, keep=NEW_TOKENS + 1)[:, :-1], **CROSS_PATH)


# ---- parameters -----------------------------------------------------------------------------------------------------


@rows_on(SWEEP)
def test_requires_grad_is_on_the_adapter_tensors_only_and_the_base_is_untouched(case):
    model = case.model
    ours, theirs = adapter_tensors(model, case.base)
    base = dict(case.base.named_parameters())
    assert theirs.keys() == base.keys()  # every base tensor is there once, in its place
    for name, param in theirs.items():
        assert not param.requires_grad and torch.equal(param, base[name]), name
    assert ours and all(param.requires_grad for param in ours.values())
    # Named by the adapter (its companions "<adapter>__<role>" too), so that adapters sit side by side.
    assert all(any(part.split("__")[0] == "default" for part in name.split(".")) for name in ours)
    expected = trainable(model)
    with model.disable_adapter():
        pass
    model.set_adapter("default")
    assert trainable(model) == expected  # (loading with is_trainable: the save / load test)


@pytest.mark.parametrize("row", TINY_ROWS)
def test_a_bf16_base_keeps_fp32_adapter_tensors_and_runs(row, tokenizer, encoder_dir, encoder):
    base = tiny_model("llama", tokenizer, initializer_range=0.2).to(torch.bfloat16)
    reference = clone(base)
    model = perturb(get_peft_model(base, tiny_adapter_config(row, encoder_dir)).eval())
    ours, theirs = adapter_tensors(model, reference)
    assert ours and {param.dtype for param in ours.values()} == {torch.float32}
    assert {param.dtype for param in theirs.values()} == {torch.bfloat16}  # the base stays as loaded
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES, encoder=encoder_for(model, encoder))
    logits = forward(model, inputs)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@rows_on(LLAMA)
def test_an_adapter_refuses_a_base_of_another_hidden_size(case, tokenizer, tmp_path):
    case.model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden size 64 .* has hidden size 96"):
        PeftModel.from_pretrained(tiny_model(case.arch, tokenizer, hidden_size=96), tmp_path)


# ---- several adapters -----------------------------------------------------------------------------------------------


@rows_on(LLAMA)
def test_adapters_of_one_and_of_another_method_switch_save_apart_and_delete(
    case, tokenizer, encoder_dir, encoder, tmp_path
):
    """Three adapters on one base: "first" the row's, "second" the same row with other weights, "third" the next row
    (another method, or another variant of the method)."""
    other_row = TINY_ROWS[(TINY_ROWS.index(case.row) + 1) % len(TINY_ROWS)]
    adapters = {
        "first": case.model,
        "second": adapter_on(case.base, case.row, encoder_dir, seed=11),
        "third": adapter_on(case.base, other_row, encoder_dir),
    }
    expected = {"first": (case.inputs, case.logits)}
    for name, model in adapters.items():
        model.save_pretrained(tmp_path / name)
        if name not in expected:
            inputs = peft_ctx.prepare_inputs(
                model, tokenizer, QUESTIONS, PASSAGES, encoder=encoder_for(model, encoder)
            )
            expected[name] = (inputs, forward(model, inputs))
    assert not torch.equal(expected["first"][1], expected["second"][1])

    model = PeftModel.from_pretrained(clone(case.base), tmp_path / "first", adapter_name="first").eval()
    for name in ("second", "third"):
        model.load_adapter(tmp_path / name, adapter_name=name)
    model.eval()
    for name in ("first", "second", "third", "first"):
        model.set_adapter(name)
        inputs, logits = expected[name]
        assert torch.equal(forward(model, inputs), logits), name

    model.save_pretrained(tmp_path / "all")  # each adapter keeps only its own tensors
    for name in adapters:
        alone, together = saved_tensors(tmp_path / name), saved_tensors(tmp_path / "all" / name)
        assert alone.keys() == together.keys() and all(torch.equal(alone[k], together[k]) for k in alone), name

    model.delete_adapter("second")
    assert not any("second" in name for name, _ in model.named_parameters())  # companions too
    for name in ("third", "first"):
        model.set_adapter(name)
        inputs, logits = expected[name]
        assert torch.equal(forward(model, inputs), logits), name


# ---- unload ---------------------------------------------------------------------------------------------------------


@rows_on(GENERATE)
def test_unload_and_deleting_the_adapter_give_back_the_base_model(case):
    model = clone(case.model)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    unloaded = model.unload()
    assert not isinstance(unloaded.get_input_embeddings(), ContextEmbedding)
    assert {name for name, _ in unloaded.named_parameters()} == {name for name, _ in case.base.named_parameters()}
    with torch.no_grad():
        assert_same_as_base(unloaded(**plain(case.inputs)).logits, case.base_logits)

    model = clone(case.model)
    model.delete_adapter("default")
    ours, _ = adapter_tensors(model, case.base)
    assert not ours
    with torch.no_grad():  # PEFT's own forward needs an adapter: the wrapped transformers model
        assert_same_as_base(model.base_model.model(**plain(case.inputs)).logits, case.base_logits)
