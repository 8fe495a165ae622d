"""Passages compressed once, offline, into a file; and which adapter made them.

``compress`` runs the active COCOM adapter's compressor over a corpus (question-independent) and returns a
``CompressedIndex``: every passage's k context embeddings, the compression rate and a fingerprint of the adapter's
compressor (a SHA-256 over its weights and the settings that shape the embeddings). ``index.select(...)`` hands
passages to ``prepare_inputs`` / ``generate``, which refuse passages whose rate or fingerprint differ from the active
adapter's: embeddings from another compressor would be read silently wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..checkpoints import read_tagged_safetensors
from ..fingerprint import adapter_digest
from ..inference import active_config, with_resources
from ..methods import get_method
from .config import COMPRESSOR_ROLE, CocomConfig

FORMAT = "peft_ctx.cocom_index/1"
_EMBEDDINGS, _OFFSETS = "embeddings", "offsets"


@dataclass(frozen=True)
class CompressedPassage:
    """One passage's context embeddings from a ``CompressedIndex``, with the identity of the adapter that made them."""

    embeddings: torch.Tensor  # [k, hidden]
    adapter_fingerprint: str
    compression_rate: int
    source: Optional[str] = None  # the index file, for error messages


def _peft_state(model, adapter_name: str) -> dict[str, torch.Tensor]:

    return get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)


def _compressor_keys(config: CocomConfig, keys) -> list[str]:
    """The saved keys that shape the context embeddings (not the decoder-side LoRA or the <AE> marker)."""

    def wanted(key: str) -> bool:
        if ".ctx_modules." in key:
            return not key.endswith(".ae_marker")
        if ".lora_" not in key:
            return False
        if config.is_light:
            return False  # COCOM-light's LoRA is on the decoder only
        if config.separate_compressor_adapter:
            return f".{COMPRESSOR_ROLE}." in key
        return True

    return sorted(key for key in keys if wanted(key))


def adapter_fingerprint(model, adapter_name: Optional[str] = None) -> str:
    """SHA-256 of a COCOM adapter's compressor: its weights (names, dtypes, shapes, bytes) and the settings that shape
    the context embeddings. Equal fingerprints mean an index made by one adapter is valid for the other."""
    adapter_name = adapter_name or model.active_adapter
    config = model.peft_config[adapter_name]
    if not isinstance(config, CocomConfig):
        raise ValueError(f"Adapter {adapter_name!r} is a {type(config).__name__}, not a COCOM adapter.")
    settings = {
        "method": config.method,
        "compression_rate": config.compression_rate,
        "max_passage_tokens": config.max_passage_tokens,
        "light": config.is_light,
        "hidden_size": config.base_hidden_size,
    }
    if config.residual_pooling:  # only then: indexes saved before the field keep their fingerprints
        settings["residual_pooling"] = True
        if config.residual_source != "memory":
            settings["residual_source"] = config.residual_source
    # The PISCO lineage's settings, likewise only where they differ from the defaults.
    lineage = (("memory_tokens_per_passage", None), ("passage_truncation", "text"), ("compressor_positions", "start"))
    for name, default in lineage:
        if getattr(config, name) != default:
            settings[name] = getattr(config, name)
    return adapter_digest(model, adapter_name, settings, select=lambda keys: _compressor_keys(config, keys))


def adapter_size(model, adapter_name: Optional[str] = None) -> dict[str, int]:
    """What ``save_pretrained`` stores for an adapter: ``parameters`` (floating-point values) and ``bytes``."""
    state = _peft_state(model, adapter_name or model.active_adapter)
    return {
        "parameters": sum(t.numel() for t in state.values() if t.is_floating_point()),
        "bytes": sum(t.numel() * t.element_size() for t in state.values()),
    }


