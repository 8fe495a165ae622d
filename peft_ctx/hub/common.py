"""What the Hub modules share: file names, tags, the card-conflict error, repository ids, config flattening and
redaction."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from peft.utils import get_peft_model_state_dict

from ..config import ContextConfig

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


CARD_NAME = "README.md"
TRAINING_CONFIG_NAME = "training_config.json"
EVAL_RESULTS_NAME = "eval_results.json"
TAGS = ("peft", "peft_ctx", "rag", "context-compression")
SETTINGS = ("no_retrieval", "text_rag", "adapter")
# The config field that names the retriever / encoder of methods whose documents reach the model through one.
_ENCODER_FIELD = "retriever_name_or_path"
_HASH_PLACEHOLDER = "0" * 64
_HASH_RE = re.compile(r"(card_sha256: ['\"]?)([0-9a-f]{64})(['\"]?)")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUB_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
# Keys a card's training table shows when the recorded configuration has them (the full config goes to a json file).
_CARD_TRAINING_KEYS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "optim",
    "weight_decay",
    "a_nll",
    "a_kl",
    "kl_temperature",
    "seed",
    "bf16",
    "global_step",
    "train_loss",
)
_SECRET_KEY_RE = re.compile(r"(token|secret|password|passwd|api_?key|access_?key|credential)s?$", re.I)
_TOKENIZER_TOKEN_KEYS = {"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token"}


class CardConflictError(ValueError):
    """The Hub holds a card that peft_ctx did not write, or one edited since; pushing would overwrite it."""


# ---- helpers --------------------------------------------------------------------------------------------------------


def _template_dir(template_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    candidates = [Path(template_dir)] if template_dir is not None else []
    if os.environ.get("PEFT_CTX_CARD_TEMPLATES"):
        candidates.append(Path(os.environ["PEFT_CTX_CARD_TEMPLATES"]))
    package = Path(__file__).resolve().parent.parent  # peft_ctx/
    candidates += [package / "hub_cards", package.parent / "hub_cards"]  # installed; a source checkout
    for candidate in candidates:
        if (candidate / "_base.md.j2").is_file():
            return candidate
    raise FileNotFoundError(
        f"No model-card templates found (looked in {', '.join(str(c) for c in candidates)}); pass "
        "template_dir='path/to/hub_cards' or set PEFT_CTX_CARD_TEMPLATES."
    )


def _check_repo_id(repo_id: Any) -> None:
    if not isinstance(repo_id, str) or not _REPO_ID_RE.match(repo_id):
        raise ValueError(
            f"repo_id={repo_id!r} is not a Hub repository id; use 'namespace/name', e.g. 'org/xrag-smollm2'."
        )


def _hub_id(name: Optional[str]) -> Optional[str]:
    """``name`` if it reads as a Hub repository id (not a local path), else None."""
    if not name or not isinstance(name, str) or os.path.isabs(name) or os.path.exists(name):
        return None
    return name if _HUB_ID_RE.match(name) else None


def _adapter_name(model, adapter_name: Optional[str]) -> str:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping) or not hasattr(model, "save_pretrained"):
        raise ValueError(
            f"push_to_hub takes a PeftModel with a peft_ctx adapter, got {type(model).__name__}; build it with "
            "peft.get_peft_model(base, peft_ctx.XRAGConfig(...)) or PeftModel.from_pretrained(base, ...)."
        )
    if adapter_name is None:
        adapter_name = getattr(model, "active_adapter", None)
    if adapter_name not in configs:
        raise ValueError(f"adapter_name={adapter_name!r} is not on the model; its adapters: {sorted(configs)}.")
    if not isinstance(configs[adapter_name], ContextConfig):
        raise ValueError(
            f"Adapter {adapter_name!r} is a {type(configs[adapter_name]).__name__}, not a peft_ctx adapter; use "
            "PEFT's own model.push_to_hub for it."
        )
    return adapter_name


def parameter_counts(model, adapter_name: str) -> tuple[int, int]:
    """(parameters the adapter file holds, parameters of the base model without any adapter)."""
    adapter = sum(t.numel() for t in get_peft_model_state_dict(model, adapter_name=adapter_name).values())
    # Base weights are never named after an adapter (PEFT keeps them as ``...base_layer.weight``).
    markers = tuple(f".{name}." for name in model.peft_config)
    base = sum(p.numel() for n, p in model.named_parameters() if not any(m in n for m in markers))
    return adapter, base


def _plain(value: Any) -> Any:
    """JSON-ready copy of a config object (TrainingArguments, dataclasses, mappings ...)."""
    if hasattr(value, "to_dict") and callable(value.to_dict) and not isinstance(value, type):
        value = value.to_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "value") and isinstance(value.value, (str, int)):  # enums
        return value.value
    return str(value)


def redact(value: Any) -> Any:
    """Replace the values of secret-looking keys (``hub_token``, ``api_key`` ...) by ``"<redacted>"``."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            secret = _SECRET_KEY_RE.search(str(key)) and str(key) not in _TOKENIZER_TOKEN_KEYS
            out[key] = "<redacted>" if secret and isinstance(item, str) and item else redact(item)
        return out
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(value, Mapping):
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = value
    return out


def _training_rows(training_config: Optional[dict]) -> list[tuple[str, str]]:
    if not training_config:
        return []
    flat = _flatten(training_config)
    by_leaf: dict[str, Any] = {}
    for key, value in flat.items():
        by_leaf.setdefault(key.rsplit(".", 1)[-1], value)
    rows = []
    for key in _CARD_TRAINING_KEYS:
        value = by_leaf.get(key)
        if value is None or (key == "max_steps" and value == -1) or (key == "warmup_steps" and value == 0):
            continue
        rows.append((key, f"{value:.4g}" if isinstance(value, float) else str(value)))
    return rows
