"""Frozen retrievers: a sentence-transformers folder or any transformers encoder with a chosen pooling.

Pooling and normalisation of a sentence-transformers model are read from its own files (``modules.json``,
``1_Pooling/config.json``, a ``Normalize`` module), never from a list of model ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Optional

import torch
from huggingface_hub import hf_hub_download
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from . import local_copies
from .distributed import unpartitioned_loading

POOLINGS = ("mean", "cls", "last_token", "max")

_ST_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last_token",
    "pooling_mode_max_tokens": "max",
}
_ST_SUPPORTED = ("Transformer", "Pooling", "Normalize")


def _read_json(name_or_path: str, filename: str, **hub_kwargs) -> Optional[dict]:
    path = os.path.join(name_or_path, filename)
    if not os.path.isdir(name_or_path):
        try:
            path = hf_hub_download(name_or_path, filename, **hub_kwargs)
        except Exception:
            return None
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_sentence_transformers_settings(name_or_path: str, **hub_kwargs) -> Optional[dict]:
    """Pooling, normalisation and max length of a sentence-transformers model, or None if it is not one."""
    modules = _read_json(name_or_path, "modules.json", **hub_kwargs)
    if modules is None:
        return None
    settings: dict = {"normalize": False}
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind not in _ST_SUPPORTED:
            raise ValueError(
                f"The sentence-transformers model {name_or_path!r} has a {kind!r} module; peft_ctx.Encoder supports "
                f"only {', '.join(_ST_SUPPORTED)}. Encode the documents with sentence-transformers yourself and pass "
                "the vectors to peft_ctx.prepare_inputs / generate."
            )
        if kind == "Pooling":
            pooling_cfg = _read_json(name_or_path, f"{module['path']}/config.json", **hub_kwargs) or {}
            modes = [mode for key, mode in _ST_POOLING_KEYS.items() if pooling_cfg.get(key)]
            if len(modes) != 1:
                raise ValueError(
                    f"{name_or_path!r}: cannot read one pooling mode from its Pooling config {pooling_cfg}."
                )
            settings["pooling"] = modes[0]
        elif kind == "Normalize":
            settings["normalize"] = True
    st_config = _read_json(name_or_path, "sentence_bert_config.json", **hub_kwargs) or {}
    if "max_seq_length" in st_config:
        settings["max_length"] = st_config["max_seq_length"]
    return settings


class Encoder:
    """A frozen document encoder.

    Args:
        name_or_path: a local folder or Hub id of a sentence-transformers model or a plain transformers encoder.
        pooling: "mean", "cls", "last_token" or "max"; None reads it from a sentence-transformers model (else "mean").
        normalize: L2-normalise the vectors; None reads it from a sentence-transformers model (else False).
        max_length: truncate documents to this many encoder tokens (default: the model's setting, at most 512).
    """

    def __init__(
        self,
        name_or_path: str,
        pooling: Optional[str] = None,
        normalize: Optional[bool] = None,
        max_length: Optional[int] = None,
        device: Optional[str] = None,
        torch_dtype: torch.dtype = torch.float32,
        **hub_kwargs,
    ) -> None:
        # The Hub id stays the encoder's name (adapters record it); the files may come from a local copy.
        source = local_copies.resolve(name_or_path)
        settings = read_sentence_transformers_settings(source, **hub_kwargs) or {}
        self.pooling = pooling if pooling is not None else settings.get("pooling", "mean")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not supported; choose one of {', '.join(POOLINGS)}.")
        self.normalize = bool(normalize if normalize is not None else settings.get("normalize", False))
        self.name_or_path = name_or_path
        self.tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
        with unpartitioned_loading():  # frozen and run outside any engine: whole on every rank, even under ZeRO-3
            self.model = AutoModel.from_pretrained(source, dtype=torch_dtype, **hub_kwargs)
        self.model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        model_max = getattr(self.model.config, "max_position_embeddings", 512)
        self.max_length = int(max_length or settings.get("max_length") or min(model_max, 512))
        self.hidden_size = int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        """What an adapter config records about the encoder it was trained with."""
        return {
            "retriever_name_or_path": self.name_or_path,
            "retriever_pooling": self.pooling,
            "retriever_normalize": self.normalize,
            "retriever_hidden_size": self.hidden_size,
        }

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # hidden: [batch, seq, d_r]; mask: [batch, seq]
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        if self.pooling == "max":
            return hidden.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min).max(1).values
        # last_token: the last non-padding position, whichever side the tokenizer pads on
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * mask).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 32, show_progress: Optional[bool] = None) -> torch.Tensor:
        """Encode documents into vectors.  # [len(texts), hidden_size] float32 on CPU"""
        if isinstance(texts, str):
            raise ValueError("encode() takes a list of documents, got a single string; wrap it in a list.")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"Document {i} is {text!r:.60}; documents must be non-empty strings.")
        if show_progress is None:
            show_progress = len(texts) > 4 * batch_size
        out = []
        for start in tqdm(range(0, len(texts), batch_size), desc="Encoding", disable=not show_progress):
            batch = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state  # [batch, seq, d_r]
            pooled = self._pool(hidden, batch["attention_mask"])
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out.append(pooled.float().cpu())
        if not out:
            return torch.empty(0, self.hidden_size)
        return torch.cat(out)

    def chunk(self, text: str, chunk_tokens: int) -> list[str]:
        """``text`` cut into consecutive pieces of at most ``chunk_tokens`` encoder tokens each, special tokens
        included (the window official xRAG gives its retriever: 180), cut between words (needs a fast tokenizer)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Document {text!r:.60} must be a non-empty string.")
        room = chunk_tokens - self.tokenizer.num_special_tokens_to_add()
        if room < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens} leaves no room for text next to the special tokens.")
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans, words = encoding["offset_mapping"], encoding.word_ids()
        if len(spans) <= room:
            return [text]
        pieces, start = [], 0
        while start < len(spans):
            end = min(start + room, len(spans))
            # Cut between words where one fits: a word longer than a whole chunk is cut inside.
            while end < len(spans) and end > start + 1 and words[end] is not None and words[end] == words[end - 1]:
                end -= 1
            if end == start + 1 and words[end - 1] is not None and end < len(spans) and words[end] == words[end - 1]:
                end = min(start + room, len(spans))
            pieces.append(text[spans[start][0] : spans[end - 1][1]])
            start = end
        return [piece for piece in pieces if piece.strip()]

    def encode_chunks(
        self,
        texts: Sequence[str],
        chunk_tokens: Optional[int],
        batch_size: int = 32,
        show_progress: Optional[bool] = None,
    ) -> list[torch.Tensor]:
        """Each document's chunk vectors (``chunk``, then ``encode``); ``chunk_tokens`` None: one vector per
        document, truncated at ``max_length``.  # per document [n_chunks, hidden_size]"""
        if not texts:
            return []
        if chunk_tokens is None:
            return list(self.encode(texts, batch_size, show_progress).unsqueeze(1))  # [1, hidden_size] each
        chunks = [self.chunk(text, chunk_tokens) for text in texts]
        flat = self.encode([piece for pieces in chunks for piece in pieces], batch_size, show_progress)
        return list(torch.split(flat, [len(pieces) for pieces in chunks]))

    def check_compatible(self, config) -> None:
        """Raise if this encoder's vectors do not fit an adapter trained with another encoder's dimension."""
        expected = getattr(config, "retriever_hidden_size", None)
        if expected is not None and expected != self.hidden_size:
            raise ValueError(
                f"The encoder {self.name_or_path!r} makes {self.hidden_size}-d vectors but the adapter was trained "
                f"with {expected}-d vectors from {getattr(config, 'retriever_name_or_path', None)!r}; use that "
                "encoder."
            )
