"""``prepare_inputs`` and ``generate``: questions and retrieved documents in, model inputs / answers out."""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.generation.utils import GenerationMixin

from .config import ContextConfig
from .methods import get_method
from .prompting import Example, Part, fill_template, pad_examples, pad_token_id, tokenize_parts


def active_config(model) -> ContextConfig:
    """The active peft_ctx adapter config of a PeftModel."""
    config = getattr(model, "active_peft_config", None)
    if not isinstance(config, ContextConfig):
        raise ValueError(
            f"Expected a PeftModel with an active peft_ctx adapter, got {type(model).__name__} with active config "
            f"{type(config).__name__}; build it with peft.get_peft_model(base, peft_ctx.XRAGConfig(...)) or "
            "PeftModel.from_pretrained(base, adapter_dir) after `import peft_ctx`."
        )
    return config


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def context_length(model) -> Optional[int]:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def with_resources(config: ContextConfig, options: dict[str, Any], tokenizer=None, model=None) -> dict[str, Any]:
    """The method's options plus the shared objects it asked for (``ContextMethod.option_resources``)."""
    resources = {"tokenizer": tokenizer, "model": model}
    wanted = get_method(config.method).option_resources
    return {**{name: resources[name] for name in wanted if resources.get(name) is not None}, **options}


def build_examples(
    config: ContextConfig,
    tokenizer,
    questions: Sequence[str],
    contexts: Optional[Sequence] = None,
    answers: Optional[Sequence[str]] = None,
    model=None,
    **options: Any,
) -> list[Example]:
    """Tokenise a batch of (question, documents[, answer]) with the adapter's prompt; no padding yet.

    ``model`` (the PeftModel) is passed on to methods that need it to read documents (COCOM-light's tokenizer)."""
    if isinstance(questions, str):
        raise ValueError("questions must be a list of strings, got a single string; wrap it in a list.")
    questions = list(questions)
    for i, question in enumerate(questions):
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"questions[{i}] is {question!r:.60}; questions must be non-empty strings.")
    if answers is not None and len(answers) != len(questions):
        raise ValueError(f"Got {len(answers)} answers for {len(questions)} questions; give one answer per question.")
    method = get_method(config.method)
    options = with_resources(config, options, tokenizer=tokenizer, model=model)
    if contexts is not None:
        if isinstance(contexts, torch.Tensor) and contexts.dim() == 2:
            contexts = [row.unsqueeze(0) for row in contexts]  # one vector per question
        if len(contexts) != len(questions):
            raise ValueError(
                f"Got {len(contexts)} context lists for {len(questions)} questions; give one list of documents "
                "per question (contexts=[[doc, ...], ...])."
            )
        docs_per_example = method.prepare_docs(config, list(contexts), options)
    else:
        docs_per_example = [None] * len(questions)
    examples = []
    for i, (question, docs) in enumerate(zip(questions, docs_per_example)):
        fields, payload = method.prompt_fields(config, docs, options)
        parts = fill_template(config.prompt_template, {**fields, "question": [question]})
        example = tokenize_parts(
            tokenizer,
            parts,
            system_prompt=config.system_prompt,
            use_chat_template=config.use_chat_template,
            answer=None if answers is None else answers[i],
        )
        example.context = payload
        examples.append(example)
    return examples


def text_examples(
    config: ContextConfig,
    tokenizer,
    questions: Sequence[str],
    contexts: Optional[Sequence[Sequence[str]]] = None,
    answers: Optional[Sequence[str]] = None,
) -> list[Example]:
    """The same prompts with the documents as plain text (text RAG), or with no documents at all.

    These are the baselines and the self-distillation teacher: the base model reads them with the adapter disabled.
    """
    method = get_method(config.method)
    return template_examples(
        tokenizer,
        questions,
        contexts,
        answers,
        prompt_template=config.prompt_template,
        system_prompt=config.system_prompt,
        use_chat_template=config.use_chat_template,
        text_fields=lambda docs: method.text_fields(config, docs),
    )


def _joined_context(docs: Optional[list[str]]) -> Optional[dict[str, list[Part]]]:
    return None if docs is None else {"context": ["\n".join(docs)]}


