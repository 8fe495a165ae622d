"""COCOM's hooks into the shared machinery: passages in, k = ceil(n / rate) context embeddings per passage out.

Prompt side: every passage gets ``Slots(k)`` in ``{context}`` (passages separated by ``passage_separator``); a batch
carries the passages' token ids (or precomputed embeddings from a ``CompressedIndex``) and, per slot, which row of the
compressed table fills it. Forward side: ``before_forward`` compresses the passages once per call, outside the slot
filling, with the gradient flowing into the compressor; ``slot_embeddings`` then only gathers rows.
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.utils.checkpoint
from peft import LoraConfig
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoModel, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.pytorch_utils import Conv1D

from .. import local_copies
from ..distributed import full_shape, gathered
from ..layer import companion_name
from ..methods import ContextMethod, Entry, PassageIndex, Resources, Target, register_method
from ..prompting import Slots, continuation_ids
from .compressed import CompressedPassage, check_passage, compress
from .config import COMPRESSOR_ROLE, CocomConfig
from .convert import CLARA
from .modules import CocomLightCompressor, CocomTokens, pooled_runs
from .recipe import STAGES, diagnostics
from .recipe import train as train_recipe

# Options that prepare_inputs / generate / the collators may pass; COCOM reads passages itself and takes no encoder.
OPTIONS = ("tokenizer", "model", "encoder", "encode_batch_size", "autoencode")


@dataclass
class Passage:
    """One passage of one example, ready for the prompt: token ids to compress, or precomputed embeddings."""

    k: int  # context embeddings (slots) it takes
    ids: Optional[list[int]] = None  # compressor tokens, truncated
    embeddings: Optional[torch.Tensor] = None  # [k, hidden], from a CompressedIndex


# The demo's training per profile (StageSettings fields by stage); the demo profile skips pretraining.
_DEMO_STAGES = {
    "demo": {
        "pretrain": {"steps": 0, "batch_size": 4, "learning_rate": 1e-3, "max_chars": 300},
        "qa": {"steps": 10, "batch_size": 4, "learning_rate": 1e-3},
    },
    "reproduce": {
        "pretrain": {"steps": 300, "batch_size": 4, "learning_rate": 1e-3, "max_chars": 300, "save_steps": 60},
        "qa": {"steps": 120, "batch_size": 4, "learning_rate": 1e-3, "save_steps": 60},
    },
}
_TRAINS = "compressor + decoder LoRA (COCOM-light: encoder, projection, decoder LoRA)"


def _entry(name: str, rate: int, light: bool = False, targets: tuple = (), **settings: Any) -> Entry:
    def make_config(resources: Resources) -> CocomConfig:
        # COCOM-light copies the encoder's weights into the adapter; the config records the encoder's name.
        compressor = resources.encoder_name_or_path if light else None
        return CocomConfig(
            compression_rate=rate,
            compressor=compressor,
            base_model_name_or_path=resources.base_model_name_or_path,
            **settings,
        )

    label = f"COCOM{'-light' if light else ''} xi={rate}"
    return Entry(name, label, make_config, stages=_DEMO_STAGES, trains=_TRAINS, targets=targets)


class CocomMethod(ContextMethod):
    name = "cocom"
    title = "COCOM"
    config_class = CocomConfig
    card_template = "cocom.md.j2"
    option_names = ("autoencode",)
    stages = STAGES
    input_names = ("cocom_passage_ids", "cocom_passage_lengths", "cocom_context_embeds", "cocom_slot_source")
    option_resources = ("tokenizer", "model")
    converters = {"clara": CLARA}

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
        return _light_compressor(config, hidden_size, initial[n_memory + 1 : n_memory + 2])

    def check_base_model(self, config: CocomConfig, model: nn.Module) -> None:
        if not config.is_light and getattr(model, "base_model", model) is model:
            raise ValueError(
                f"COCOM compresses with the LLM's own transformer, but {type(model).__name__} exposes none as "
                "`base_model`; use a transformers causal LM (AutoModelForCausalLM) or COCOM-light (compressor=...)."
            )

    def companion_roles(self, config: CocomConfig) -> tuple[str, ...]:
        return (COMPRESSOR_ROLE,) if config.separate_compressor_adapter and config.lora_r > 0 else ()

    def inject(self, tuner, model, adapter_name, config: CocomConfig, low_cpu_mem_usage=False) -> None:
        if config.lora_r == 0:
            return

        names = [adapter_name] + [companion_name(adapter_name, role) for role in self.companion_roles(config)]
        targets = config.lora_target_modules
        if isinstance(targets, str) and targets.lower() == "all-linear":
            targets = _all_linear(model)
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
        self, tuner, adapter_name: str, config: CocomConfig, ids: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Context embeddings of right-padded passages, every passage's k rows in order.  # [sum k_i, hidden]"""
        module = tuner.context_layer().ctx_modules[adapter_name]
        if config.is_light:
            device = module.projection.weight.device
            return module(ids.to(device), lengths.to(device))
        with self._compressor_lora(tuner.model, adapter_name, config):
            return _compress_with_llm(tuner.model, module, config, ids, lengths)

    @contextlib.contextmanager
    def _compressor_lora(self, model: nn.Module, adapter_name: str, config: CocomConfig):
        """Switch the LoRA layers to the separate compressor LoRA for the compression pass (PISCO's set-up)."""
        if COMPRESSOR_ROLE not in self.companion_roles(config):
            yield
            return

        companion = companion_name(adapter_name, COMPRESSOR_ROLE)
        switched = []
        for module in model.modules():
            if isinstance(module, LoraLayer) and companion in module.lora_A:
                if module.merged:
                    # A merged layer runs its base weights only, which now hold the decoder LoRA's delta.
                    raise ValueError(
                        f"The decoder LoRA of {adapter_name!r} is merged into the base weights (merge_adapter()), "
                        "but its separate compressor LoRA needs them unmerged: call model.unmerge_adapter() before "
                        "compressing, or compress beforehand (peft_ctx.compress) and pass the CompressedIndex."
                    )
                switched.append((module, module._active_adapter))

        @contextlib.contextmanager
        def compressor_active():
            # Not set_adapter: that would also flip requires_grad, and both LoRAs train.
            previous = [module._active_adapter for module, _ in switched]
            for module, _ in switched:
                module._active_adapter = [companion]
            try:
                yield
            finally:
                for (module, _), active in zip(switched, previous):
                    module._active_adapter = active

        # Under gradient checkpointing the backward pass recomputes each compression layer after this context has
        # ended, when the decoder's LoRA is active again: wrong gradients in fp32, a CheckpointError in bf16. For the
        # compression pass the checkpointed layers get a checkpoint whose recomputation selects the compressor's
        # LoRA too (non-reentrant: only that kind takes a context for the recomputation).
        checkpointed = [
            (layer, layer._gradient_checkpointing_func)
            for layer in model.modules()
            if getattr(layer, "gradient_checkpointing", False) and hasattr(layer, "_gradient_checkpointing_func")
        ]
        recompute = functools.partial(
            torch.utils.checkpoint.checkpoint,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), compressor_active()),
        )
        for layer, _ in checkpointed:
            layer._gradient_checkpointing_func = recompute
        try:
            with compressor_active():
                yield
        finally:
            for layer, function in checkpointed:
                layer._gradient_checkpointing_func = function

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
        parts: list = []
        for j, passage in enumerate(docs):
            if j and config.passage_separator:
                parts.append(config.passage_separator)
            parts.append(Slots(passage.k))
            if config.passage_end_token:
                parts.append(Slots(1))  # the passage's <SEP>
        autoencode = bool(options.get("autoencode"))
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
                if config.passage_end_token:
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
        return train_recipe(model, tokenizer, data, stages, work_dir, seed=seed, callbacks=callbacks)

    def diagnostics(self, model, tokenizer, passages, encoder=None):
        return diagnostics(model, tokenizer, passages)

    def demo_entries(self):
        return (_entry("cocom_xi4", 4), _entry("cocom_xi16", 16), _entry("cocom_light", 4, light=True))

    def benchmark_entries(self):
        headline = (
            Target(
                "ttft_speedup_vs_rag",
                5.69,
                source="COCOM's 5.69x is decoding time at compression 128; at 16 the paper reports 5.00x",
            ),
        )
        return tuple(
            _entry(name, rate, light, targets, max_passage_tokens=256)
            for name, rate, light, targets in (
                ("cocom_xi4", 4, False, ()),
                ("cocom_xi16", 16, False, headline),
                ("cocom_xi128", 128, False, ()),
                ("cocom_light", 4, True, ()),
            )
        )


