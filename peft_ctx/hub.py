"""Publish peft_ctx adapters to the Hugging Face Hub with a real model card, and load them back in one call.

``push_to_hub`` uploads the adapter, its card (rendered from ``hub_cards/<method>.md.j2``) and the training
configuration in ONE commit. PEFT's, transformers' and trl's own push paths each write their own README over the card
(see the project notes), so this module is the one path that writes ours; and a card someone edited on the Hub is never
replaced without ``overwrite_card=True``: every card we push carries the SHA-256 of its own text in its metadata
(``peft_ctx.card_sha256``), so a remote README that no longer matches its stamp, or has none, was written by someone
else. The commit names the revision it checked as its parent, so an edit made in between makes the Hub refuse it.

The token comes from the usual huggingface_hub places (``token=``, ``HF_TOKEN``, ``hf auth login``); it is never
printed, logged or written: every uploaded file is checked for it before the commit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import jinja2
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants, get_token
from huggingface_hub.utils import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft import PeftConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import local_copies
from .config import ContextConfig
from .encoders import Encoder
from .methods import get_method
from .version import __version__

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

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
    here = Path(__file__).resolve().parent
    candidates += [here / "hub_cards", here.parent / "hub_cards"]
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


# ---- evaluation results ---------------------------------------------------------------------------------------------


def _check_eval_results(eval_results: Any) -> list[dict]:
    """Validate the evaluation records: a list of dicts, one per (dataset, setting).

    Each record: ``dataset`` (display name), ``setting`` (one of ``no_retrieval``, ``text_rag``, ``adapter``),
    ``metric`` (e.g. "accuracy"), ``score`` (a number); optional ``prompt_tokens`` (mean per example), ``seconds``
    (mean wall time per example), ``dataset_id`` (Hub dataset id, for the model-index), ``split``, ``n``, ``task``.
    """
    if eval_results is None:
        return []
    if isinstance(eval_results, Mapping) or not isinstance(eval_results, (list, tuple)):
        raise ValueError(
            "eval_results must be a list of records like {'dataset': 'NQ', 'setting': 'adapter', 'metric': "
            f"'accuracy', 'score': 0.41, 'prompt_tokens': 52.0, 'seconds': 0.08}}, got {type(eval_results).__name__}."
        )
    records = []
    for i, record in enumerate(eval_results):
        if not isinstance(record, Mapping):
            raise ValueError(f"eval_results[{i}] must be a dict, got {type(record).__name__}.")
        for key in ("dataset", "setting", "metric", "score"):
            if key not in record:
                raise ValueError(
                    f"eval_results[{i}] has no {key!r}; each record needs dataset, setting, metric, score."
                )
        if record["setting"] not in SETTINGS:
            raise ValueError(f"eval_results[{i}]['setting']={record['setting']!r}; use one of {', '.join(SETTINGS)}.")
        for key in ("score", "prompt_tokens", "seconds"):
            value = record.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"eval_results[{i}][{key!r}]={value!r} must be a number.")
        records.append(dict(record))
    return records


def _evaluation(records: list[dict], method_title: str) -> tuple[list[dict], Optional[dict]]:
    """Table groups for the card and the measured context compression (when all three settings report tokens)."""
    groups: dict[tuple, dict] = {}
    for record in records:
        key = (record["dataset"], record.get("split"), record["metric"])
        group = groups.setdefault(
            key,
            {
                "dataset": record["dataset"],
                "split": record.get("split"),
                "metric": record["metric"],
                "n": None,
                "by": {},
            },
        )
        group["n"] = group["n"] or record.get("n")
        group["by"][record["setting"]] = record
    labels = {"no_retrieval": "No retrieval", "text_rag": "Text RAG (documents as text)", "adapter": f"{method_title}"}
    out, measured = [], None
    for group in groups.values():
        by = group.pop("by")
        text = by.get("text_rag", {})
        rows = []
        for setting in SETTINGS:
            if setting not in by:
                continue
            row = by[setting]
            speedup = "-"
            if setting != "text_rag" and text.get("seconds") and row.get("seconds"):
                speedup = f"{text['seconds'] / row['seconds']:.2f}x"
            elif setting == "text_rag" and row.get("seconds"):
                speedup = "1.00x"
            tokens = row.get("prompt_tokens")
            rows.append(
                {
                    "label": labels[setting] + (" (this adapter)" if setting == "adapter" else ""),
                    "score_text": f"{row['score']:.4g}",
                    "prompt_tokens_text": f"{tokens:.1f}" if tokens is not None else "-",
                    "speedup_text": speedup,
                }
            )
        group["rows"] = rows
        out.append(group)
        none, adapter = by.get("no_retrieval", {}), by.get("adapter", {})
        if measured is None and all(r.get("prompt_tokens") is not None for r in (none, text, adapter)):
            text_tokens = text["prompt_tokens"] - none["prompt_tokens"]
            adapter_tokens = adapter["prompt_tokens"] - none["prompt_tokens"]
            if text_tokens > 0 and adapter_tokens > 0:
                measured = {
                    "text_tokens": text_tokens,
                    "adapter_tokens": adapter_tokens,
                    "ratio": text_tokens / adapter_tokens,
                }
    return out, measured


def _model_index(records: list[dict]) -> list[EvalResult]:
    results = []
    for record in records:
        if record["setting"] != "adapter":
            continue
        results.append(
            EvalResult(
                task_type=record.get("task", "question-answering"),
                dataset_type=record.get("dataset_id") or re.sub(r"[^A-Za-z0-9._-]+", "-", record["dataset"]).lower(),
                dataset_name=record["dataset"],
                dataset_split=record.get("split"),
                metric_type=record["metric"],
                metric_value=record["score"],
                metric_name=record["metric"],
            )
        )
    return results


# ---- the card -------------------------------------------------------------------------------------------------------


def card_sha256(text: str) -> str:
    """The hash a card carries of itself: SHA-256 of its text with the hash value set to zeros."""
    return hashlib.sha256(_HASH_RE.sub(rf"\g<1>{_HASH_PLACEHOLDER}\g<3>", text, count=1).encode()).hexdigest()


def _stamp(text: str) -> str:
    if len(_HASH_RE.findall(text)) != 1:
        raise ValueError("The card must hold exactly one 'card_sha256:' line (peft_ctx writes it into the metadata).")
    return _HASH_RE.sub(rf"\g<1>{card_sha256(text)}\g<3>", text, count=1)


def card_is_unedited(text: str) -> bool:
    """True when ``text`` is a card peft_ctx pushed and nobody changed since (its stamp matches its content)."""
    found = _HASH_RE.findall(text)
    return len(found) == 1 and found[0][1] == card_sha256(text)


def _metadata_defaults(
    config: ContextConfig, base_model: Optional[str], datasets: Optional[list[str]], license: Optional[str]
) -> dict[str, Any]:
    """The card metadata peft_ctx fills in, for its own card and for a user's card that lacks it."""
    metadata: dict[str, Any] = {
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": list(dict.fromkeys([*TAGS, config.method])),
    }
    if base_model:
        metadata.update(base_model=base_model, base_model_relation="adapter")
    if datasets:
        metadata["datasets"] = list(datasets)
    if license:
        metadata["license"] = license
    return metadata


