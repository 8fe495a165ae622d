"""xRAG's hooks into the shared machinery: one slot per document, filled by the projected retriever vector."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..distributed import full_shape
from ..methods import ContextMethod, PassageIndex, register_method
from ..prompting import Slots, check_documents
from ..vectors import save_vectors
from .config import STAGES, XRAGConfig
from .convert import FAMILY
from .modules import XRAGProjector


class XRAGMethod(ContextMethod):
    name = "xrag"
    title = "xRAG"
    config_class = XRAGConfig
    card_template = "xrag.md.j2"
    uses_encoder = True
    converters = {"xrag": FAMILY}
    stages = STAGES
    input_names = ("retrieval_embeds",)
    rows_module = "peft_ctx.xrag.rows"

    def create_module(self, config: XRAGConfig, base_embedding: nn.Module, model_config: Any) -> nn.Module:
        return XRAGProjector(
            config.retriever_hidden_size, int(full_shape(base_embedding.weight)[-1]), config.projector_depth
        )

    def check_inputs(self, config: XRAGConfig, context_mask: torch.Tensor, inputs: dict[str, Any]) -> None:
        vectors = inputs.get("retrieval_embeds")
        n_slots = int(context_mask.sum())
        if vectors is None:
            raise ValueError(
                f"The prompt has {n_slots} document placeholders but no retrieval_embeds were given; pass the "
                "documents' vectors (peft_ctx.prepare_inputs does this for you)."
            )
        check_vectors(config, vectors)
        if vectors.shape[0] != n_slots:
            raise ValueError(
                f"The prompt has {n_slots} document placeholders but {vectors.shape[0]} retrieval vectors were given; "
                "give exactly one vector per placeholder, in prompt order."
            )

    def slot_embeddings(self, module, context_mask, inputs, dtype) -> torch.Tensor:
        vectors = inputs["retrieval_embeds"]  # [n_docs, d_r]
        first = module.projector[0].weight
        return module(vectors.to(device=first.device, dtype=first.dtype)).to(dtype)  # [n_docs, hidden]

    def prompt_fields(self, config, docs, options):
        # docs: [n_chunks, d_r] tensor for this example; one slot per chunk (per document without chunking), in
        # order, with the separator text between slots.
        slots: list = [Slots(len(docs))]
        if config.slot_separator and len(docs) > 1:
            slots = [Slots(1)]
            for _ in range(len(docs) - 1):
                slots += [config.slot_separator, Slots(1)]
        return {"context": slots}, {"retrieval_embeds": [docs]}

    def prepare_docs(self, config: XRAGConfig, contexts: list[list], options: dict[str, Any]) -> list[torch.Tensor]:
        encoder = options.get("encoder")
        prepared: list[Optional[torch.Tensor]] = [None] * len(contexts)
        texts, owners = [], []
        for i, docs in enumerate(contexts):
            if isinstance(docs, torch.Tensor):
                vectors = docs if docs.dim() == 2 else docs.unsqueeze(0)
                if vectors.shape[0] == 0:
                    raise ValueError(f"Example {i} has an empty document list; xRAG needs at least one document.")
                prepared[i] = vectors
                continue
            if isinstance(docs, str) or not isinstance(docs, (list, tuple)):
                raise ValueError(
                    f"contexts[{i}] must be a list of documents (strings or vectors), got {type(docs).__name__}."
                )
            if len(docs) == 0:
                raise ValueError(f"Example {i} has an empty document list; xRAG needs at least one document.")
            if all(isinstance(d, torch.Tensor) for d in docs):
                # A [d_r] vector is a document of one chunk; a [n_chunks, d_r] tensor is a document's chunks.
                if any(d.dim() not in (1, 2) for d in docs):
                    shapes = [tuple(d.shape) for d in docs]
                    raise ValueError(
                        f"contexts[{i}] holds tensors of shapes {shapes}; give each document as a [d_r] vector or a "
                        "[n_chunks, d_r] tensor of its chunks' vectors."
                    )
                prepared[i] = torch.cat([d.reshape(-1, d.shape[-1]) if d.dim() == 2 else d.unsqueeze(0) for d in docs])
            else:
                check_documents(i, docs)
                texts.extend(docs)
                owners.extend([i] * len(docs))
        if texts:
            if encoder is None:
                raise ValueError(
                    "The documents are text but no encoder was given: pass encoder=peft_ctx.Encoder(...) or "
                    "precomputed vectors (encoder.encode(docs)) as contexts."
                )
            encoder.check_compatible(config)
            batch_size = options.get("encode_batch_size", 32)
            per_doc = encoder.encode_chunks(texts, config.chunk_tokens, batch_size=batch_size)  # [n_chunks, d_r] each
            by_owner: dict[int, list[torch.Tensor]] = {}
            for owner, vectors in zip(owners, per_doc):
                by_owner.setdefault(owner, []).append(vectors)
            for owner, rows in by_owner.items():
                prepared[owner] = torch.cat(rows)  # [n_chunks over the example's documents, d_r]
        for vectors in prepared:
            check_vectors(config, vectors)
        return prepared

    def collate_context(self, config, payloads, device):
        vectors = torch.cat([v for p in payloads for v in p["retrieval_embeds"]])
        return {"retrieval_embeds": vectors.to(device) if device is not None else vectors}

    # ---- registry hooks ------------------------------------------------------------------------------------------
    def index_passages(self, model, tokenizer, passages, encoder=None):
        if encoder is None:
            return None  # passages go in as text and are encoded at question time
        chunk_tokens = model.active_peft_config.chunk_tokens
        per_passage = encoder.encode_chunks(list(passages), chunk_tokens, show_progress=False)  # [n_chunks, d_r] each
        # A passage of one chunk is one [d_r] vector; a longer one under chunk_tokens is its [n_chunks, d_r] chunks.
        entries = [vectors[0] if chunk_tokens is None else vectors for vectors in per_passage]
        return PassageIndex(entries, lambda path: save_vectors(path, torch.cat(per_passage), encoder=encoder))

    def train(self, model, tokenizer, data, stages, work_dir, seed=0, callbacks=None):
        from .recipe import train as train_recipe  # the trainer (trl) loads on first use, not on import

        return train_recipe(model, tokenizer, data, stages, work_dir, seed=seed, callbacks=callbacks)

    def diagnostics(self, model, tokenizer, passages, encoder=None):
        if encoder is None:
            raise ValueError("xRAG's diagnostics encode the passages: pass encoder=peft_ctx.Encoder(...).")
        from .recipe import diagnostics

        return diagnostics(model, tokenizer, passages, encoder)


def check_vectors(config: XRAGConfig, vectors: torch.Tensor) -> None:
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2:
        raise ValueError(
            f"Retrieval vectors must be a [n_docs, {config.retriever_hidden_size}] tensor, got "
            f"{tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__}."
        )
    if vectors.shape[-1] != config.retriever_hidden_size:
        raise ValueError(
            f"Retrieval vectors have dimension {vectors.shape[-1]} but the adapter's projector expects "
            f"retriever_hidden_size={config.retriever_hidden_size} (trained with "
            f"{config.retriever_name_or_path!r}); encode the documents with that encoder."
        )
    if not torch.isfinite(vectors).all():
        bad = (~torch.isfinite(vectors)).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"Retrieval vectors {bad} contain NaN or infinite values; re-encode those documents.")


register_method(XRAGMethod())