def _all_linear(model: nn.Module) -> list[str]:
    """Every linear layer of the LLM (not the output head, nothing inside a PEFT layer such as COCOM-light's encoder).

    Resolved here rather than by PEFT's "all-linear", which on transformers-5 MoE models also targets the fused expert
    parameters, where LoRA allows no dropout.
    """

    linear = (nn.Linear, Conv1D)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside = [f"{name}." for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    names = []
    for name, module in model.named_modules():
        if module is head or any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, LoraLayer):
            module = module.get_base_layer()
        elif isinstance(module, BaseTunerLayer):
            continue
        if isinstance(module, linear):
            names.append(name)
    if not names:
        raise ValueError(
            f"lora_target_modules='all-linear' found no linear layer in {type(model).__name__}; name the modules "
            "(lora_target_modules=[...]) or set lora_r=0."
        )
    return names


def _check_options(options: dict[str, Any]) -> None:
    unknown = sorted(name for name, value in options.items() if name not in OPTIONS and value is not None)
    if unknown:
        raise ValueError(f"Unknown COCOM option(s) {unknown}; COCOM takes none besides the shared ones.")
    if options.get("encoder") is not None:
        raise ValueError(
            "COCOM compresses passages with its own compressor (the LLM or the adapter's encoder); drop encoder=."
        )