def make_card(
    model,
    repo_id: str,
    *,
    config: Optional[ContextConfig] = None,
    trainable_parameters: Optional[int] = None,
    provenance: Optional[dict[str, Any]] = None,
    adapter_name: Optional[str] = None,
    base_model: Optional[str] = None,
    retriever: Optional[str] = None,
    datasets: Optional[list[str]] = None,
    license: Optional[str] = None,
    training_config: Optional[Any] = None,
    eval_results: Optional[list[dict]] = None,
    revision: Optional[str] = None,
    tokenizer_in_repo: bool = False,
    template_dir: Optional[Union[str, os.PathLike]] = None,
) -> ModelCard:
    """Render the adapter's model card from ``hub_cards/<method>.md.j2`` (also what ``push_to_hub`` does).

    Edit the result and pass it back as ``push_to_hub(..., card=card)`` to publish a changed card. Without a model
    (``model=None``) the card is rendered from ``config`` and ``trainable_parameters`` alone, as
    ``peft_ctx.convert`` does for a converted checkpoint; ``provenance`` (source, revision, licence, paper, command)
    then says where the weights came from.
    """
    _check_repo_id(repo_id)
    if model is None:
        if config is None or trainable_parameters is None:
            raise ValueError("make_card(model=None, ...) needs the adapter's config= and trainable_parameters=.")
        trainable, base_params = int(trainable_parameters), 0
    else:
        name = _adapter_name(model, adapter_name)
        config = model.peft_config[name]
        trainable, base_params = parameter_counts(model, name)
    base_model = _hub_id(base_model or config.base_model_name_or_path)
    retriever = _hub_id(retriever or getattr(config, _ENCODER_FIELD, None))
    records = _check_eval_results(eval_results)
    training = redact(_plain(training_config)) if training_config is not None else None
    method = get_method(config.method)
    method_title = method.title or method.name
    evaluation, measured = _evaluation(records, method_title)
    metadata = _metadata_defaults(config, base_model, datasets, license)
    metadata["peft_ctx"] = {"method": config.method, "version": __version__, "card_sha256": _HASH_PLACEHOLDER}
    model_index = _model_index(records)
    if model_index:
        metadata.update(model_name=repo_id.split("/")[-1], eval_results=model_index)
    card_data = ModelCardData(**metadata)

    directory = _template_dir(template_dir)
    # A method without a template of its own gets the shared layout with its title.
    template = Path(method.card_template or "_base.md.j2")
    # A method outside peft_ctx keeps its template next to its code (an absolute path); it still extends _base.md.j2.
    # Its own folder first, so that a template named like one of ours is still its own.
    search = ([str(template.parent)] if template.is_absolute() else []) + [str(directory)]
    template_name = template.name
    if not any((Path(folder) / template_name).is_file() for folder in search):
        raise ValueError(
            f"No card template for method {config.method!r}: set {type(method).__name__}.card_template to a file in "
            f"{directory} or an absolute path (extend _base.md.j2)."
        )
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(search),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["md"] = lambda value: str(value).replace("|", "\\|").replace("\n", " ")
    config_dict = _plain(config.to_dict())
    text = env.get_template(template_name).render(
        card_data=card_data.to_yaml(),
        repo_id=repo_id,
        model_name=repo_id.split("/")[-1],
        revision=revision,
        method=config.method,
        method_title=method_title,
        config=config_dict,
        prompt_template=config.prompt_template,
        base_model=base_model,
        base_model_link=f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "its base model",
        retriever=retriever,
        needs_encoder=method.uses_encoder or getattr(config, _ENCODER_FIELD, None) is not None,
        tokenizer_source=repo_id if tokenizer_in_repo else (base_model or "<base model id>"),
        trainable_parameters=trainable,
        base_parameters=base_params,
        training=_training_rows(training),
        has_training_config_file=training is not None,
        datasets=list(datasets or []),
        evaluation=evaluation,
        measured_compression=measured,
        peft_ctx_version=__version__,
        provenance=provenance,
    )
    text = re.sub(r"\n{3,}", "\n\n", text)
    return ModelCard(text)


