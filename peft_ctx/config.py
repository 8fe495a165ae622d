"""The configuration every peft_ctx method shares.

All methods are one PEFT type (see ``_registration``); ``ContextConfig`` dispatches to the method's own config class
from the ``method`` field, so ``PeftConfig.from_pretrained`` and ``PeftModel.from_pretrained`` rebuild an
``XRAGConfig`` / ``SpringConfig`` / ``CocomConfig`` from ``adapter_config.json`` with no help from the user.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from packaging.version import Version
from peft import PeftConfig
from safetensors import safe_open

from ._registration import PEFT_CTX
from .methods import registered_methods
from .version import __version__

WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


def check_adapter_weights(folder: str) -> None:
    """Refuse a local adapter folder whose weights are missing, truncated, corrupted, or a pickle (never unpickled)."""

    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        pickled = [name for name in _PICKLE_NAMES if os.path.isfile(os.path.join(folder, name))]
        if pickled:
            raise ValueError(
                f"{os.path.join(folder, pickled[0])} is a pickle file; peft_ctx adapters are safetensors and a "
                "pickle is never unpickled here (it can run code). Re-save the adapter with save_pretrained "
                "(safetensors)."
            )
        raise ValueError(f"{folder} has no {WEIGHTS_NAME}; the adapter was not saved completely.")
    try:
        # safetensors checks the header and that the data covers the file exactly (truncation included).
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)
    except Exception as exc:
        raise ValueError(
            f"{path} is not a valid safetensors file ({exc}); it is truncated, corrupted or was not written by "
            "save_pretrained (a pickle renamed to .safetensors is refused, never unpickled). Re-save or re-download "
            "it."
        ) from exc


def is_int(value) -> bool:
    """An int that is not a bool (``True`` is an int to Python, never a count to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _config_classes() -> dict[str, type[ContextConfig]]:
    # One registry: a method's config class is the one its registered ContextMethod names.
    return {method.name: method.config_class for method in registered_methods()}


def _known_methods() -> str:
    return ", ".join(sorted(_config_classes())) or "(none registered)"


@dataclass
class ContextConfig(PeftConfig):
    """Fields shared by every peft_ctx method. Use a method's subclass (``XRAGConfig``, ``SpringConfig`` ...)."""

    method_name: ClassVar[str] = ""
    # The prompt fields each method's template must contain; "{context}" and "{question}" for all of them.
    template_fields: ClassVar[tuple[str, ...]] = ("context", "question")

    method: Optional[str] = field(
        default=None,
        metadata={"help": "The registered peft_ctx method's name (ContextMethod.name); set by the config class."},
    )
    prompt_template: Optional[str] = field(
        default=None,
        metadata={
            "help": "User-turn template with the fields {context} and {question} (and the method's own fields). "
            "None takes the method's default."
        },
    )
    system_prompt: Optional[str] = field(
        default=None, metadata={"help": "System message for chat templates; None keeps the template's default."}
    )
    use_chat_template: bool = field(
        default=True,
        metadata={"help": "Wrap prompts in the tokenizer's chat template when it has one."},
    )
    base_hidden_size: Optional[int] = field(
        default=None,
        metadata={"help": "Hidden size of the base model the adapter was made for; filled in when it is attached."},
    )
    base_vocab_size: Optional[int] = field(
        default=None,
        metadata={"help": "Vocabulary size of that base model; filled in when the adapter is attached."},
    )
    peft_ctx_version: Optional[str] = field(
        default=None, metadata={"help": "peft_ctx version that wrote this config; filled in automatically."}
    )

    def __new__(cls, *args, **kwargs):
        # PEFT builds configs as PEFT_TYPE_TO_CONFIG_MAPPING["PEFT_CTX"](**json): pick the method's class here.
        if cls is ContextConfig:
            method = kwargs.get("method")
            classes = _config_classes()
            if method not in classes:
                raise ValueError(
                    f"adapter_config.json names peft_ctx method {method!r}, which this peft_ctx ({__version__}) does "
                    f"not know; known methods: {_known_methods()}. Upgrade peft_ctx if the adapter is newer."
                )
            cls = classes[method]
        return super().__new__(cls)

    def __post_init__(self):
        if type(self) is ContextConfig:
            raise TypeError(f"Use a method's config class, one of: {_known_methods()}.")
        self.peft_type = PEFT_CTX
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"
        super().__post_init__()
        if self.task_type != "CAUSAL_LM":
            raise ValueError(
                f"task_type={self.task_type!r} is not supported: peft_ctx adapts causal LMs, use 'CAUSAL_LM'."
            )
        if self.method is None:
            self.method = self.method_name
        if self.method != self.method_name:
            raise ValueError(f"{type(self).__name__} has method={self.method_name!r}, got method={self.method!r}.")
        self._check_version()
        if self.prompt_template is None:
            self.prompt_template = self.default_prompt_template()
        self._check_template()

    def default_prompt_template(self) -> str:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        # PeftModel.from_pretrained reads the config before the weights: check a local adapter's weights file here
        # so that a broken or pickled file fails with a message naming it (PEFT would raise a bare parser error).
        path = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(path):
            check_adapter_weights(path)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    def _check_version(self) -> None:
        if self.peft_ctx_version is None:
            self.peft_ctx_version = __version__
            return
        try:
            saved = Version(self.peft_ctx_version)
        except Exception as exc:
            raise ValueError(f"peft_ctx_version={self.peft_ctx_version!r} is not a version number.") from exc
        ours = Version(__version__)
        if saved.release[:2] > ours.release[:2]:
            raise ValueError(
                f"This adapter was written by peft_ctx {self.peft_ctx_version}, newer than the installed "
                f"{__version__}; its format may have changed. Upgrade: "
                f"pip install -U 'peft-ctx>={saved.base_version}'."
            )

    def _check_template(self) -> None:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(self.prompt_template) if name is not None]
        except ValueError as exc:
            raise ValueError(f"prompt_template={self.prompt_template!r} is not a valid format string: {exc}") from exc
        unknown = sorted(set(fields) - set(self.template_fields))
        missing = [name for name in self.template_fields if name not in fields]
        repeated = sorted({name for name in fields if fields.count(name) > 1})
        if unknown or missing or repeated:
            raise ValueError(
                f"prompt_template={self.prompt_template!r} must contain each of "
                f"{', '.join('{' + f + '}' for f in self.template_fields)} exactly once and no other field "
                f"(unknown: {unknown}, missing: {missing}, repeated: {repeated}). Write literal braces as {{{{ }}}}."
            )