def adapter_module(model, config: CocomConfig) -> tuple[str, nn.Module]:
    """The name and context module of the adapter whose config is ``config`` on a PeftModel."""
    if model is None:
        raise ValueError(
            "COCOM-light reads passages with its encoder's tokenizer, which lives in the adapter: pass the model "
            "(peft_ctx.prepare_inputs does; for training, ContextDataCollator(..., model=model))."
        )
    names = [name for name, c in getattr(model, "peft_config", {}).items() if c is config]
    if not names:
        raise ValueError("The given model does not hold this COCOM adapter config; pass the PeftModel it belongs to.")
    layer = model.get_base_model().get_input_embeddings()
    return names[0], layer.ctx_modules[names[0]]


def tokenize_passages(config: CocomConfig, texts: list[str], options: dict[str, Any]) -> list[list[int]]:
    """Compressor tokens of each passage, truncated to ``max_passage_tokens``."""
    if config.is_light:
        _, module = adapter_module(options.get("model"), config)
        tokenizer, _ = module.tokenizer
        tokenizer.enable_truncation(max_length=config.max_passage_tokens)
        rows = [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=True)]
    else:
        tokenizer = options.get("tokenizer")
        if tokenizer is None:
            raise ValueError("COCOM tokenises passages with the LLM's tokenizer; none was given.")
        ids_list = tokenizer(texts, add_special_tokens=False).input_ids
        if config.passage_special_tokens:
            bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            if config.passage_truncation == "sequence":
                # "<s>passage</s>" tokenised as one text: the passage continues after BOS (continuation_ids), and
                # truncation cuts the end of the whole, EOS first.
                ids_list = continuation_ids(tokenizer, texts)
                rows = [(bos + ids + eos)[: config.max_passage_tokens] for ids in ids_list]
            else:
                room = config.max_passage_tokens - len(bos) - len(eos)
                rows = [bos + ids[:room] + eos for ids in ids_list]
        else:
            rows = [ids[: config.max_passage_tokens] for ids in ids_list]
    for text, ids in zip(texts, rows):
        if not ids:
            raise ValueError(f"The passage {text!r:.60} tokenises to nothing; give passages with text in them.")
    return rows