def _user_card(card: Union[ModelCard, str], metadata_defaults: dict[str, Any]) -> str:
    """A user-given card (ModelCard, file path or text), with our stamp and the metadata it lacks filled in."""
    if isinstance(card, str):
        card = ModelCard.load(card) if os.path.isfile(card) else ModelCard(card)
    elif not isinstance(card, ModelCard):
        raise ValueError(
            f"card must be None, False, a ModelCard, a file path or card text; got {type(card).__name__}."
        )
    data = card.data.to_dict()
    for key, value in metadata_defaults.items():
        if key == "tags":
            data["tags"] = list(dict.fromkeys([*(data.get("tags") or []), *value]))
        elif data.get(key) is None:
            data[key] = value
    peft_ctx_meta = dict(data.get("peft_ctx") or {})
    peft_ctx_meta["card_sha256"] = _HASH_PLACEHOLDER
    data["peft_ctx"] = peft_ctx_meta
    body = card.text if card.text.startswith("\n") else "\n" + card.text
    return f"---\n{ModelCardData(**data).to_yaml()}\n---{body}"


# ---- push -----------------------------------------------------------------------------------------------------------


def _save_adapter(
    model, adapter_name: str, directory: str, base_model: Optional[str], retriever: Optional[str]
) -> str:
    model.save_pretrained(directory, selected_adapters=[adapter_name])
    folder = directory if adapter_name == "default" else os.path.join(directory, adapter_name)
    # PEFT writes its own README.md (its card); ours, or none with card=False, replaces it.
    readme = os.path.join(folder, CARD_NAME)
    if os.path.exists(readme):
        os.remove(readme)
    config_path = os.path.join(folder, "adapter_config.json")
    with open(config_path) as f:
        saved = json.load(f)
    if base_model:
        saved["base_model_name_or_path"] = base_model
    if retriever and _ENCODER_FIELD in saved:
        saved[_ENCODER_FIELD] = retriever
    with open(config_path, "w") as f:
        json.dump(saved, f, indent=2, sort_keys=True)
    return folder


