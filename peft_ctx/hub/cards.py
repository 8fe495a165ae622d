"""Model cards: rendered from ``hub_cards/<method>.md.j2``, stamped with the SHA-256 of their own text."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import jinja2
from huggingface_hub import ModelCard, ModelCardData

from ..config import ContextConfig
from ..methods import get_method
from ..version import __version__

if TYPE_CHECKING:
    pass

from .common import (
    _ENCODER_FIELD,
    _HASH_PLACEHOLDER,
    _HASH_RE,
    TAGS,
    _adapter_name,
    _check_repo_id,
    _hub_id,
    _plain,
    _template_dir,
    _training_rows,
    parameter_counts,
    redact,
)
from .results import _check_eval_results, _evaluation, _model_index

logger = logging.getLogger(__name__)


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