def _compress_with_llm(
    model: nn.Module, module: CocomTokens, config: CocomConfig, ids: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """COCOM: [<ENC>, passage tokens, k memory tokens] through the LLM; the last hidden states at the memory
    positions are the context embeddings.  # [sum k_i, hidden]

    With ``residual_pooling`` they are the pooled token embeddings plus the correction, which reads those memory
    states or (``residual_source='tokens'``) the passage's own token states pooled like the embeddings."""
    layer = model.get_input_embeddings()
    base_embedding = getattr(layer, "base_layer", layer)
    device = base_embedding.weight.device
    ids, lengths = ids.to(device), lengths.to(device)
    tokens = base_embedding(ids)  # [n, len, hidden]; the plain embedding, so no context slot is filled here
    dtype = tokens.dtype
    if config.residual_pooling and config.residual_source == "tokens":
        # No learned input here: with the LLM frozen (lora_r=0) the compressor pass builds no autograd graph.
        mask = (torch.arange(ids.shape[1], device=device).unsqueeze(0) < lengths.unsqueeze(1)).long()  # [n, len]
        states = model.base_model(inputs_embeds=tokens, attention_mask=mask, use_cache=False).last_hidden_state
        pooled_states = pooled_runs(states, lengths, config.compression_rate)  # [sum k_i, hidden]
        return pooled_runs(tokens, lengths, config.compression_rate) + module.correction(pooled_states).to(dtype)
    counts = memory_counts(config, lengths)  # [n] k_i
    total = 1 + lengths + counts  # [n] <ENC> + tokens + memory
    positions = torch.arange(int(total.max()), device=device).unsqueeze(0)  # [1, seq]
    ends = lengths.unsqueeze(1)  # [n, 1]
    is_token = (positions >= 1) & (positions <= ends)  # [n, seq]
    is_memory = (positions > ends) & (positions <= ends + counts.unsqueeze(1))  # [n, seq]
    token_index = (positions - 1).clamp(0, ids.shape[1] - 1).expand(ids.shape[0], -1)
    gathered = torch.gather(tokens, 1, token_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    # Per position, its row of the module's [memory; <ENC>; <AE>] table: memory token j at the j-th position after
    # the passage, <ENC> at position 0 (and, unused, wherever the passage's own tokens or padding go).
    rows = torch.where(is_memory, (positions - 1 - ends).clamp(min=0), module.enc_row)  # [n, seq]
    learned = module(rows.to(module.memory.device)).to(device=device, dtype=dtype)  # [n, seq, hidden]
    is_learned = is_memory | (positions == 0)
    embeds = torch.where(is_token.unsqueeze(-1), gathered, torch.where(is_learned.unsqueeze(-1), learned, 0.0))
    attention_mask = (positions < total.unsqueeze(1)).long()  # right padding: positions are 0..total-1 per passage
    position_ids = None
    if config.compressor_positions == "left_padded":
        # Where the passage sits in an input left-padded to max_passage_tokens + 1: <ENC> at max - n.
        position_ids = positions + (config.max_passage_tokens - lengths).unsqueeze(1)  # [n, seq]
    hidden = model.base_model(
        inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    compressed = hidden[is_memory]  # [sum k_i, hidden], row-major: passage by passage, memory token by memory token
    if module.residual is None:
        return compressed
    return pooled_runs(tokens, lengths, config.compression_rate) + module.correction(compressed).to(dtype)


def memory_counts(config: CocomConfig, lengths: torch.Tensor) -> torch.Tensor:
    """k_i, the context embeddings of each passage of ``lengths[i]`` compressor tokens.  # [n]"""
    if config.memory_tokens_per_passage is not None:
        return torch.full_like(lengths, config.memory_tokens_per_passage)
    return -(-lengths // config.compression_rate)


def _light_compressor(config: CocomConfig, hidden_size: int, ae_initial: torch.Tensor) -> CocomLightCompressor:

    blob = None
    if getattr(config, "_fresh_compressor", config.compressor_config is None):
        try:
            tokenizer = AutoTokenizer.from_pretrained(local_copies.resolve(config.compressor))
            encoder = AutoModel.from_pretrained(local_copies.resolve(config.compressor), dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"Cannot load the COCOM-light compressor {config.compressor!r} (a BERT-style encoder folder or Hub "
                f"id with its tokenizer): {exc}"
            ) from exc
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"The compressor {config.compressor!r} has no fast tokenizer (tokenizer.json); COCOM-light stores the "
                "fast tokenizer in the adapter. Save the encoder with a fast tokenizer first."
            )
        encoder_hidden = _check_encoder(config.compressor, encoder, tokenizer)
        config.compressor_config = encoder.config.to_dict()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        blob = json.dumps({"tokenizer": tokenizer.backend_tokenizer.to_str(), "pad_token_id": pad_id}).encode("utf-8")
    else:
        settings = dict(config.compressor_config)
        model_type = settings.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ValueError(
                f"compressor_config has model_type={model_type!r}, which this transformers does not know; install "
                "the transformers version the adapter was made with."
            )
        encoder = AutoModel.from_config(CONFIG_MAPPING[model_type].from_dict(settings))
        encoder_hidden = _encoder_hidden_size(encoder)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # the pooled output is unused; keep its weights out of the adapter
    return CocomLightCompressor(encoder, encoder_hidden, config.compression_rate, hidden_size, ae_initial, blob)


def _encoder_hidden_size(encoder: nn.Module) -> int:
    settings = encoder.config
    for name in ("hidden_size", "d_model", "dim"):
        value = getattr(settings, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"Cannot read the hidden size of the compressor {type(encoder).__name__} from its config.")


def _check_encoder(name: str, encoder: nn.Module, tokenizer) -> int:
    """The encoder's hidden size, after checking it returns per-token hidden states."""
    batch = tokenizer(["a short passage"], return_tensors="pt")
    try:
        # gathered: under a ZeRO-3 init the encoder loads partitioned, and no engine gathers it for this probe
        with torch.no_grad(), gathered(*encoder.parameters()):
            output = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = getattr(output, "last_hidden_state", None)
    except (TypeError, ValueError, RuntimeError) as exc:
        hidden, reason = None, f"it failed on input_ids + attention_mask ({exc})"
    else:
        reason = f"its output {type(output).__name__} has no last_hidden_state"
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(
            f"The compressor {name!r} ({type(encoder).__name__}) gives no per-token hidden states: {reason}. "
            "COCOM-light needs an encoder whose AutoModel returns last_hidden_state, e.g. BERT or MiniLM."
        )
    size = _encoder_hidden_size(encoder)
    if hidden.shape[-1] != size:
        raise ValueError(f"The compressor {name!r} returns {hidden.shape[-1]}-d states but its config says {size}.")
    return size


register_method(CocomMethod())
