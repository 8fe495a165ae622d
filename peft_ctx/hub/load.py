"""``load``: an adapter with its base model, tokenizer and retriever, from the Hub or a folder."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Optional

from huggingface_hub import HfApi, constants
from huggingface_hub.utils import (
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from .. import local_copies
from ..config import ContextConfig
from ..encoders import Encoder
from ..methods import get_method

if TYPE_CHECKING:
    pass

from .common import _ENCODER_FIELD, _check_repo_id

logger = logging.getLogger(__name__)


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
