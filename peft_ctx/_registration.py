"""The one place where peft_ctx plugs itself into PEFT.

PEFT resolves ``adapter_config.json["peft_type"]`` through mappings keyed by members of the closed enum
``peft.utils.peft_types.PeftType``; ``register_peft_method`` refuses names that are not members. All peft_ctx methods
share ONE peft type, ``PEFT_CTX``: PEFT refuses to put adapters of different types on one model
(``Cannot combine adapters with different peft types``), and users must be able to load an xRAG and a SPRING adapter
side by side and switch with ``set_adapter``. The concrete method is the config's ``method`` field.
"""

from __future__ import annotations

import enum

import peft
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import peft_types, register_peft_method

PEFT_TYPE_NAME = "PEFT_CTX"
PREFIX = "ctx_"

_SUPPORTED_HINT = (
    "peft_ctx was tested with peft>=0.21,<0.22; install a version in that range (pip install 'peft>=0.21,<0.22') "
    "or report the PEFT version you use."
)


def _extend_peft_type() -> enum.Enum:
    """Add the ``PEFT_CTX`` member to PEFT's ``PeftType`` enum (idempotent) and return it."""
    peft_type_enum = peft_types.PeftType
    if PEFT_TYPE_NAME in peft_type_enum.__members__:
        return peft_type_enum[PEFT_TYPE_NAME]
    try:
        from aenum import extend_enum  # inside the try: a failing import names the PEFT version too

        extend_enum(peft_type_enum, PEFT_TYPE_NAME, PEFT_TYPE_NAME)
        member = peft_type_enum[PEFT_TYPE_NAME]
    except Exception as exc:  # any change of PEFT's enum internals lands here
        raise RuntimeError(
            f"peft_ctx could not add its adapter type {PEFT_TYPE_NAME!r} to peft.utils.peft_types.PeftType "
            f"(peft {peft.__version__}): {exc}. {_SUPPORTED_HINT}"
        ) from exc
    # PeftType is a str enum: the member must compare and hash like the string PEFT writes to adapter_config.json.
    if member != PEFT_TYPE_NAME or member.value != PEFT_TYPE_NAME or hash(member) != hash(PEFT_TYPE_NAME):
        raise RuntimeError(
            f"peft_ctx added {PEFT_TYPE_NAME!r} to PeftType but the member does not behave like the string "
            f"{PEFT_TYPE_NAME!r} (peft {peft.__version__}). {_SUPPORTED_HINT}"
        )
    return member


PEFT_CTX = _extend_peft_type()


def register(config_cls: type, model_cls: type) -> None:
    """Register peft_ctx's config and tuner classes with PEFT (idempotent, so re-imports are harmless)."""

    if (
        PEFT_TYPE_TO_CONFIG_MAPPING.get(PEFT_CTX) is config_cls
        and PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_CTX) is model_cls
    ):
        return
    try:
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
    except (KeyError, ValueError, TypeError) as exc:
        raise RuntimeError(
            f"peft_ctx could not register its adapter type with PEFT {peft.__version__}: {exc}. {_SUPPORTED_HINT}"
        ) from exc
    for mapping, expected in (
        (PEFT_TYPE_TO_CONFIG_MAPPING, config_cls),
        (PEFT_TYPE_TO_TUNER_MAPPING, model_cls),
        (PEFT_TYPE_TO_PREFIX_MAPPING, PREFIX),
    ):
        if mapping.get(PEFT_TYPE_NAME) != expected:
            raise RuntimeError(
                f"PEFT {peft.__version__} registered peft_ctx but does not resolve the string {PEFT_TYPE_NAME!r} "
                f"read from adapter_config.json. {_SUPPORTED_HINT}"
            )
