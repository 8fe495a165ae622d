"""Import the projector of an official xRAG checkpoint (a full model with the projector inside) as a peft_ctx adapter.

The official release is one model folder: ``config.json`` with ``projector_type`` and ``retriever_hidden_size``, and
weights in which the projector's linear layers sit under a ``projector`` module. Only those tensors are read (lazily,
safetensors or ``weights_only`` torch files), so a 7B checkpoint converts in seconds into a few-MB adapter.

    python -m peft_ctx.convert CHECKPOINT_DIR OUTPUT_DIR [--base_model mistralai/Mistral-7B-Instruct-v0.2]

``tests/fixtures/published`` holds what the release's code (``XMistralForCausalLM`` and ``run_eval.py``'s prompt)
gives on a tiny checkpoint in this layout; the converted adapter gives the same prompt ids, logits and tokens.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from safetensors.torch import save_file

from ..checkpoints import checkpoint_keys, read_checkpoint_tensors
from ..converting import PublishedFamily, peek_config, refuse_existing_adapter, release_config
from .config import OFFICIAL_CHUNK_TOKENS, OFFICIAL_EVAL_TEMPLATE, XRAGConfig

# The frozen decoders of the releases, by the architecture their config.json names.
OFFICIAL_BASES = {
    "XMistralForCausalLM": "mistralai/Mistral-7B-Instruct-v0.2",
    "XMixtralForCausalLM": "mistralai/Mixtral-8x7B-Instruct-v0.1",
}

_PROJECTOR_KEY = re.compile(r"(?:^|\.)projector\.(\d+)\.(weight|bias)$")
_EMBED_KEY = re.compile(r"^(.*(?:embed_tokens|wte|word_embeddings))\.weight$")


def convert_official_xrag(
    checkpoint_dir: str,
    output_dir: str,
    base_model_name_or_path: Optional[str] = None,
    embedding_module: Optional[str] = None,
    overwrite: bool = False,
    **config_overrides,
) -> XRAGConfig:
    """Write a peft_ctx xRAG adapter (adapter_config.json + adapter_model.safetensors) from an official checkpoint.

    The adapter renders the official evaluation prompt (``OFFICIAL_EVAL_TEMPLATE``, plain text, slots joined by a
    space) and chunks documents as the official retriever did (180 tokens); ``config_overrides`` replace any of it.
    """
    required = ("projector_type", "retriever_hidden_size", "hidden_size")
    model_config = release_config(checkpoint_dir, required, "xRAG", "the official model folder, e.g. xrag-7b/")
    refuse_existing_adapter(output_dir, overwrite)

    tensors = read_checkpoint_tensors(checkpoint_dir, lambda key: _PROJECTOR_KEY.search(key) is not None)
    if not tensors:
        raise ValueError(f"No projector weights (keys like 'projector.projector.0.weight') found in {checkpoint_dir}.")
    prefixes = {key[: _PROJECTOR_KEY.search(key).start()] for key in tensors}
    if len(prefixes) != 1:
        raise ValueError(f"Found projector weights under several modules {sorted(prefixes)}; expected exactly one.")
    # The official Sequential interleaves Linear and GELU; ours does too, so Linear i keeps index 2*i.
    linear_indices = sorted({int(_PROJECTOR_KEY.search(key).group(1)) for key in tensors})
    # The checkpoint was trained and evaluated with the official prompts and chunks: keep them, unless overridden.
    official = {
        "prompt_template": OFFICIAL_EVAL_TEMPLATE,
        "use_chat_template": False,
        "slot_separator": " ",
        "chunk_tokens": OFFICIAL_CHUNK_TOKENS,
    }
    config = XRAGConfig(
        retriever_hidden_size=int(model_config["retriever_hidden_size"]),
        projector_type=model_config["projector_type"],
        base_model_name_or_path=base_model_name_or_path or _official_base(model_config),
        base_hidden_size=int(model_config["hidden_size"]),
        **{**official, **config_overrides},
    )
    if len(linear_indices) != config.projector_depth:
        raise ValueError(
            f"projector_type={config.projector_type!r} means {config.projector_depth} linear layers but the "
            f"checkpoint has {len(linear_indices)} (indices {linear_indices})."
        )
    embedding_module = embedding_module or _find_embedding_module(checkpoint_dir)
    state = {}
    for key, tensor in tensors.items():
        match = _PROJECTOR_KEY.search(key)
        ours = 2 * linear_indices.index(int(match.group(1)))
        state[f"base_model.model.{embedding_module}.ctx_modules.projector.{ours}.{match.group(2)}"] = (
            tensor.float().contiguous()
        )
    first = state[f"base_model.model.{embedding_module}.ctx_modules.projector.0.weight"]
    if tuple(first.shape) != (config.base_hidden_size, config.retriever_hidden_size):
        raise ValueError(
            f"The first projector layer has shape {tuple(first.shape)}, expected (hidden_size, retriever_hidden_size) "
            f"= ({config.base_hidden_size}, {config.retriever_hidden_size}) from config.json."
        )
    os.makedirs(output_dir, exist_ok=True)
    config.save_pretrained(output_dir)
    save_file(state, os.path.join(output_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    return config


def _find_embedding_module(checkpoint_dir: str) -> str:
    candidates = sorted({m.group(1) for m in map(_EMBED_KEY.match, checkpoint_keys(checkpoint_dir)) if m})
    if len(candidates) != 1:
        raise ValueError(
            f"Cannot tell the input-embedding module from the checkpoint's keys (found {candidates}); pass "
            "embedding_module='model.embed_tokens' (the module path in the base model)."
        )
    return candidates[0]


def _official_base(model_config: dict) -> Optional[str]:
    for architecture in model_config.get("architectures") or ():
        if architecture in OFFICIAL_BASES:
            return OFFICIAL_BASES[architecture]
    return model_config.get("_name_or_path") or None


def _is_release(path: str) -> bool:
    settings = peek_config(path)
    return settings is not None and "projector_type" in settings and "retriever_hidden_size" in settings


FAMILY = PublishedFamily(
    name="xrag",
    title="xRAG",
    method="xrag",
    convert=convert_official_xrag,
    detect=_is_release,
    hub_ids=("Hannibal046/xrag-7b", "Hannibal046/xrag-moe"),
    base_models=tuple(OFFICIAL_BASES.values()),
    paper="Cheng et al. 2024, xRAG: Extreme Context Compression for Retrieval-augmented Generation with One Token "
    "(arXiv:2405.13792)",
    license=None,
    license_text="none stated (the release's repository, Hannibal046/xRAG, has no licence file): ask its authors "
    "before using the weights beyond research; the base model's own licence applies to it",
    looks_for="a model folder whose config.json has projector_type and retriever_hidden_size",
)
