"""What every engine shares: its timings and the checks that keep it serving the right adapter greedily."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from .export import SERVING_FILE, check_export

if TYPE_CHECKING:
    from ..inference import ServingPrompt


def cpu_flags() -> set[str]:
    """The instruction-set flags /proc/cpuinfo lists for this CPU (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def check_positive(**values) -> None:
    """Refuse an engine size that is not a positive integer, naming the setting."""
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; use a positive integer.")


def read_serving_info(serving_info: Optional[dict | str], folder: str) -> Optional[dict]:
    """An export's ``peft_ctx_serving.json`` as a dict: given (a dict or a path), else the one in ``folder`` if any."""
    if serving_info is None:
        beside = os.path.join(folder, SERVING_FILE)
        serving_info = beside if os.path.isfile(beside) else None
    if isinstance(serving_info, str):
        with open(serving_info) as f:
            serving_info = json.load(f)
    return serving_info


@dataclass
class EngineTimings:
    """Wall time of the last ``generate_prompts`` call: prefill (prompt in, first token out) and the decoding after."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    new_tokens: int = 0
    first_token_s: list[float] = field(default_factory=list)  # per sequence, from the call's start


class GreedyEngine:
    """The checks ``peft_ctx.generate`` runs before an engine decodes: greedy settings only, and the export of the
    active adapter (or, for the baselines, the base model). Subclasses set ``name``, ``model_path``, ``info`` (the
    export's ``peft_ctx_serving.json`` as a dict, or None), ``n_vocab``, and ``export_hint`` / ``base_hint`` (what
    the engine must load to serve an adapter / the baselines)."""

    name = "engine"
    model_path: str
    info: Optional[dict]
    n_vocab: Optional[int]
    export_hint = "the folder peft_ctx.export_for_serving wrote"
    base_hint = "the base model (peft_ctx.serving.export_base)"

    def generate_prompts(
        self,
        prompts: Sequence[ServingPrompt],
        max_new_tokens: int,
        eos_token_ids: Iterable[int] = (),
        min_new_tokens: int = 0,
    ) -> list[list[int]]:
        """Greedy decoding of each prompt: at most ``max_new_tokens``, stopping at an end token once
        ``min_new_tokens`` are out (end tokens are not returned); the new token ids of each prompt.

        Example::

            prompts = peft_ctx.serving.serving_prompts(model, tokenizer, ["Who wrote it?"], [["Ada Obi wrote it."]])
            new_ids = engine.generate_prompts(prompts, 30, eos_token_ids=[tokenizer.eos_token_id])
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}; generate at least one token.")
        return self._greedy(prompts, max_new_tokens, set(eos_token_ids), min_new_tokens)

    def _greedy(
        self, prompts: Sequence[ServingPrompt], max_new_tokens: int, stop: set[int], min_new_tokens: int
    ) -> list[list[int]]:
        """The engine's own greedy decoding, with the arguments checked (``stop``: the end tokens)."""
        raise NotImplementedError

    def check_settings(self, settings: dict[str, Any]) -> None:
        """This engine decodes greedily: refuse sampling or beam settings rather than ignore them."""
        greedy = {"do_sample": False, "num_beams": 1}
        bad = sorted(k for k, v in settings.items() if k not in ("pad_token_id",) and greedy.get(k, object()) != v)
        if bad:
            raise ValueError(
                f"The {self.name} engine decodes greedily; {bad} are transformers generate settings it does not "
                "take. Drop them, or generate with the torch path (engine=None)."
            )

    def check_model(self, model) -> None:
        """Refuse to serve ``model``'s active adapter unless this engine's model is its export."""
        if self.info is None:
            raise ValueError(
                f"{self.model_path!r} has no {SERVING_FILE} beside it, so nothing says which adapter it serves; "
                f"serve {self.export_hint}, or pass serving_info=."
            )
        check_export(model, self.info)
        self._check_vocab(model.active_peft_config.base_vocab_size)

    def check_base(self, model) -> None:
        """Baselines read the base model: refuse an export whose weights hold a merged adapter."""
        if self.info is not None and self.info.get("lora_merged"):
            raise ValueError(
                f"{self.model_path!r} is a {self.info.get('method')} export with its decoder LoRA merged; the "
                f"baselines (text RAG, no retrieval) need {self.base_hint}."
            )
        self._check_vocab(model.active_peft_config.base_vocab_size)

    def _check_vocab(self, vocab_size: Optional[int]) -> None:
        if vocab_size is not None and self.n_vocab is not None and vocab_size != self.n_vocab:
            raise ValueError(
                f"The model {self.model_path!r} has a {self.n_vocab}-token vocabulary, the adapter's base model "
                f"{vocab_size}; serve the export of this adapter's own base model."
            )
