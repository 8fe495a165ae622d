"""COCOM's hooks into the shared machinery: passages in, k = ceil(n / rate) context embeddings per passage out.

Prompt side: every passage gets ``Slots(k)`` in ``{context}`` (passages separated by ``passage_separator``); a batch
carries the passages' token ids (or precomputed embeddings from a ``CompressedIndex``) and, per slot, which row of the
compressed table fills it. Forward side: ``before_forward`` compresses the passages once per call, outside the slot
filling, with the gradient flowing into the compressor; ``slot_embeddings`` then only gathers rows.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraModel
from torch import nn

from ..distributed import full_shape, gathered
from ..layer import companion_name
from ..methods import ContextMethod, PassageIndex, register_method
from ..prompting import Slots
from . import merging
from .arc_convert import ARC
from .compressed import CompressedPassage, check_passage, compress
from .compressor import (
    all_linear,
    compress_with_llm,
    compressor_lora,
    light_compressor,
    memory_counts,
    tokenize_passages,
)
from .config import COMPRESSOR_ROLE, QUERY_ROLE, STAGES, CocomConfig
from .convert import CLARA
from .modules import CocomTokens

# Options that prepare_inputs / generate / the collators may pass; COCOM reads passages itself and takes no encoder.
OPTIONS = ("tokenizer", "model", "encoder", "encode_batch_size", "autoencode")


@dataclass
class Passage:
    """One passage of one example, ready for the prompt: token ids to compress, or precomputed embeddings."""

    k: int  # context embeddings (slots) it takes
    ids: Optional[list[int]] = None  # compressor tokens, truncated
    embeddings: Optional[torch.Tensor] = None  # [k, hidden], from a CompressedIndex


class CocomMethod(ContextMethod):
    name = "cocom"
    title = "COCOM"
    config_class = CocomConfig
    card_template = "cocom.md.j2"
    option_names = ("autoencode",)
    stages = STAGES
    input_names = ("cocom_passage_ids", "cocom_passage_lengths", "cocom_context_embeds", "cocom_slot_source")
    option_resources = ("tokenizer", "model")
    converters = {"clara": CLARA, "arc": ARC}
    rows_module = "peft_ctx.cocom.rows"

    # ---- the adapter ---------------------------------------------------------------------------------------------
    def create_module(self, config: CocomConfig, base_embedding: nn.Module, model_config: Any) -> nn.Module:
        weight = base_embedding.weight  # [vocab, hidden]
        hidden_size, vocab_size = int(full_shape(weight)[-1]), int(full_shape(weight)[0])
        n_memory = config.memory_tokens(config.max_passage_tokens)
        # Embeddings of random vocabulary tokens: the scale the LLM expects, whatever its embedding module computes.
        ids = torch.randint(0, vocab_size, (n_memory + 3,))
        with torch.no_grad(), gathered(weight):  # a ZeRO-3 init partitions the embedding before any forward
            initial = base_embedding(ids.to(weight.device)).detach().float()  # [k_max + 3, hidden]
        if not config.is_light:
            return CocomTokens(
                initial[: n_memory + 2],
                n_memory,
                residual_pooling=config.residual_pooling,
                separator=initial[n_memory + 2 :] if config.passage_end_token else None,
            )
        return light_compressor(config, hidden_size, initial[n_memory + 1 : n_memory + 2])

    def check_base_model(self, config: CocomConfig, model: nn.Module) -> None:
        if not config.is_light and getattr(model, "base_model", model) is model:
            raise ValueError(
                f"COCOM compresses with the LLM's own transformer, but {type(model).__name__} exposes none as "
                "`base_model`; use a transformers causal LM (AutoModelForCausalLM) or COCOM-light (compressor=...)."
            )

    def companion_roles(self, config: CocomConfig) -> tuple[str, ...]:
        if not (config.separate_compressor_adapter and config.lora_r > 0):
            return ()
        return (COMPRESSOR_ROLE, QUERY_ROLE) if config.query_adapter else (COMPRESSOR_ROLE,)

    def inject(self, tuner, model, adapter_name, config: CocomConfig, low_cpu_mem_usage=False) -> None:
        if config.lora_r == 0:
            return

        names = [adapter_name] + [companion_name(adapter_name, role) for role in self.companion_roles(config)]
        targets = config.lora_target_modules
        if isinstance(targets, str) and targets.lower() == "all-linear":
            targets = all_linear(model)
        for name in names:
            lora = LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=list(targets) if isinstance(targets, (list, tuple)) else targets,
                inference_mode=config.inference_mode,
            )
            # PEFT's own LoRA tuner puts its layers in place (the peft_ctx layer's insides are skipped: they sit in a
            # tuner layer already). Hidden from it: model.peft_config, which it would add its LoraConfig to.
            saved = model.__dict__.pop("peft_config", None)
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # GPT-2's Conv1D: PEFT sets it
                    LoraModel(model, lora, name, low_cpu_mem_usage=low_cpu_mem_usage)
            finally:
                model.__dict__.pop("peft_config", None)
                if saved is not None:
                    model.peft_config = saved

    # ---- merging: the decoder LoRA folds into the base weights ------------------------------------------------------
    def merge(self, model, adapter_name, safe_merge=False) -> None:
        if not merging.merge(model, adapter_name, safe_merge):
            super().merge(model, adapter_name, safe_merge)  # lora_r=0: nothing to merge, refused as for the others

    def unmerge(self, model) -> None:
        merging.unmerge(model)

    def merged_adapters(self, model) -> set[str]:
        return merging.merged_adapters(model)

    # ---- forward -------------------------------------------------------------------------------------------------
    def check_inputs(self, config: CocomConfig, context_mask: torch.Tensor, inputs: dict[str, Any]) -> None:
        n_slots = int(context_mask.sum())
        source = inputs.get("cocom_slot_source")
        if source is None:
            raise ValueError(
                f"The prompt has {n_slots} context slots but no cocom_slot_source was given; build COCOM inputs with "
                "peft_ctx.prepare_inputs."
            )
        if source.dim() != 1 or source.shape[0] != n_slots:
            raise ValueError(
                f"The prompt has {n_slots} context slots but cocom_slot_source has shape {tuple(source.shape)}; "
                "build COCOM inputs with peft_ctx.prepare_inputs."
            )
        ids, lengths = inputs.get("cocom_passage_ids"), inputs.get("cocom_passage_lengths")
        rows = 0
        if (ids is None) != (lengths is None):
            raise ValueError("cocom_passage_ids and cocom_passage_lengths go together; give both or neither.")
        if ids is not None:
            if ids.dim() != 2 or lengths.shape != (ids.shape[0],):
                raise ValueError(
                    f"cocom_passage_ids has shape {tuple(ids.shape)} and cocom_passage_lengths "
                    f"{tuple(lengths.shape)}; expected [n_passages, length] and [n_passages]."
                )
            if bool((lengths < 1).any()) or bool((lengths > min(ids.shape[1], config.max_passage_tokens)).any()):
                raise ValueError(
                    f"cocom_passage_lengths {lengths.tolist()} must lie in 1..{config.max_passage_tokens} "
                    "(max_passage_tokens) and fit cocom_passage_ids."
                )
            rows += int(memory_counts(config, lengths).sum())
        embeds = inputs.get("cocom_context_embeds")
        if embeds is not None:
            if embeds.dim() != 2 or (
                config.base_hidden_size is not None and embeds.shape[1] != config.base_hidden_size
            ):
                raise ValueError(
                    f"cocom_context_embeds has shape {tuple(embeds.shape)}; expected [n, {config.base_hidden_size}] "
                    "(the LLM's hidden size)."
                )
            rows += embeds.shape[0]
        markers = 2 if config.passage_end_token else 1  # row `rows` is the <AE> marker, `rows + 1` the <SEP>
        if n_slots and (int(source.min()) < 0 or int(source.max()) >= rows + markers):
            raise ValueError(
                f"cocom_slot_source points at rows {int(source.min())}..{int(source.max())} but only {rows} context "
                f"embeddings and {markers} marker(s) exist; build COCOM inputs with peft_ctx.prepare_inputs."
            )

    def before_forward(self, tuner, adapter_name, config: CocomConfig, context_mask, inputs):
        if inputs.get("cocom_passage_ids") is None:
            return inputs
        compressed = self.compress(
            tuner, adapter_name, config, inputs["cocom_passage_ids"], inputs["cocom_passage_lengths"]
        )
        return {**inputs, "cocom_compressed": compressed}

    def compress(
        self,
        tuner,
        adapter_name: str,
        config: CocomConfig,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        role: str = COMPRESSOR_ROLE,
    ) -> torch.Tensor:
        """Context embeddings of right-padded passages, every passage's k rows in order (``role=QUERY_ROLE``:
        questions through the query LoRA).  # [sum k_i, hidden]"""
        module = tuner.context_layer().ctx_modules[adapter_name]
        if config.is_light:
            return module(ids.to(module.device), lengths.to(module.device))
        with self._compressor_lora(tuner.model, adapter_name, config, role):
            return compress_with_llm(tuner.model, module, config, ids, lengths)

    def _compressor_lora(self, model: nn.Module, adapter_name: str, config: CocomConfig, role=COMPRESSOR_ROLE):
        """Switch the LoRA layers to the separate compressor LoRA (or ``role``'s) for the compression pass."""
        return compressor_lora(model, adapter_name, role in self.companion_roles(config), role)

    def slot_embeddings(self, module: nn.Module, context_mask, inputs, dtype) -> torch.Tensor:
        marker = module.marker()  # [1 or 2, hidden]: <AE>, then <SEP> where passages end with one
        table = [inputs[name] for name in ("cocom_compressed", "cocom_context_embeds") if inputs.get(name) is not None]
        table = torch.cat([t.to(device=marker.device, dtype=dtype) for t in table + [marker]])  # [rows + m, hidden]
        return table[inputs["cocom_slot_source"].to(marker.device)]  # [n_slots, hidden]

    # ---- prompts -------------------------------------------------------------------------------------------------
    def prepare_docs(self, config: CocomConfig, contexts: list, options: dict[str, Any]) -> list[list[Passage]]:
        _check_options(options)
        prepared: list[list[Optional[Passage]]] = []
        texts, owners = [], []
        for i, docs in enumerate(contexts):
            if (
                docs is None
                or isinstance(docs, (str, torch.Tensor, CompressedPassage))
                or not isinstance(docs, (list, tuple))
            ):
                raise ValueError(
                    f"contexts[{i}] must be a list of passages (strings, or index.select(...) entries), got "
                    f"{type(docs).__name__}; COCOM answers from passages (contexts=[[passage, ...], ...])."
                )
            if not docs:
                raise ValueError(f"Example {i} has an empty passage list; COCOM needs at least one passage.")
            row: list[Optional[Passage]] = []
            for j, doc in enumerate(docs):
                if isinstance(doc, str):
                    if not doc.strip():
                        raise ValueError(f"contexts[{i}][{j}] is {doc!r}; passages must be non-empty strings.")
                    texts.append(doc)
                    owners.append((i, j))
                    row.append(None)
                elif isinstance(doc, CompressedPassage):
                    check_passage(doc, config, options.get("model"), where=f"contexts[{i}][{j}]")
                    row.append(Passage(k=doc.embeddings.shape[0], embeddings=doc.embeddings))
                else:
                    raise ValueError(
                        f"contexts[{i}][{j}] is a {type(doc).__name__}; give passage text or entries of a "
                        "peft_ctx.CompressedIndex (index.select(...)). Raw tensors are refused: nothing would tell "
                        "which adapter made them."
                    )
            prepared.append(row)
        if texts:
            for (i, j), ids in zip(owners, tokenize_passages(config, texts, options)):
                prepared[i][j] = Passage(k=config.memory_tokens(len(ids)), ids=ids)
        return prepared

    def prompt_fields(self, config: CocomConfig, docs: list[Passage], options: dict[str, Any]):
        _check_options(options)
        if not docs:
            raise ValueError(
                "COCOM answers from passages: give at least one per question (contexts=[[passage, ...], ...])."
            )
        autoencode = bool(options.get("autoencode"))
        parts: list = []
        for j, passage in enumerate(docs):
            if j and config.passage_separator:
                parts.append(config.passage_separator)
            parts.append(Slots(passage.k))
            if _end_slot(config, autoencode):
                parts.append(Slots(1))  # the passage's <SEP>
        if autoencode:
            parts.append(Slots(1))  # the <AE> marker: "now reconstruct the passage"
        return {"context": parts}, {"passages": list(docs), "autoencode": [autoencode]}

    def collate_context(self, config: CocomConfig, payloads, device) -> dict[str, torch.Tensor]:
        passages = [p for payload in payloads for p in payload["passages"]]
        text = [p for p in passages if p.ids is not None]
        stored = [p for p in passages if p.embeddings is not None]
        n_text_rows = sum(p.k for p in text)
        marker = n_text_rows + sum(p.k for p in stored)
        source, text_row, stored_row = [], 0, n_text_rows
        for payload in payloads:
            for p in payload["passages"]:
                if p.ids is not None:
                    source.extend(range(text_row, text_row + p.k))
                    text_row += p.k
                else:
                    source.extend(range(stored_row, stored_row + p.k))
                    stored_row += p.k
                if _end_slot(config, payload["autoencode"][0]):
                    source.append(marker + 1)
            if payload["autoencode"][0]:
                source.append(marker)
        batch = {"cocom_slot_source": torch.tensor(source, dtype=torch.long)}
        if text:
            longest = max(len(p.ids) for p in text)
            batch["cocom_passage_ids"] = torch.tensor([p.ids + [0] * (longest - len(p.ids)) for p in text])
            batch["cocom_passage_lengths"] = torch.tensor([len(p.ids) for p in text], dtype=torch.long)
        if stored:
            batch["cocom_context_embeds"] = torch.cat([p.embeddings for p in stored])  # [rows, hidden]
        return {k: v.to(device) for k, v in batch.items()} if device is not None else batch

    # ---- registry hooks ------------------------------------------------------------------------------------------
    def index_passages(self, model, tokenizer, passages, encoder=None):
        index = compress(model, tokenizer, list(passages), show_progress=False)
        return PassageIndex([index[i] for i in range(len(index))], index.save)

    @contextlib.contextmanager
    def serving(self, model):
        """The active adapter's decoder LoRA merged into the base weights (decoding at the base model's speed), for
        passages compressed beforehand: compressing on the fly needs the unmerged weights."""
        tuner = model.base_model
        if model.training or model.active_peft_config.lora_r == 0 or tuner.merged_lora_adapters():
            yield model
            return
        tuner.merge_adapter()
        try:
            yield model
        finally:
            tuner.unmerge_adapter()

    def train(self, model, tokenizer, data, stages, work_dir, seed=0, callbacks=None):
        from .recipe import train as train_recipe  # the trainer (trl) loads on first use, not on import

        return train_recipe(model, tokenizer, data, stages, work_dir, seed=seed, callbacks=callbacks)

    def diagnostics(self, model, tokenizer, passages, encoder=None):
        from .recipe import diagnostics

        return diagnostics(model, tokenizer, passages)


def _end_slot(config: CocomConfig, autoencode: bool) -> bool:
    """Whether each passage's slots are followed by its end marker (<SEP>; ARC's continuation state). ARC's
    reconstruction reads a passage's states followed by its <Rec> token alone: there the <AE> marker takes the
    continuation state's place."""
    return config.passage_end_token and not (autoencode and config.compressor_type == "arc")


def _check_options(options: dict[str, Any]) -> None:
    unknown = sorted(name for name, value in options.items() if name not in OPTIONS and value is not None)
    if unknown:
        raise ValueError(f"Unknown COCOM option(s) {unknown}; COCOM takes none besides the shared ones.")
    if options.get("encoder") is not None:
        raise ValueError(
            "COCOM compresses passages with its own compressor (the LLM or the adapter's encoder); drop encoder=."
        )


register_method(CocomMethod())
