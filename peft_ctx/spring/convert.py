"""Import an official SPRING release (a ``{model}.added_token_embeddings.pt`` tensor) as a peft_ctx adapter.

The release is one ``[N, d]`` tensor of virtual-token embeddings per base model. It is read with
``torch.load(weights_only=True)`` and written as ``adapter_config.json`` + ``adapter_model.safetensors``, which
``PeftModel.from_pretrained(base, output_dir)`` loads after ``import peft_ctx``:

    python -m peft_ctx.convert spring mistral.added_token_embeddings.pt OUTPUT_DIR --base_model BASE_FOLDER_OR_ID
    python -m peft_ctx.spring.convert mistral.added_token_embeddings.pt OUTPUT_DIR --base_model BASE_FOLDER_OR_ID
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from ..checkpoints import load_tensor_file
from ..convert import main as convert_main
from .config import SpringConfig

# The official release is for Llama-2 and Mistral models, whose input embedding lives here.
DEFAULT_EMBEDDING_MODULE = "model.embed_tokens"


def convert_official_spring(
    source: str,
    output_dir: str,
    base_model_name_or_path: Optional[str] = None,
    embedding_module: Optional[str] = None,
    overwrite: bool = False,
    **config_overrides,
) -> SpringConfig:
    """Write a peft_ctx SPRING adapter from an official ``added_token_embeddings.pt`` tensor file.

    Args:
        source: the ``[N, d]`` tensor file.
        output_dir: folder for the adapter; an adapter already there is only replaced with ``overwrite=True``.
        base_model_name_or_path: the base model (folder or Hub id). When its ``config.json`` can be read, the
            embedding module path and hidden size are taken from it and the tensor's d is checked against it.
        embedding_module: the input embedding's module path in the base model; default from the base model, else
            ``model.embed_tokens`` (Llama-2 / Mistral, the released models).
        config_overrides: further ``SpringConfig`` fields. ``use_chat_template`` defaults to False: the paper's prompt
            is plain text ("[i] passage" lines, the virtual tokens, then "Question: ...\\nAnswer:").
    """
    if os.path.isfile(os.path.join(output_dir, "adapter_config.json")) and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds an adapter; pass overwrite=True (--overwrite) to replace it."
        )
    tokens = _read_tokens(source)
    n, hidden = tokens.shape
    base_hidden = None
    if embedding_module is None and base_model_name_or_path is not None:
        embedding_module, base_hidden = _embedding_of(base_model_name_or_path)
    if base_hidden is not None and base_hidden != hidden:
        raise ValueError(
            f"{source} holds {hidden}-d embeddings but {base_model_name_or_path!r} has hidden size {base_hidden}; "
            "convert the file released for that base model."
        )
    embedding_module = embedding_module or DEFAULT_EMBEDDING_MODULE
    config = SpringConfig(
        num_virtual_tokens=n,
        base_model_name_or_path=base_model_name_or_path,
        base_hidden_size=hidden,
        **{"use_chat_template": False, **config_overrides},
    )
    key = f"base_model.model.{embedding_module}.ctx_modules.virtual_tokens"
    os.makedirs(output_dir, exist_ok=True)
    config.save_pretrained(output_dir)
    save_file(
        {key: tokens.float().contiguous()}, os.path.join(output_dir, "adapter_model.safetensors"), {"format": "pt"}
    )
    return config


def _read_tokens(source: str) -> torch.Tensor:
    if not os.path.isfile(source):
        raise ValueError(f"{source} is not a file; give the official '<model>.added_token_embeddings.pt' tensor file.")
    loaded = load_tensor_file(source)
    if isinstance(loaded, dict):
        tensors = [value for value in loaded.values() if isinstance(value, torch.Tensor)]
        if len(loaded) != 1 or len(tensors) != 1:
            raise ValueError(
                f"{source} holds a dict with keys {sorted(loaded)[:5]}; expected one [N, d] tensor of virtual-token "
                "embeddings."
            )
        loaded = tensors[0]
    if not isinstance(loaded, torch.Tensor) or loaded.dim() != 2 or not loaded.is_floating_point():
        shape = tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else type(loaded).__name__
        raise ValueError(f"{source} holds {shape}; expected one floating-point [N, d] tensor (N virtual tokens).")
    if loaded.shape[0] < 1:
        raise ValueError(f"{source} holds an empty tensor of shape {tuple(loaded.shape)}.")
    if not torch.isfinite(loaded).all():
        raise ValueError(f"{source} contains NaN or infinite values; the file is damaged.")
    return loaded


def _embedding_of(base_model_name_or_path: str) -> tuple[str, int]:
    """The input embedding's module path and hidden size, from the base model's config (no weights are read)."""

    try:
        model_config = AutoConfig.from_pretrained(base_model_name_or_path)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"Cannot read the config of base model {base_model_name_or_path!r} ({exc}); pass embedding_module "
            f"(--embedding_module, e.g. {DEFAULT_EMBEDDING_MODULE!r}) to convert without it."
        ) from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    embedding = model.get_input_embeddings()
    name = next(name for name, module in model.named_modules() if module is embedding)
    return name, int(embedding.weight.shape[-1])


def main(argv: Optional[list[str]] = None) -> None:

    convert_main(["spring", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
