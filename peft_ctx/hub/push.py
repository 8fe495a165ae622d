"""``push_to_hub``: adapter, card and training configuration in one commit; the training scripts' push."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional, Union

from huggingface_hub import HfApi, ModelCard, constants, get_token
from huggingface_hub.utils import (
    EntryNotFoundError,
    RevisionNotFoundError,
)

from ..methods import get_method

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

from .cards import _metadata_defaults, _stamp, _user_card, card_is_unedited, make_card
from .common import (
    _ENCODER_FIELD,
    CARD_NAME,
    EVAL_RESULTS_NAME,
    TRAINING_CONFIG_NAME,
    CardConflictError,
    _adapter_name,
    _check_repo_id,
    _hub_id,
    _plain,
    redact,
)
from .results import _check_eval_results

logger = logging.getLogger(__name__)


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