def _remote_text(api: HfApi, repo_id: str, filename: str, revision: str, cache_dir: str) -> Optional[str]:
    try:
        path = api.hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)
    except (EntryNotFoundError, RevisionNotFoundError):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _refuse_secrets(folder: str, secret: Optional[str]) -> None:
    if not secret:
        return
    needle = secret.encode()
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                if needle in f.read():
                    relative = os.path.relpath(os.path.join(root, name), folder)
                    raise ValueError(
                        f"Refusing to push: {relative} contains your Hugging Face token. Remove it from what you "
                        "passed (training_config, card ...) and push again."
                    )


def push_to_hub(
    model,
    repo_id: str,
    card: Union[None, bool, ModelCard, str] = None,
    private: bool = False,
    revision: Optional[str] = None,
    overwrite_card: bool = False,
    training_config: Optional[Any] = None,
    eval_results: Optional[list[dict]] = None,
    *,
    datasets: Optional[list[str]] = None,
    license: Optional[str] = None,
    base_model: Optional[str] = None,
    retriever: Optional[str] = None,
    tokenizer=None,
    adapter_name: Optional[str] = None,
    commit_message: Optional[str] = None,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
    template_dir: Optional[Union[str, os.PathLike]] = None,
) -> CommitInfo:
    """Upload a peft_ctx adapter, its model card and its training configuration to the Hub in one commit.

    Args:
        model: a ``PeftModel`` holding a peft_ctx adapter (the active one, or ``adapter_name``).
        repo_id: ``"namespace/name"``; created if missing (``private`` applies then).
        card: None renders ``hub_cards/<method>.md.j2``; a ``ModelCard``, a file path or card text is published as
            given (missing metadata filled in); False leaves the repository's README.md as it is.
        revision: branch to push to (created from main if missing); default main.
        overwrite_card: replace a README.md on the Hub that peft_ctx did not write or that was edited since.
        training_config: what the adapter was trained with (TrainingArguments, dataclasses, dicts, or a dict of them);
            saved as ``training_config.json`` with secrets redacted, key settings shown in the card.
        eval_results: evaluation records (see ``_check_eval_results``); the card's table and model-index.
        datasets / license: card metadata. base_model / retriever: Hub ids recorded in the card and the uploaded
            adapter_config.json (default: the config's, when they are Hub ids rather than local folders).
        tokenizer: also upload the tokenizer (for a tokenizer changed in training, e.g. a chat template).
        token / endpoint: override the usual huggingface_hub settings (HF_TOKEN / login, HF_ENDPOINT).

    Returns the ``CommitInfo`` of the commit (``.oid``, ``.commit_url``).
    """
    _check_repo_id(repo_id)
    name = _adapter_name(model, adapter_name)
    config = model.peft_config[name]
    if constants.is_offline_mode():
        raise RuntimeError("HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push to the Hub.")
    secret = token if isinstance(token, str) else get_token()
    if not secret:
        raise ValueError(
            "No Hugging Face token found: log in with `hf auth login`, set the HF_TOKEN environment variable, or "
            "pass token=... (a token with write access to the repository's namespace)."
        )
    if revision is not None and (not isinstance(revision, str) or not revision or revision.startswith("refs/")):
        raise ValueError(f"revision={revision!r}: give a branch name such as 'main' or 'v2'.")
    branch = revision or "main"
    base_id = _hub_id(base_model or config.base_model_name_or_path)
    if base_model and not base_id:
        raise ValueError(f"base_model={base_model!r} is not a Hub id; give the base model's 'org/name' on the Hub.")
    if not base_id:
        logger.warning(
            "The adapter's base model %r is not a Hub id, so the card cannot name it and peft_ctx.load will need "
            "base_model=...; pass base_model='org/name' to record it.",
            config.base_model_name_or_path,
        )
    retriever_id = _hub_id(retriever or getattr(config, _ENCODER_FIELD, None))
    records = _check_eval_results(eval_results)
    api = HfApi(endpoint=endpoint, token=token)

    with tempfile.TemporaryDirectory(prefix="peft_ctx_push_") as tmp:
        folder = _save_adapter(model, name, os.path.join(tmp, "upload"), base_id, retriever_id)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if training_config is not None:
            with open(os.path.join(folder, TRAINING_CONFIG_NAME), "w") as f:
                json.dump(redact(_plain(training_config)), f, indent=2, sort_keys=True)
        if records:
            with open(os.path.join(folder, EVAL_RESULTS_NAME), "w") as f:
                json.dump(records, f, indent=2)

        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        parent = api.repo_info(repo_id, revision=branch).sha
        if card is not False:
            if card is None:
                text = str(
                    make_card(
                        model,
                        repo_id,
                        adapter_name=name,
                        base_model=base_id,
                        retriever=retriever_id,
                        datasets=datasets,
                        license=license,
                        training_config=training_config,
                        eval_results=records,
                        revision=branch,
                        tokenizer_in_repo=tokenizer is not None,
                        template_dir=template_dir,
                    )
                )
            else:
                text = _user_card(card, _metadata_defaults(config, base_id, datasets, license))
            text = _stamp(text)
            remote = _remote_text(api, repo_id, CARD_NAME, parent, os.path.join(tmp, "cache"))
            if remote is not None and remote != text and not card_is_unedited(remote) and not overwrite_card:
                raise CardConflictError(
                    f"The README.md of {repo_id!r} (revision {branch!r}) was not written by peft_ctx.push_to_hub or "
                    "was edited since; refusing to overwrite it. Pass card=False to keep it and push only the "
                    "adapter, or overwrite_card=True to replace it (with card=huggingface_hub.ModelCard.load("
                    f"{repo_id!r}) to publish the Hub's text, edited further if you like)."
                )
            with open(os.path.join(folder, CARD_NAME), "w", encoding="utf-8") as f:
                f.write(text)
        _refuse_secrets(folder, secret)
        title = get_method(config.method).title or config.method
        message = commit_message or f"Upload {title} adapter (peft_ctx)"
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=branch,
            commit_message=message,
            parent_commit=parent,
        )
    logger.info("Pushed the %s adapter %r to %s (commit %s).", config.method, name, repo_id, info.oid)
    return info


