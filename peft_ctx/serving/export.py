"""Serving through an inference engine: the input-embedding sequences an adapter builds, and the model an engine loads.

Every peft_ctx method reduces, at serving time, to one sequence of input embeddings per question: the base model's
token embeddings everywhere except the context slots, which hold the adapter's embeddings (xRAG's projected vector,
SPRING's virtual tokens, COCOM's compressed passages). An engine that takes input embeddings (vLLM's
``prompt_embeds``, a llama.cpp batch with ``embd``) then runs a plain causal LM: the unchanged base model for xRAG and
SPRING, the base with the decoder LoRA merged for COCOM. ``prompt_embeds`` builds the sequences;
``export_for_serving`` writes that model with a ``peft_ctx_serving.json`` recording which adapter the embeddings
must come from, and ``check_export`` refuses embeddings of another adapter.

Example::

    import peft_ctx
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, "org/xrag-adapter")
    peft_ctx.export_for_serving(model, "served", tokenizer=tokenizer)  # once
    embeds = peft_ctx.prompt_embeds(model, tokenizer, ["Who wrote it?"], [["Ada Obi wrote the report."]],
                                    encoder=encoder)
    # vLLM: LLM("served", enable_prompt_embeds=True).generate([{"prompt_embeds": e} for e in embeds])
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ..fingerprint import adapter_digest, adapter_fingerprint
from ..inference import ServingPrompt, active_config, serving_prompts
from ..methods import get_method
from ..version import __version__

__all__ = [
    "ServingPrompt",
    "adapter_digest",
    "adapter_fingerprint",
    "check_export",
    "export_base",
    "export_for_serving",
    "prompt_embeds",
    "read_export",
    "serving_prompts",
]

SERVING_FILE = "peft_ctx_serving.json"


def prompt_embeds(
    model,
    tokenizer,
    questions: Sequence[str],
    contexts: Optional[Sequence] = None,
    *,
    encoder=None,
    **options: Any,
) -> list[torch.Tensor]:
    """The input-embedding sequence the active adapter builds for each question, unpadded, for an inference engine.

    Each tensor is ``[seq, hidden]`` in the base model's dtype: the base token embeddings, with the context slots
    holding the adapter's embeddings, exactly what ``peft_ctx.generate`` feeds the decoder. Serve them on the model
    ``export_for_serving`` wrote (for COCOM the decoder LoRA is merged into it), e.g. vLLM's
    ``LLM.generate({"prompt_embeds": e})``, or ``base.generate(inputs_embeds=e[None])``.

    Args:
        questions, contexts, encoder, options: as for ``peft_ctx.generate``.

    Example::

        embeds = peft_ctx.prompt_embeds(model, tokenizer, ["Who wrote it?"], [["Ada Obi wrote the report."]])
        out = exported.generate(inputs_embeds=embeds[0][None], max_new_tokens=16, do_sample=False)
    """
    return [p.embeds for p in serving_prompts(model, tokenizer, questions, contexts, encoder=encoder, **options)]


def _served_state_dict(base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights under its own names: each tuner layer's ``base_layer`` in the layer's place, every
    adapter tensor (context modules, LoRA matrices) left out."""
    tuner_paths = sorted(
        (name for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)), key=len, reverse=True
    )
    state = {}
    for key, value in base.state_dict().items():
        for path in tuner_paths:
            prefix = f"{path}." if path else ""
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if not rest.startswith("base_layer."):
                key = None  # an adapter tensor inside the tuner layer
                break
            key = prefix + rest[len("base_layer.") :]
        if key is not None:
            state[key] = value
    return state


