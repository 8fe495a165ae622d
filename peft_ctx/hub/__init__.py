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

from .cards import card_is_unedited, card_sha256, make_card
from .common import (
    CARD_NAME,
    EVAL_RESULTS_NAME,
    SETTINGS,
    TAGS,
    TRAINING_CONFIG_NAME,
    CardConflictError,
    parameter_counts,
    redact,
)
from .load import load
from .push import HubSettings, push_after_training, push_to_hub, take_push_settings

__all__ = [
    "CARD_NAME",
    "EVAL_RESULTS_NAME",
    "SETTINGS",
    "TAGS",
    "TRAINING_CONFIG_NAME",
    "CardConflictError",
    "HubSettings",
    "card_is_unedited",
    "card_sha256",
    "load",
    "make_card",
    "parameter_counts",
    "push_after_training",
    "push_to_hub",
    "redact",
    "take_push_settings",
]