# ---- training scripts -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HubSettings:
    """Where a training script pushes at the end (``--push_to_hub --hub_model_id org/name``)."""

    repo_id: str
    private: bool = False
    revision: Optional[str] = None
    token: Optional[str] = dataclasses.field(default=None, repr=False)
    overwrite_card: bool = False


def take_push_settings(args) -> Optional[HubSettings]:
    """Read ``push_to_hub``, ``hub_model_id``, ``hub_private_repo``, ``hub_revision``, ``hub_token`` from training
    arguments, and switch the Trainer's own pushing off (it would upload PEFT's / trl's card over ours at every save).

    Call it before building the Trainer; returns None when ``--push_to_hub`` is not set.
    """
    if not getattr(args, "push_to_hub", False):
        return None
    repo_id = getattr(args, "hub_model_id", None)
    if not repo_id:
        raise ValueError("--push_to_hub needs --hub_model_id namespace/name (the repository to push the adapter to).")
    _check_repo_id(repo_id)
    settings = HubSettings(
        repo_id=repo_id,
        private=bool(getattr(args, "hub_private_repo", False)),
        revision=getattr(args, "hub_revision", None),
        token=getattr(args, "hub_token", None),
    )
    args.push_to_hub = False
    return settings


def push_after_training(
    trainer_or_model,
    settings_or_args,
    *,
    training_config: Optional[Any] = None,
    eval_results: Optional[list[dict]] = None,
    tokenizer=None,
    **push_kwargs,
) -> Optional[CommitInfo]:
    """The end of a training script: push the trained adapter with its card, when ``--push_to_hub`` was given.

    ``settings_or_args``: what ``take_push_settings(training_args)`` returned (call it before building the Trainer),
    or the training arguments themselves. With a Trainer, its arguments, final step and training loss are recorded
    with ``training_config`` (e.g. ``{"script": script_args}``). Returns the CommitInfo, or None when not pushing.
    """
    settings = settings_or_args
    if settings is not None and not isinstance(settings, HubSettings):
        settings = take_push_settings(settings)
    if settings is None:
        return None
    model, recorded = trainer_or_model, {}
    if hasattr(trainer_or_model, "args") and hasattr(trainer_or_model, "model"):
        trainer = trainer_or_model
        accelerator = getattr(trainer, "accelerator", None)
        model = accelerator.unwrap_model(trainer.model) if accelerator is not None else trainer.model
        recorded["training_arguments"] = trainer.args
        state = getattr(trainer, "state", None)
        if state is not None:
            recorded["global_step"] = state.global_step
            losses = [entry["train_loss"] for entry in state.log_history if "train_loss" in entry]
            if losses:
                recorded["train_loss"] = losses[-1]
        if tokenizer is None:
            tokenizer = getattr(trainer, "processing_class", None)
    if training_config is not None:
        recorded.update(_plain(training_config) if not isinstance(training_config, Mapping) else training_config)
    push_kwargs.setdefault("overwrite_card", settings.overwrite_card)
    return push_to_hub(
        model,
        settings.repo_id,
        private=settings.private,
        revision=settings.revision,
        token=settings.token,
        training_config=recorded or None,
        eval_results=eval_results,
        tokenizer=tokenizer,
        **push_kwargs,
    )


