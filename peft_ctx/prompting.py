"""Prompt building shared by every method: templates with context slots, chat templates, tokenisation, padding.

A prompt is a template whose fields are filled with *parts*: plain text or ``Slots(n)`` (n context positions whose
embeddings the adapter writes). The user turn is rendered through the tokenizer's chat template with a sentinel in
place of every slot run; the rendered text is split at the sentinels and each text piece is tokenised on its own, so
a slot can never merge with neighbouring text into one token, and the chat template sees ordinary text. A piece after
a slot is tokenised as the continuation it is (no word-boundary marker a SentencePiece tokenizer would open a text
with), as published compressors' code tokenises the text around its placeholder tokens.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

# Private-use code points: no tokenizer vocabulary gives them meaning, and user text containing them is refused.
_SENTINEL_OPEN, _SENTINEL_CLOSE = "\ue000", "\ue001"
_SENTINEL_RE = re.compile(f"{_SENTINEL_OPEN}(\\d+){_SENTINEL_CLOSE}")
IGNORE_INDEX = -100
# Text RAG's prompt (xRAG's paper): xRAG's default template, and the one the baselines and the demo's SPRING read.
RAG_TEMPLATE = "Refer to the background document and answer the question.\nBackground: {context}\nQuestion: {question}"


@dataclass(frozen=True)
class Slots:
    """A run of ``count`` context positions in a prompt."""

    count: int


Part = Union[str, Slots]


@dataclass
class Example:
    """One tokenised example before padding."""

    input_ids: list[int]
    context_mask: list[bool]
    labels: Optional[list[int]] = None
    context: dict[str, list] = field(default_factory=dict)


def _check_text(text: str, what: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}: {text!r:.80}")
    if _SENTINEL_OPEN in text or _SENTINEL_CLOSE in text:
        raise ValueError(
            f"{what} contains the private-use character U+E000 or U+E001, which peft_ctx reserves to mark context "
            f"slots in prompts; remove it from the text: {text!r:.80}"
        )


def check_documents(i: int, docs) -> None:
    """Text documents of example ``i``: a non-empty list of non-empty strings."""
    if isinstance(docs, str) or not isinstance(docs, (list, tuple)):
        raise ValueError(f"contexts[{i}] must be a list of passages, got {type(docs).__name__}: {docs!r:.60}")
    for j, doc in enumerate(docs):
        if not isinstance(doc, str) or not doc.strip():
            raise ValueError(
                f"contexts[{i}][{j}] is {doc!r:.60}; passages must be non-empty strings (drop empty ones first)."
            )
        _check_text(doc, f"contexts[{i}][{j}]")


def fill_template(template: str, fields: dict[str, list[Part]]) -> list[Part]:
    """Expand a ``str.format``-style template whose fields are lists of parts."""
    parts: list[Part] = []
    for literal, name, _, _ in string.Formatter().parse(template):
        if literal:
            parts.append(literal)
        if name is not None:
            if name not in fields:
                raise ValueError(f"The prompt template uses the field {{{name}}}, which has no value here.")
            parts.extend(fields[name])
    return parts


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return len(ids) > 0 and ids[0] == bos


def tokenize_parts(
    tokenizer,
    parts: list[Part],
    *,
    system_prompt: Optional[str] = None,
    use_chat_template: bool = True,
    answer: Optional[str] = None,
) -> Example:
    """Tokenise one prompt (and optionally its answer, for training) into ids, context mask and labels."""
    runs: list[int] = []
    text_parts: list[str] = []
    for part in parts:
        if isinstance(part, Slots):
            if part.count < 0:
                raise ValueError(f"A slot run has negative length {part.count}.")
            text_parts.append(f"{_SENTINEL_OPEN}{len(runs)}{_SENTINEL_CLOSE}")
            runs.append(part.count)
        else:
            _check_text(part, "Prompt text")
            text_parts.append(part)
    user_text = "".join(text_parts)
    if system_prompt is not None:
        _check_text(system_prompt, "system_prompt")

    if use_chat_template and _has_chat_template(tokenizer):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + [
            {"role": "user", "content": user_text}
        ]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prefix_ids: list[int] = []
    else:
        rendered = (system_prompt + "\n\n" if system_prompt else "") + user_text
        prefix_ids = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []

    pieces = _SENTINEL_RE.split(rendered)
    found = [int(index) for index in pieces[1::2]]
    if found != list(range(len(runs))):
        raise ValueError(
            "The chat template changed the context-slot markers (it dropped, repeated or reordered message text); "
            "set use_chat_template=False in the adapter config or use a template that copies the message content."
        )
    input_ids = list(prefix_ids)
    context_mask = [False] * len(prefix_ids)
    anchor = tokenizer(_SENTINEL_CLOSE, add_special_tokens=False).input_ids if runs else []
    for i, text in enumerate(pieces[0::2]):
        if text:
            if i:  # after a slot
                ids = _continuation_ids(tokenizer, anchor, text)
            else:
                ids = tokenizer(text, add_special_tokens=False).input_ids
            input_ids.extend(ids)
            context_mask.extend([False] * len(ids))
        if i < len(runs):
            input_ids.extend([_filler_id(tokenizer)] * runs[i])
            context_mask.extend([True] * runs[i])

    labels = None
    if answer is not None:
        _check_text(answer, "Answer")
        answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
        if tokenizer.eos_token_id is not None:
            answer_ids = answer_ids + [tokenizer.eos_token_id]
        labels = [IGNORE_INDEX] * len(input_ids) + answer_ids
        input_ids = input_ids + answer_ids
        context_mask = context_mask + [False] * len(answer_ids)
    return Example(input_ids=input_ids, context_mask=context_mask, labels=labels)


def continuation_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The ids of each text as it tokenises after other text (see ``_continuation_ids``), without special tokens."""
    anchor = tokenizer(_SENTINEL_CLOSE, add_special_tokens=False).input_ids
    return [_continuation_ids(tokenizer, anchor, text) for text in texts]