def template_examples(
    tokenizer,
    questions: Sequence[str],
    contexts: Optional[Sequence[Sequence[str]]] = None,
    answers: Optional[Sequence[str]] = None,
    *,
    prompt_template: str,
    system_prompt: Optional[str] = None,
    use_chat_template: bool = True,
    text_fields: Callable[[Optional[list[str]]], Optional[dict[str, list[Part]]]] = _joined_context,
) -> list[Example]:
    """Text prompts from a template: ``text_fields(docs)`` fills its fields, None means the bare question."""
    examples = []
    for i, question in enumerate(questions):
        docs = None
        if contexts is not None:
            docs = contexts[i]
            if not docs or not all(isinstance(d, str) and d.strip() for d in docs):
                raise ValueError(f"contexts[{i}] must be a non-empty list of non-empty strings for text RAG.")
        fields = text_fields(None if docs is None else list(docs))
        if fields is None:
            parts = [question]
        else:
            parts = fill_template(prompt_template, {**fields, "question": [question]})
        examples.append(
            tokenize_parts(
                tokenizer,
                parts,
                system_prompt=system_prompt,
                use_chat_template=use_chat_template,
                answer=None if answers is None else answers[i],
            )
        )
    return examples


def collate(
    config: ContextConfig,
    examples: list[Example],
    tokenizer,
    padding_side: str = "left",
    max_length: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> dict[str, torch.Tensor]:
    batch = pad_examples(examples, pad_token_id(tokenizer), padding_side=padding_side, max_length=max_length)
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    if batch["context_mask"].any():
        method = get_method(config.method)
        batch.update(method.collate_context(config, [e.context for e in examples], device))
    else:
        del batch["context_mask"]
    return batch


def prepare_inputs(
    model,
    tokenizer,
    questions: Sequence[str],
    contexts: Optional[Sequence] = None,
    *,
    encoder=None,
    answers: Optional[Sequence[str]] = None,
    padding_side: str = "left",
    **options: Any,
) -> dict[str, torch.Tensor]:
    """Model inputs for ``model(**inputs)`` / ``model.generate(**inputs)``.

    Args:
        questions: one string per example.
        contexts: per example, a list of documents: strings (encoded / compressed on the fly), or precomputed
            vectors (a ``[n_docs, d_r]`` tensor or a list of ``[d_r]`` tensors). None means no retrieval, which
            only methods that work without documents (SPRING) accept.
        encoder: a ``peft_ctx.Encoder`` when documents are text and the method needs one (xRAG).
        answers: append each answer (with labels) for training or scoring.
        options: method options, e.g. ``num_virtual_tokens`` for SPRING.
    """
    config = active_config(model)
    examples = build_examples(
        config, tokenizer, questions, contexts, answers=answers, model=model, encoder=encoder, **options
    )
    return collate(
        config,
        examples,
        tokenizer,
        padding_side=padding_side,
        max_length=context_length(model),
        device=model_device(model),
    )


@dataclass
class ServingPrompt:
    """One question's prompt as an engine receives it (no padding).

    ``input_ids`` are the prompt's token ids, with a placeholder id at each context slot; ``slot_mask`` marks the
    slots; ``embeds`` is the whole input-embedding sequence (the token embeddings, the slots filled).
    ``peft_ctx.prompt_embeds`` returns the ``embeds``; engines feed token runs as tokens and slots as embeddings."""

    input_ids: torch.Tensor  # [seq] long
    slot_mask: torch.Tensor  # [seq] bool
    embeds: Optional[torch.Tensor] = None  # [seq, hidden], the base model's dtype; None for a text-only prompt

    def segments(self) -> list[tuple[bool, int, int]]:
        """Runs of plain tokens and of slots, as ``(is_slot, start, stop)``: what an engine feeds batch by batch."""
        mask = self.slot_mask.tolist()
        runs, start = [], 0
        for i in range(1, len(mask) + 1):
            if i == len(mask) or mask[i] != mask[start]:
                runs.append((bool(mask[start]), start, i))
                start = i
        return runs


@torch.no_grad()
def _require_enabled(model) -> None:
    # An engine is sent the adapter's embeddings; disabled, the prompts would silently be the base model's.
    if model.base_model.context_layer().disable_adapters:
        raise ValueError("The adapter is disabled (inside disable_adapter()); its embeddings cannot be built there.")


def serving_prompts(
    model,
    tokenizer,
    questions: Sequence[str],
    contexts: Optional[Sequence] = None,
    *,
    encoder=None,
    **options: Any,
) -> list[ServingPrompt]:
    """The prompts of ``peft_ctx.generate`` as an engine receives them: per question its token ids, slot mask and
    input-embedding sequence (see ``prompt_embeds``)."""
    _require_enabled(model)
    inputs = prepare_inputs(model, tokenizer, questions, contexts, encoder=encoder, padding_side="left", **options)
    return batch_prompts(model, inputs)


@torch.no_grad()
def batch_prompts(model, batch: dict[str, torch.Tensor]) -> list[ServingPrompt]:
    """A padded batch of model inputs (``prepare_inputs`` / ``collate``) as unpadded engine prompts. Prompts without
    context slots (the baselines) are token ids only; with slots, the embeddings come from the tuner's own forward
    path: the method's ``before_forward`` (COCOM compresses here), then the wrapped embedding fills the slots, and
    the decoder never runs."""
    inputs = dict(batch)
    input_ids, attention_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")  # [batch, seq]
    inputs.pop("position_ids", None)
    inputs.pop("labels", None)
    slot_mask = inputs.get("context_mask")
    embeds = None
    if slot_mask is not None and bool(slot_mask.any()):
        tuner = model.base_model
        layer = tuner.context_layer()
        if layer.disable_adapters:
            raise ValueError("The prompts have context slots but the adapter is disabled (inside disable_adapter()).")
        with tuner._context(inputs):
            embeds = layer(input_ids)  # [batch, seq, hidden]
    else:
        slot_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    prompts = []
    for i in range(input_ids.shape[0]):
        keep = attention_mask[i].bool()
        prompts.append(
            ServingPrompt(
                input_ids=input_ids[i][keep].cpu(),
                slot_mask=slot_mask[i][keep].cpu(),
                embeds=None if embeds is None else embeds[i][keep].detach(),
            )
        )
    return prompts


def decode_new(tokenizer, output: torch.Tensor, prompt_len: int) -> list[str]:
    """The generated continuations of a left-padded batch, as stripped text."""
    return [text.strip() for text in tokenizer.batch_decode(output[:, prompt_len:], skip_special_tokens=True)]


def eos_ids(model, tokenizer) -> list[int]:
    """The end tokens ``model.generate`` stops at: the generation config's and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def engine_answers(
    engine, model, tokenizer, prompts: list[ServingPrompt], max_new_tokens: int, min_new_tokens: int = 0
) -> list[str]:
    """An engine's greedy answers to prompts, decoded as ``decode_new`` decodes the torch path's."""
    stop = eos_ids(model, tokenizer)
    outputs = engine.generate_prompts(prompts, max_new_tokens, stop, min_new_tokens=min_new_tokens)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]


# Options every method's prepare_inputs takes.
SHARED_OPTIONS = ("encoder", "encode_batch_size")


@functools.cache
def generation_names() -> frozenset[str]:
    """The keyword arguments ``model.generate`` takes: every ``GenerationConfig`` field and generate's own parameters
    (``generation_config``, ``streamer``, ``logits_processor`` ...)."""
    fields = set(GenerationConfig().to_dict())
    fields.update(inspect.signature(GenerationMixin.generate).parameters)
    return frozenset(name for name in fields - {"self", "inputs", "kwargs"} if not name.startswith("_"))


def split_generation_kwargs(config: ContextConfig, options: dict[str, Any]) -> tuple[dict, dict]:
    """``generate``'s keyword arguments as (method options, generation kwargs), as transformers passes generation
    settings through; a name that is neither is refused, naming both kinds."""
    method = get_method(config.method)
    own = set(method.option_names) | set(SHARED_OPTIONS)
    generation = generation_names()
    unknown = sorted(name for name in options if name not in own and name not in generation)
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for {method.title or method.name} adapters: its options are "
            f"{', '.join(sorted(own))}; generation settings are GenerationConfig fields (do_sample, temperature, "
            "top_p, num_beams ...) or generation_config=, passed on to model.generate (or give them as "
            "generation_kwargs={...})."
        )
    method_options = {k: v for k, v in options.items() if k in own}
    return method_options, {k: v for k, v in options.items() if k not in own}


def _generate_settings(tokenizer, max_new_tokens: Optional[int], given: dict[str, Any]) -> dict[str, Any]:
    """What ``model.generate`` gets: greedy decoding and ``max_new_tokens`` unless ``given`` says otherwise; with a
    ``generation_config`` its own settings govern (as in transformers) and only a missing pad token is filled in."""
    settings = dict(given)
    config = settings.get("generation_config")
    if config is not None:
        if config.pad_token_id is None:
            settings["generation_config"] = config = copy.deepcopy(config)
            config.pad_token_id = pad_token_id(tokenizer)
        return settings
    defaults = {"do_sample": False, "pad_token_id": pad_token_id(tokenizer)}
    if max_new_tokens is not None:
        defaults["max_new_tokens"] = max_new_tokens
    return {**defaults, **settings}


@torch.no_grad()
def decode_batches(
    model, tokenizer, batches: Iterable[dict[str, torch.Tensor]], gen_kwargs: dict[str, Any], max_new_tokens: int,
    engine=None,
) -> list[str]:  # fmt: skip
    """The one batching loop of ``generate``, ``generate_baseline`` and the evaluation harness: each left-padded
    batch of model inputs decoded by ``model.generate(**gen_kwargs)``, or its prompts by ``engine``; the answers in
    order, as stripped text."""
    answers: list[str] = []
    for inputs in batches:
        if engine is not None:
            answers.extend(engine_answers(engine, model, tokenizer, batch_prompts(model, inputs), max_new_tokens))
            continue
        output = model.generate(**inputs, **gen_kwargs)  # [batch, prompt + new]
        answers.extend(decode_new(tokenizer, output, inputs["input_ids"].shape[1]))
    return answers


@torch.no_grad()
def generate_baseline(
    model,
    tokenizer,
    questions: Sequence[str],
    contexts: Optional[Sequence[Sequence[str]]] = None,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    generation_kwargs: Optional[dict[str, Any]] = None,
    engine=None,
    **generate_kwargs: Any,
) -> list[str]:
    """The frozen base model with the documents as text (text RAG) or without documents (contexts=None).

    Generation settings (any ``GenerationConfig`` field, ``generation_config=``) pass through to ``model.generate``.
    ``engine`` (e.g. ``peft_ctx.LlamaCppEngine`` on the base model's GGUF) decodes the same prompts instead.
    """
    config = active_config(model)
    unknown = sorted(set(generate_kwargs) - generation_names())
    if unknown:
        raise ValueError(
            f"Unknown generation option(s) {unknown}; give GenerationConfig fields or generation_config=."
        )
    given = {**(generation_kwargs or {}), **generate_kwargs}
    gen_kwargs = _generate_settings(tokenizer, max_new_tokens, given)
    if engine is not None:
        engine.check_settings(given)
        engine.check_base(model)

    def batches():
        for start in range(0, len(questions), batch_size):
            stop = start + batch_size
            examples = text_examples(
                config, tokenizer, questions[start:stop], None if contexts is None else contexts[start:stop]
            )
            yield collate(config, examples, tokenizer, max_length=context_length(model), device=model_device(model))

    with model.disable_adapter():
        return decode_batches(model, tokenizer, batches(), gen_kwargs, max_new_tokens, engine)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    questions: Sequence[str],
    contexts: Optional[Sequence] = None,
    *,
    encoder=None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    show_progress: Optional[bool] = None,
    generation_kwargs: Optional[dict[str, Any]] = None,
    engine=None,
    **options: Any,
) -> list[str]:
    """Answer questions from their documents, batched with left padding; returns one string per question.

    Keyword arguments are the method's options (SPRING's ``num_virtual_tokens``) or generation settings, which pass
    through to ``model.generate`` as in transformers: any ``GenerationConfig`` field or ``generation_config=``
    (greedy unless they say otherwise). ``engine`` (``peft_ctx.LlamaCppEngine`` on the GGUF of this adapter's
    ``export_for_serving``) decodes the same input embeddings with an inference engine instead of ``model.generate``.
    ``contexts`` may be a COCOM ``CompressedIndex`` when the adapter retrieves by memory states (a query LoRA, as
    CLaRa's end-to-end checkpoints): each question reads its ``retrieve_k`` (default 5) best passages of the index.

    Example::

        answers = peft_ctx.generate(model, tokenizer, ["Who wrote it?"], [["Ada Obi wrote the report."]],
                                    do_sample=True, temperature=0.7, top_p=0.9)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; use a positive batch size.")
    retrieve_k = options.pop("retrieve_k", None)
    if callable(getattr(contexts, "search", None)):  # an index that retrieves (CLaRa's query LoRA): its top-k
        found = contexts.search(model, tokenizer, questions, k=5 if retrieve_k is None else retrieve_k)
        contexts = contexts.select(found.ids)
    elif retrieve_k is not None:
        raise ValueError("retrieve_k=... takes contexts=<a CompressedIndex> whose adapter retrieves (query_adapter).")
    if contexts is not None and len(contexts) != len(questions):
        raise ValueError(f"Got {len(contexts)} context lists for {len(questions)} questions.")
    options, passed_on = split_generation_kwargs(active_config(model), options)
    given = {**(generation_kwargs or {}), **passed_on}
    gen_kwargs = _generate_settings(tokenizer, max_new_tokens, given)
    if engine is not None:
        engine.check_settings(given)
        engine.check_model(model)
        _require_enabled(model)
    if show_progress is None:
        show_progress = len(questions) > 4 * batch_size

    def batches():
        for start in tqdm(range(0, len(questions), batch_size), desc="Generating", disable=not show_progress):
            stop = start + batch_size
            batch_contexts = None if contexts is None else contexts[start:stop]
            yield prepare_inputs(model, tokenizer, questions[start:stop], batch_contexts, encoder=encoder, **options)

    return decode_batches(model, tokenizer, batches(), gen_kwargs, max_new_tokens, engine)