# ---- load -----------------------------------------------------------------------------------------------------------


def _hub_error(exc: Exception, repo_id: str, revision: Optional[str]) -> ValueError:
    endpoint = constants.ENDPOINT
    if isinstance(exc, RevisionNotFoundError):
        return ValueError(
            f"Revision {revision!r} does not exist in {repo_id!r} on {endpoint}; check the branch or commit."
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ValueError(
            f"Repository {repo_id!r} was not found on {endpoint} (or it is private and no valid token was given): "
            "check the id, or log in with `hf auth login` / set HF_TOKEN."
        )
    return ValueError(f"Could not read {repo_id!r} from {endpoint}: {exc}")


def load(
    repo_id: str,
    revision: Optional[str] = None,
    *,
    base_model=None,
    encoder=None,
    tokenizer=None,
    adapter_name: str = "default",
    is_trainable: bool = False,
    dtype=None,
    device: Optional[str] = None,
    token: Optional[str] = None,
    **model_kwargs,
):
    """Load a peft_ctx adapter with everything it needs: returns ``(model, tokenizer, encoder)``.

    ``repo_id`` is a Hub id (or a local adapter folder). The base model and the retriever / encoder are the ones the
    adapter's config (and card) name: ``base_model_name_or_path`` and ``retriever_name_or_path``; pass ``base_model``
    (an id, a folder or a loaded model) or ``encoder`` (an id, a folder, a ``peft_ctx.Encoder``, or False for none) to
    use others. The tokenizer comes from the adapter repository when it holds one, else from the base model.
    ``encoder`` is None for methods that need none (SPRING) or when the config names no retriever.
    """
    hub_kwargs: dict[str, Any] = {"token": token} if token is not None else {}
    local = os.path.isdir(repo_id)
    if local:
        files = set(os.listdir(repo_id))
        source, pinned = repo_id, None
    else:
        _check_repo_id(repo_id)
        try:
            # an explicit revision: mirrors such as olah serve repository info only per revision
            info = HfApi(token=token).model_info(repo_id, revision=revision or "main")
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise _hub_error(exc, repo_id, revision) from exc
        files = {sibling.rfilename for sibling in info.siblings or []}
        source, pinned = repo_id, info.sha  # every file from the same commit
    for required in ("adapter_config.json", "adapter_model.safetensors"):
        if required not in files:
            where = repo_id if local else f"{repo_id!r} at revision {revision or 'main'!r}"
            raise ValueError(
                f"{required} is not in {where} (files: {sorted(files)}); it holds no PEFT adapter. Push one with "
                "peft_ctx.push_to_hub(model, repo_id)."
            )
    revision_kwargs = {"revision": pinned} if pinned else {}
    config = PeftConfig.from_pretrained(source, **revision_kwargs, **hub_kwargs)
    if not isinstance(config, ContextConfig):
        raise ValueError(
            f"{repo_id!r} holds a {type(config).__name__} adapter, not a peft_ctx one; load it with "
            "peft.PeftModel.from_pretrained."
        )

    if base_model is None or isinstance(base_model, (str, os.PathLike)):
        base_name = str(base_model) if base_model is not None else config.base_model_name_or_path
        if not base_name:
            raise ValueError(f"The adapter config of {repo_id!r} names no base model; pass base_model='org/name'.")
        try:
            # The config's Hub id stays as it is; a listed local copy of it is read instead of the Hub.
            base_name = local_copies.resolve(base_name)
            base = AutoModelForCausalLM.from_pretrained(base_name, dtype=dtype, **hub_kwargs, **model_kwargs)
        except (OSError, HfHubHTTPError, ValueError) as exc:
            raise ValueError(
                f"Could not load the base model {base_name!r}"
                f"{' named in the adapter config of ' + repr(repo_id) if base_model is None else ''}: {exc}. Pass "
                "base_model=... to use another copy (a Hub id, a folder or a loaded model)."
            ) from exc
    else:
        base, base_name = base_model, getattr(getattr(base_model, "config", None), "name_or_path", None)
    if device is not None:
        base.to(device)
    model = PeftModel.from_pretrained(
        base, source, adapter_name=adapter_name, is_trainable=is_trainable, **revision_kwargs, **hub_kwargs
    )
    model.eval()

    if tokenizer is None:
        if "tokenizer_config.json" in files:
            tokenizer = AutoTokenizer.from_pretrained(source, **revision_kwargs, **hub_kwargs)
        elif base_name:
            tokenizer = AutoTokenizer.from_pretrained(base_name, **hub_kwargs)
        else:
            raise ValueError(f"Neither {repo_id!r} nor the base model names a tokenizer; pass tokenizer=...")
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), **hub_kwargs)

    if encoder is None:
        encoder_name = getattr(config, _ENCODER_FIELD, None)
        if encoder_name:
            encoder = Encoder(
                encoder_name,
                pooling=getattr(config, "retriever_pooling", None),
                normalize=getattr(config, "retriever_normalize", None),
                device=device,
                **hub_kwargs,
            )
        elif get_method(config.method).uses_encoder:
            logger.warning(
                "The adapter config of %r names no retriever; pass encoder=... to peft_ctx.load, or give documents as "
                "precomputed vectors.",
                repo_id,
            )
    elif encoder is False:
        encoder = None
    elif isinstance(encoder, (str, os.PathLike)):
        encoder = Encoder(
            str(encoder),
            pooling=getattr(config, "retriever_pooling", None),
            normalize=getattr(config, "retriever_normalize", None),
            device=device,
            **hub_kwargs,
        )
    if encoder is not None and hasattr(encoder, "check_compatible"):
        encoder.check_compatible(config)
    return model, tokenizer, encoder