def _continuation_ids(tokenizer, anchor: list[int], text: str) -> list[int]:
    """The ids of ``text`` where it stands in the prompt: after a context slot, in the middle of the text.

    Tokenised on its own, a SentencePiece-style tokenizer (Llama-2, Mistral: Metaspace with prepend_scheme "first")
    opens the text with a word-boundary "▁" that the same text does not get inside a prompt, which is how published
    compressors were trained and how their code tokenises around its placeholder tokens. So the text is tokenised
    after an anchor (a reserved character, which no user text contains) and the anchor's ids are dropped; where the
    anchor's ids are not a prefix (a tokenizer that merges across it), the text is tokenised on its own.
    """
    ids = tokenizer(_SENTINEL_CLOSE + text, add_special_tokens=False).input_ids  # anchor: the ids of _SENTINEL_CLOSE
    if anchor and ids[: len(anchor)] == anchor:
        return ids[len(anchor) :]
    return tokenizer(text, add_special_tokens=False).input_ids


def _filler_id(tokenizer) -> int:
    # The id under a slot never reaches the model (its embedding is replaced); any valid id will do.
    for candidate in (tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token before batching.")


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so that a left-padded row reads as the same sequence unpadded.  # [b, seq]"""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def pad_examples(
    examples: list[Example], pad_id: int, padding_side: str = "left", max_length: Optional[int] = None
) -> dict[str, torch.Tensor]:
    """Pad a batch. Left padding is what generation needs; training may use either side."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}; use 'left' or 'right'.")
    if not examples:
        raise ValueError("Cannot pad an empty batch.")
    longest = max(len(e.input_ids) for e in examples)
    if max_length is not None and longest > max_length:
        raise ValueError(
            f"A prompt is {longest} tokens long, more than max_length={max_length} (the model's context); "
            "use fewer or shorter documents, or a shorter question."
        )
    with_labels = examples[0].labels is not None
    ids, attn, ctx, labels = [], [], [], []
    for e in examples:
        pad = longest - len(e.input_ids)

        def padded(values, fill, pad=pad):
            return [fill] * pad + values if padding_side == "left" else values + [fill] * pad

        ids.append(padded(e.input_ids, pad_id))
        attn.append(padded([1] * len(e.input_ids), 0))
        ctx.append(padded(e.context_mask, False))
        if with_labels:
            labels.append(padded(e.labels, IGNORE_INDEX))
    batch = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(attn, dtype=torch.long),
        "context_mask": torch.tensor(ctx, dtype=torch.bool),
    }
    if with_labels:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch
