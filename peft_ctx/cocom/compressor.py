"""COCOM's compressor: tokenising passages for it, running it (the LLM with its LoRA, or COCOM-light's encoder),
and the LoRA bookkeeping around it. ``method.py`` holds the method's hooks and calls these."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.utils.checkpoint
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoModel, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.pytorch_utils import Conv1D

from .. import local_copies
from ..distributed import gathered
from ..layer import companion_name
from ..prompting import continuation_ids
from .config import COMPRESSOR_ROLE, CocomConfig
from .modules import CocomLightCompressor, CocomTokens, EncoderCompressor, pooled_runs, tokenizer_blob


def all_linear(model: nn.Module) -> list[str]:
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
        # ARC reads the bare passage, stripped as its evaluation reads documents; a BERT-style encoder reads
        # [CLS] passage [SEP].
        arc = config.compressor_type == "arc"
        texts = [text.strip() for text in texts] if arc else texts
        rows = [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=not arc)]
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


def compress_with_llm(
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

    def pooled_plus_correction(states: torch.Tensor) -> torch.Tensor:  # residual_pooling: [sum k_i, hidden]
        return pooled_runs(tokens, lengths, config.compression_rate) + module.correction(states).to(tokens.dtype)

    if config.residual_pooling and config.residual_source == "tokens":
        # No learned input here: with the LLM frozen (lora_r=0) the compressor pass builds no autograd graph.
        mask = (torch.arange(ids.shape[1], device=device).unsqueeze(0) < lengths.unsqueeze(1)).long()  # [n, len]
        states = model.base_model(inputs_embeds=tokens, attention_mask=mask, use_cache=False).last_hidden_state
        return pooled_plus_correction(pooled_runs(states, lengths, config.compression_rate))
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
    learned = module(rows.to(module.memory.device)).to(device=device, dtype=tokens.dtype)  # [n, seq, hidden]
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
    return compressed if module.residual is None else pooled_plus_correction(compressed)


def memory_counts(config: CocomConfig, lengths: torch.Tensor) -> torch.Tensor:
    """k_i, the context embeddings of each passage of ``lengths[i]`` compressor tokens.  # [n]"""
    if config.memory_tokens_per_passage is not None:
        return torch.full_like(lengths, config.memory_tokens_per_passage)
    return -(-lengths // config.compression_rate)


def load_encoder(name: str, what: str, kind: str):
    """A compressor's tokenizer and fp32 ``AutoModel`` from folder / Hub id ``name`` (or its local copy); a
    ValueError naming ``what`` it is and ``kind`` of model it must be otherwise."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(local_copies.resolve(name))
        model = AutoModel.from_pretrained(local_copies.resolve(name), dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ValueError(f"Cannot load {what} {name!r} ({kind}): {exc}") from exc
    return tokenizer, model


def light_compressor(config: CocomConfig, hidden_size: int, ae_initial: torch.Tensor) -> EncoderCompressor:
    if config.compressor_type == "arc":
        from .arc import arc_compressor  # transformers' Llama modelling loads only for ARC adapters

        return arc_compressor(config, hidden_size, ae_initial)

    blob = None
    if getattr(config, "_fresh_compressor", config.compressor_config is None):
        tokenizer, encoder = load_encoder(
            config.compressor, "the COCOM-light compressor", "a BERT-style encoder folder or Hub id with its tokenizer"
        )
        blob = tokenizer_blob(config.compressor, tokenizer)
        encoder_hidden = _check_encoder(config.compressor, encoder, tokenizer)
        config.compressor_config = encoder.config.to_dict()
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


@contextlib.contextmanager
def compressor_lora(model: nn.Module, adapter_name: str, separate: bool, role: str = COMPRESSOR_ROLE):
    """Switch the LoRA layers to the separate compressor LoRA (``separate``) for the compression pass (PISCO's
    set-up; ``role``: another companion, CLaRa's query LoRA); without one, the decoder's LoRA compresses too."""
    if not separate:
        yield
        return

    companion = companion_name(adapter_name, role)
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