def check_passage(passage: CompressedPassage, config: CocomConfig, model, where: str) -> None:
    """Refuse a precomputed passage that the active adapter did not make."""
    origin = f" (from {passage.source})" if passage.source else ""
    if passage.compression_rate != config.compression_rate:
        raise ValueError(
            f"{where} was compressed at compression_rate={passage.compression_rate}{origin}, but the adapter uses "
            f"compression_rate={config.compression_rate}; compress the passages again with this adapter "
            "(peft_ctx.compress)."
        )
    if model is None:
        raise ValueError(
            f"{where} is a precomputed passage; checking that this adapter made it needs the model (pass model=)."
        )
    names = [name for name, c in model.peft_config.items() if c is config]
    fingerprint = adapter_fingerprint(model, names[0] if names else None)
    if passage.adapter_fingerprint != fingerprint:
        raise ValueError(
            f"{where} was compressed by another adapter{origin} (fingerprint {passage.adapter_fingerprint[:12]}), "
            f"not the active one ({fingerprint[:12]}): its embeddings would be misread. Compress the passages again "
            "with this adapter (peft_ctx.compress)."
        )
    if config.base_hidden_size is not None and passage.embeddings.shape[-1] != config.base_hidden_size:
        raise ValueError(
            f"{where} has {passage.embeddings.shape[-1]}-d embeddings; the LLM's are {config.base_hidden_size}-d."
        )


class CompressedIndex:
    """Context embeddings of a corpus: passage i is ``embeddings[offsets[i]:offsets[i + 1]]``."""

    def __init__(self, embeddings: torch.Tensor, offsets: torch.Tensor, metadata: dict, path: Optional[str] = None):
        if embeddings.dim() != 2 or offsets.dim() != 1 or int(offsets[-1]) != embeddings.shape[0]:
            raise ValueError(
                f"Inconsistent index: embeddings {tuple(embeddings.shape)}, offsets ending at {int(offsets[-1])}."
            )
        self.embeddings = embeddings  # [total_k, hidden]
        self.offsets = offsets  # [n_passages + 1]
        self.metadata = dict(metadata)
        self.path = path

    @property
    def compression_rate(self) -> int:
        return int(self.metadata["compression_rate"])

    @property
    def adapter_fingerprint(self) -> str:
        return self.metadata["adapter_fingerprint"]

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def __getitem__(self, i: int) -> CompressedPassage:
        if isinstance(i, bool) or not isinstance(i, int) or not -len(self) <= i < len(self):
            raise IndexError(f"Passage {i!r} is not in this index of {len(self)} passages.")
        i %= len(self)
        rows = self.embeddings[int(self.offsets[i]) : int(self.offsets[i + 1])]
        return CompressedPassage(rows, self.adapter_fingerprint, self.compression_rate, self.path)

    def select(
        self, ids: Union[Sequence[int], Sequence[Sequence[int]]]
    ) -> Union[list[CompressedPassage], list[list[CompressedPassage]]]:
        """Passages for ``contexts=``: a list of ids gives one question's passages; a list of id lists (one per
        question) gives ``contexts`` for a whole batch."""
        if ids and all(isinstance(i, (list, tuple)) for i in ids):
            return [[self[int(i)] for i in row] for row in ids]
        if any(isinstance(i, (list, tuple)) for i in ids):
            raise ValueError("select() takes a list of ids or a list of id lists (one per question), not a mix.")
        return [self[int(i)] for i in ids]

    def search(self, model, tokenizer, questions, k: int = 5, candidates=None):
        """The ``k`` passages closest to each question by memory states (adapters with a query LoRA, as CLaRa's
        end-to-end checkpoints): ``peft_ctx.cocom.retrieval.search``; its ``.ids`` go to ``select``."""
        from .retrieval import search

        return search(model, tokenizer, questions, self, k, candidates)

    def nbytes(self) -> int:
        return self.embeddings.numel() * self.embeddings.element_size()

    def save(self, path: str, overwrite: bool = False) -> str:
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        tensors = {_EMBEDDINGS: self.embeddings.detach().cpu().contiguous(), _OFFSETS: self.offsets.cpu().contiguous()}
        save_file(tensors, tmp, metadata={"peft_ctx": json.dumps(self.metadata)})
        os.replace(tmp, path)  # a half-written file never takes the real name
        self.path = path
        return path

    @classmethod
    def load(cls, path: str) -> CompressedIndex:
        tensors, metadata = read_tagged_safetensors(path, "a COCOM index")
        if metadata.get("format") != FORMAT or not {_EMBEDDINGS, _OFFSETS} <= set(tensors):
            raise ValueError(f"{path} is not a COCOM index written by peft_ctx (CompressedIndex.save).")
        return cls(tensors[_EMBEDDINGS], tensors[_OFFSETS], metadata, path)

    def __repr__(self) -> str:
        return (
            f"CompressedIndex({len(self)} passages, {self.embeddings.shape[0]} embeddings of size "
            f"{self.embeddings.shape[1]}, compression_rate={self.compression_rate}, "
            f"adapter {self.adapter_fingerprint[:12]})"
        )