def export_for_serving(model, out_dir: str, tokenizer=None, *, overwrite: bool = False, **save_kwargs: Any) -> str:
    """Write the model an inference engine loads to serve the active adapter, plus ``peft_ctx_serving.json``.

    xRAG and SPRING serve on the unchanged base model; COCOM on the base with its decoder LoRA merged (the method's
    ``serving`` form). The folder is a plain transformers model (safetensors, no peft_ctx code needed to load it);
    the JSON records the method, the prompt settings and the adapter's fingerprint, which ``check_export`` compares
    with the adapter that builds the embeddings. ``tokenizer`` is saved beside it when given (engines and GGUF
    converters read it). An existing non-empty ``out_dir`` is refused unless ``overwrite=True``.

    Example::

        peft_ctx.export_for_serving(model, "served", tokenizer=tokenizer)
        # vllm serve served --enable-prompt-embeds
    """
    config = active_config(model)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(
            f"{out_dir!r} exists and is not empty; choose a new folder or pass overwrite=True to replace its files."
        )
    method = get_method(config.method)
    adapter_name = model.base_model.context_layer().active_method_adapter()
    tuner = model.base_model
    merged_before = set(tuner.merged_lora_adapters())
    was_training = model.training
    model.eval()
    try:
        with method.serving(model):
            merged = adapter_name in tuner.merged_lora_adapters()
            state = _served_state_dict(model.get_base_model())
            os.makedirs(out_dir, exist_ok=True)
            model.get_base_model().save_pretrained(out_dir, state_dict=state, safe_serialization=True, **save_kwargs)
    finally:
        model.train(was_training)
    if set(tuner.merged_lora_adapters()) != merged_before:
        raise RuntimeError("export_for_serving left the adapter's merge state changed; this is a peft_ctx bug.")
    base = model.get_base_model()
    info = {
        "peft_ctx_version": __version__,
        "method": config.method,
        "adapter_fingerprint": adapter_fingerprint(model, adapter_name),
        "lora_merged": merged,
        "base_model_name_or_path": config.base_model_name_or_path,
        "hidden_size": config.base_hidden_size,
        "vocab_size": config.base_vocab_size,
        "dtype": str(base.get_input_embeddings().base_layer.weight.dtype).removeprefix("torch."),
        "prompt_template": config.prompt_template,
        "system_prompt": config.system_prompt,
        "use_chat_template": config.use_chat_template,
    }
    with open(os.path.join(out_dir, SERVING_FILE), "w") as f:
        json.dump(info, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def export_base(model, out_dir: str, tokenizer=None, *, overwrite: bool = False, **save_kwargs: Any) -> str:
    """Write the unchanged base model of a PeftModel (every adapter left out, no LoRA merged): what an engine loads
    to serve the baselines (text RAG, no retrieval). Its ``peft_ctx_serving.json`` names no method."""
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(
            f"{out_dir!r} exists and is not empty; choose a new folder or pass overwrite=True to replace its files."
        )
    tuner = model.base_model
    if tuner.merged_lora_adapters():
        raise ValueError(
            f"The LoRA of {tuner.merged_lora_adapters()} is merged into the base weights; call "
            "model.base_model.unmerge_adapter() before exporting the base model."
        )
    base = model.get_base_model()
    os.makedirs(out_dir, exist_ok=True)
    base.save_pretrained(out_dir, state_dict=_served_state_dict(base), safe_serialization=True, **save_kwargs)
    embedding = base.get_input_embeddings()
    info = {
        "peft_ctx_version": __version__,
        "method": None,
        "lora_merged": False,
        "hidden_size": int(embedding.weight.shape[-1]),
        "vocab_size": int(embedding.weight.shape[0]),
    }
    with open(os.path.join(out_dir, SERVING_FILE), "w") as f:
        json.dump(info, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def read_export(export_dir: str) -> dict[str, Any]:
    """The ``peft_ctx_serving.json`` of a folder written by ``export_for_serving``."""
    path = os.path.join(export_dir, SERVING_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"{export_dir!r} has no {SERVING_FILE}: it was not written by peft_ctx.export_for_serving, so nothing "
            "says which adapter's embeddings it serves. Export the model with peft_ctx.export_for_serving(model, dir)."
        )
    with open(path) as f:
        return json.load(f)


def check_export(model, export: dict[str, Any] | str) -> None:
    """Refuse to serve the active adapter's embeddings on an export made for another adapter (or another base)."""
    info = read_export(export) if isinstance(export, str) else export
    config = active_config(model)
    adapter_name = model.base_model.context_layer().active_method_adapter()
    if info.get("method") is None:
        raise ValueError(
            "The export is the plain base model (peft_ctx.serving.export_base), for the baselines only; export this "
            "adapter with peft_ctx.export_for_serving to serve its embeddings."
        )
    if info.get("method") != config.method:
        raise ValueError(
            f"The export serves {info.get('method')!r} embeddings, but the active adapter is {config.method!r}; "
            "export this adapter with peft_ctx.export_for_serving."
        )
    fingerprint = adapter_fingerprint(model, adapter_name)
    if info.get("adapter_fingerprint") != fingerprint:
        raise ValueError(
            f"The export was made for another {config.method} adapter (fingerprint "
            f"{str(info.get('adapter_fingerprint'))[:12]}), not the active one ({fingerprint[:12]}): "
            f"{'its merged decoder LoRA and ' if info.get('lora_merged') else ''}its prompt settings belong to that "
            "adapter. Export this adapter with peft_ctx.export_for_serving(model, dir)."
        )
    if info.get("hidden_size") not in (None, config.base_hidden_size):
        raise ValueError(
            f"The export has hidden size {info.get('hidden_size')}, the adapter's base model "
            f"{config.base_hidden_size}; export this adapter's own base model."
        )
