"""Import an official SPRING release (a ``{model}.added_token_embeddings.pt`` tensor) as a peft_ctx adapter.

The release is one ``[N, d]`` tensor of virtual-token embeddings per base model. It is read with
``torch.load(weights_only=True)`` and written as ``adapter_config.json`` + ``adapter_model.safetensors``, which
``PeftModel.from_pretrained(base, output_dir)`` loads after ``import peft_ctx``:

    python -m peft_ctx.convert mistral.added_token_embeddings.pt OUTPUT_DIR --base_model BASE_FOLDER_OR_ID

The adapter renders the prompt of the release's own code (``example.py``, and the training data of
``training/fine_tune_qa_dataset.py``): each passage as ``[i] passage`` and a newline, one more newline, the virtual
tokens, then ``Question: ...\nAnswer:``. ``tests/fixtures/published`` holds what that code gives on a tiny checkpoint.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from ..checkpoints import load_tensor_file
from ..converting import PublishedFamily, refuse_existing_adapter
from .config import SpringConfig

# The official release is for Llama-2 and Mistral models, whose input embedding lives here.
DEFAULT_EMBEDDING_MODULE = "model.embed_tokens"
RELEASE_SUFFIX = ".added_token_embeddings.pt"
# The release's prompt: "[1] p1\n[2] p2\n" + "\n" + virtual tokens + "Question: {q}\nAnswer:" (example.py).
OFFICIAL_TEMPLATE = "{context}\n{virtual}Question: {question}\nAnswer:"


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
        config_overrides: further ``SpringConfig`` fields. The prompt defaults to the release's (``OFFICIAL_TEMPLATE``,
            plain text, no chat template).
    """
    refuse_existing_adapter(output_dir, overwrite)
    tokens = _read_tokens(_release_file(source))
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
        **{"use_chat_template": False, "prompt_template": OFFICIAL_TEMPLATE, **config_overrides},
    )
    key = f"base_model.model.{embedding_module}.ctx_modules.virtual_tokens"
    os.makedirs(output_dir, exist_ok=True)
    config.save_pretrained(output_dir)
    save_file(
        {key: tokens.float().contiguous()}, os.path.join(output_dir, "adapter_model.safetensors"), {"format": "pt"}
    )
    return config


def _release_file(source: str) -> str:
    """The tensor file: ``source`` itself, or the one release file in the folder ``source``."""
    if not os.path.isdir(source):
        return source
    found = sorted(name for name in os.listdir(source) if name.endswith(RELEASE_SUFFIX))
    if len(found) != 1:
        raise ValueError(
            f"{source} holds {len(found)} SPRING release files "
            f"({', '.join(found) or f'none named *{RELEASE_SUFFIX}'}); give the file released for your base model."
        )
    return os.path.join(source, found[0])


def _is_release(path: str) -> bool:
    if os.path.isdir(path):
        return any(name.endswith(RELEASE_SUFFIX) for name in os.listdir(path))
    return path.endswith(RELEASE_SUFFIX)


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


FAMILY = PublishedFamily(
    name="spring",
    title="SPRING",
    method="spring",
    convert=convert_official_spring,
    detect=_is_release,
    hub_ids=("yutaozhu94/SPRING",),
    base_models=(
        "mistralai/Mistral-7B-Instruct-v0.1",
        "mistralai/Mistral-7B-v0.1",
        "meta-llama/Llama-2-7b-chat-hf",
        "meta-llama/Llama-2-7b-hf",
        "meta-llama/Llama-2-13b-chat-hf",
        "meta-llama/Llama-2-13b-hf",
    ),
    paper="Zhu et al. 2024, One Token Can Help! (arXiv:2405.19670)",
    license="mit",
    license_text="MIT (the release's repository, DaoD/SPRING); the base model's own licence applies to it",
    looks_for=f"a '<model>{RELEASE_SUFFIX}' tensor file, or a folder holding one",
)


def main(argv: Optional[list[str]] = None) -> None:

    from ..convert import main as convert_main  # the CLI module, imported only when run

    convert_main([*(sys.argv[1:] if argv is None else argv), "--family", "spring"])


if __name__ == "__main__":
    main()