@contextlib.contextmanager
def compressing(model) -> Iterator[str]:
    """The active adapter's name, every module in eval mode meanwhile (compressed states must not depend on
    dropout; the modes are restored one by one after, as they may differ); a disabled adapter is refused."""
    layer = model.base_model.context_layer()
    if layer.disable_adapters:
        raise ValueError("The adapter is disabled (inside disable_adapter()); compress with the adapter enabled.")
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield layer.active_method_adapter()
    finally:
        for module, training in modes:
            module.training = training


def compress_texts(
    model, tokenizer, config: CocomConfig, adapter_name: str, texts: Sequence[str], role: str = COMPRESSOR_ROLE
) -> tuple[torch.Tensor, list[int]]:
    """One batch of texts compressed as passages by adapter ``adapter_name`` (``role``: its compressor LoRA, or
    another companion's, e.g. the query LoRA), and each text's number of states.  # [sum k_i, hidden], [k_i]"""
    method = get_method(config.method)
    options = with_resources(config, {}, tokenizer=tokenizer, model=model)
    docs = method.prepare_docs(config, [list(texts)], options)[0]
    batch = method.collate_context(config, [{"passages": docs, "autoencode": [False]}], None)
    ids, lengths = batch["cocom_passage_ids"], batch["cocom_passage_lengths"]
    return method.compress(model.base_model, adapter_name, config, ids, lengths, role=role), [p.k for p in docs]


@torch.no_grad()
def compress(
    model, tokenizer, passages: Sequence[str], *, batch_size: int = 32, show_progress: Optional[bool] = None
) -> CompressedIndex:
    """Compress passages with the active COCOM adapter, once and question-independently.

    Returns a ``CompressedIndex`` (``index.save(path)``, ``CompressedIndex.load(path)``); give its passages to
    ``generate`` / ``prepare_inputs`` with ``contexts=index.select([[3, 7], [1]])``.
    """
    config = active_config(model)
    if not isinstance(config, CocomConfig):
        raise ValueError(f"compress() needs an active COCOM adapter; the active one is a {type(config).__name__}.")
    if isinstance(passages, str):
        raise ValueError("passages must be a list of strings, got a single string; wrap it in a list.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; use a positive batch size.")
    passages = list(passages)
    if show_progress is None:
        show_progress = len(passages) > 4 * batch_size
    rows, counts = [], []
    with compressing(model) as adapter_name:
        for start in tqdm(range(0, len(passages), batch_size), desc="Compressing", disable=not show_progress):
            chunk = passages[start : start + batch_size]
            embeddings, ks = compress_texts(model, tokenizer, config, adapter_name, chunk)
            rows.append(embeddings.detach().cpu())
            counts.extend(ks)
    hidden = config.base_hidden_size
    embeddings = torch.cat(rows) if rows else torch.empty(0, hidden)
    offsets = torch.tensor([0] + counts, dtype=torch.long).cumsum(0)
    metadata = {
        "format": FORMAT,
        "method": config.method,
        "adapter_fingerprint": adapter_fingerprint(model, adapter_name),
        "compression_rate": config.compression_rate,
        "max_passage_tokens": config.max_passage_tokens,
        "hidden_size": hidden,
        "compressor": config.compressor or "llm",
        "base_model_name_or_path": config.base_model_name_or_path,
    }
    return CompressedIndex(embeddings, offsets, metadata)
