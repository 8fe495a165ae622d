"""SPRING's hooks into the shared machinery: k virtual-token slots between the passages and the question."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn
from transformers import AutoTokenizer

from .. import local_copies
from ..config import is_int
from ..distributed import full_shape, gathered
from ..methods import ContextMethod, register_method
from ..prompting import Part, Slots, check_documents
from .config import SpringConfig
from .convert import FAMILY
from .modules import SpringTokens

# Options of prepare_inputs / generate that SPRING reads; the shared ones are accepted and ignored (SPRING reads
# passages as text and needs no encoder).
OPTIONS = ("num_virtual_tokens", "max_passages")
_SHARED_OPTIONS = ("encoder", "encode_batch_size")
# Options of ContextDataCollator(method_options=...) that training_options turns into OPTIONS.
TRAINING_OPTIONS = ("virtual_tokens_range",)


class SpringMethod(ContextMethod):
    name = "spring"
    title = "SPRING"
    config_class = SpringConfig
    card_template = "spring.md.j2"
    option_names = OPTIONS
    converters = {"spring": FAMILY}
    rows_module = "peft_ctx.spring.rows"

    # ---- the module ----------------------------------------------------------------------------------------------
    def create_module(self, config: SpringConfig, base_embedding: nn.Module, model_config: Any) -> nn.Module:
        weight = base_embedding.weight  # [vocab, hidden]
        vocab_size = full_shape(weight)[0]
        n = config.num_virtual_tokens
        if config.init_token_ids is None and config.init_text is not None and not config.inference_mode:
            # Stored in the config so that loading the saved adapter never needs the tokenizer again.
            config.init_token_ids = _tokenize_init_text(config)
        if config.init_token_ids is not None:
            too_big = sorted({i for i in config.init_token_ids if i >= vocab_size})
            if too_big:
                raise ValueError(
                    f"init_token_ids contains {too_big[:5]}, beyond the base model's vocabulary of {vocab_size} "
                    "tokens; tokenise init_text with the base model's own tokenizer."
                )
            ids = torch.tensor(config.init_token_ids, dtype=torch.long)
            ids = ids.repeat(math.ceil(n / len(ids)))[:n]
        else:
            # Embeddings of random vocabulary tokens: the right scale for whatever the embedding module computes
            # (some models scale their embeddings inside the module).
            ids = torch.randint(0, vocab_size, (n,))
        with torch.no_grad(), gathered(weight):  # a ZeRO-3 init partitions the embedding before any forward
            initial = base_embedding(ids.to(weight.device)).detach().clone()  # [N, hidden]
        return SpringTokens(initial)

    # ---- forward -------------------------------------------------------------------------------------------------
    def check_inputs(self, config: SpringConfig, context_mask: torch.Tensor, inputs: dict[str, Any]) -> None:
        most = int(context_mask.sum(dim=-1).max())
        if most > config.num_virtual_tokens:
            raise ValueError(
                f"A prompt has {most} virtual-token slots but the SPRING adapter has only "
                f"num_virtual_tokens={config.num_virtual_tokens}; build inputs with peft_ctx.prepare_inputs and "
                f"num_virtual_tokens <= {config.num_virtual_tokens}."
            )

    def slot_embeddings(self, module: SpringTokens, context_mask, inputs, dtype) -> torch.Tensor:
        # The j-th slot of every row takes virtual token j: a row with k slots reads the first k tokens.
        rank = context_mask.long().cumsum(dim=-1) - 1  # [batch, seq]
        index = rank[context_mask].to(module.virtual_tokens.device)  # [n_slots]
        return module(index).to(dtype)  # [n_slots, hidden]

    # ---- prompts -------------------------------------------------------------------------------------------------
    def prepare_docs(self, config: SpringConfig, contexts: list, options: dict[str, Any]) -> list[Optional[list[str]]]:
        check_options(config, options)
        max_passages = options.get("max_passages")
        prepared: list[Optional[list[str]]] = []
        for i, docs in enumerate(contexts):
            if docs is None:
                prepared.append(None)
                continue
            if isinstance(docs, torch.Tensor):
                raise ValueError(
                    f"contexts[{i}] must be a list of passages (strings), got a tensor; SPRING reads passages as text "
                    "(vectors are for xRAG adapters)."
                )
            check_documents(i, docs)
            docs = list(docs)
            prepared.append(docs if max_passages is None else docs[:max_passages])
        return prepared

    def prompt_fields(self, config: SpringConfig, docs, options):
        check_options(config, options)
        k = num_virtual_tokens(config, options)
        if not docs:
            # No retrieval: no passages and no virtual tokens, so the prompt (and the output) is the base model's.
            return {"context": [], "virtual": []}, {}
        return {"context": [format_passages(config, docs)], "virtual": [Slots(k)] if k else []}, {}

    def text_fields(self, config: SpringConfig, docs: Optional[list[str]]) -> dict[str, list[Part]]:
        # The k = 0 prompt: the frozen model reading the same passages, which is also SPRING's "plugged out" prompt.
        return {"context": [format_passages(config, docs)] if docs else [], "virtual": []}

    def training_options(self, config: SpringConfig, rng, options: dict[str, Any]) -> dict[str, Any]:
        options = dict(options)
        unknown = sorted(set(options) - set(OPTIONS) - set(TRAINING_OPTIONS))
        if unknown:
            raise ValueError(
                f"Unknown SPRING training option(s) {unknown}; known: {', '.join(OPTIONS + TRAINING_OPTIONS)}."
            )
        span = options.pop("virtual_tokens_range", None)
        if "num_virtual_tokens" in options:
            if span is not None:
                raise ValueError(
                    "Give either num_virtual_tokens (a fixed k) or virtual_tokens_range (k drawn per batch), not both."
                )
            return options
        low, high = check_range(config, span)
        # Scalable training: a fresh k each batch, so that every prefix of the tokens learns to work on its own.
        options["num_virtual_tokens"] = rng.randint(low, high)
        return options


def check_options(config: SpringConfig, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(OPTIONS) - set(_SHARED_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown SPRING option(s) {unknown}; SPRING takes {', '.join(OPTIONS)}.")
    max_passages = options.get("max_passages")
    if max_passages is not None and (not is_int(max_passages) or max_passages < 1):
        raise ValueError(f"max_passages={max_passages!r}; give a positive int, or None to keep every passage.")


def num_virtual_tokens(config: SpringConfig, options: dict[str, Any]) -> int:
    """The k of this call: ``options["num_virtual_tokens"]``, default all N."""
    k = options.get("num_virtual_tokens")
    if k is None:
        return config.num_virtual_tokens
    if not is_int(k) or k < 0:
        raise ValueError(f"num_virtual_tokens={k!r}; give an int between 0 and {config.num_virtual_tokens}.")
    if k > config.num_virtual_tokens:
        raise ValueError(
            f"num_virtual_tokens={k} is more than the {config.num_virtual_tokens} virtual tokens this SPRING adapter "
            f"has (SpringConfig.num_virtual_tokens={config.num_virtual_tokens}); use any k <= "
            f"{config.num_virtual_tokens}."
        )
    return int(k)


def check_range(config: SpringConfig, span) -> tuple[int, int]:
    """``virtual_tokens_range`` as (low, high), default (1, N); raises on anything outside 1 <= low <= high <= N."""
    n = config.num_virtual_tokens
    if span is None:
        return 1, n
    if not isinstance(span, (list, tuple)) or len(span) != 2 or not all(is_int(v) for v in span):
        raise ValueError(f"virtual_tokens_range={span!r}; give two ints (low, high) with 1 <= low <= high <= {n}.")
    low, high = int(span[0]), int(span[1])
    if not 1 <= low <= high <= n:
        raise ValueError(
            f"virtual_tokens_range={span!r} is not within 1 <= low <= high <= num_virtual_tokens={n}; k = 0 would "
            "leave a batch with nothing to train."
        )
    return low, high


def format_passages(config: SpringConfig, docs: list[str]) -> str:
    return "".join(config.passage_template.format(index=i + 1, passage=doc) for i, doc in enumerate(docs))


def _tokenize_init_text(config: SpringConfig) -> list[int]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(local_copies.resolve(config.tokenizer_name_or_path))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"Cannot load tokenizer_name_or_path={config.tokenizer_name_or_path!r} to tokenise init_text: {exc}"
        ) from exc
    ids = tokenizer(config.init_text, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"init_text={config.init_text!r} tokenises to no tokens; give a longer text.")
    return list(ids)


register_method(SpringMethod())
