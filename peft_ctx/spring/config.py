from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Optional

from ..config import ContextConfig


@dataclass
class SpringConfig(ContextConfig):
    """SPRING: ``num_virtual_tokens`` trainable token embeddings between the retrieved passages and the question.

    The adapter is one ``[num_virtual_tokens, hidden]`` matrix and nothing else; the LLM stays frozen. A call may use
    only the first k rows (``num_virtual_tokens=k`` in ``prepare_inputs`` / ``generate``, any k <= N). Without
    passages, or with k = 0, no virtual token is inserted and the model is exactly the base model.
    """

    method_name = "spring"
    template_fields = ("context", "virtual", "question")

    num_virtual_tokens: int = field(
        default=50, metadata={"help": "N, the number of trained virtual tokens (the paper uses 50); calls use k <= N."}
    )
    passage_template: str = field(
        default="[{index}] {passage}\n",
        metadata={"help": "How one retrieved passage is written into {context}; fields {index} (1-based), {passage}."},
    )
    init_text: Optional[str] = field(
        default=None,
        metadata={
            "help": "Initialise the virtual tokens from the embeddings of this text's tokens (repeated to fill N). "
            "Needs tokenizer_name_or_path or init_token_ids. None: embeddings of random vocabulary tokens."
        },
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer (folder or Hub id) that turns init_text into token ids."}
    )
    init_token_ids: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": "Token ids whose embeddings initialise the virtual tokens (repeated to fill N); filled in from "
            "init_text when the adapter is created, so that loading it again needs no tokenizer."
        },
    )

    def default_prompt_template(self) -> str:
        # {context} ends with a newline per passage; {virtual} sits right before the question (SPRING's placement).
        return "{context}{virtual}Question: {question}\nAnswer:"

    def __post_init__(self):
        super().__post_init__()
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(
                f"num_virtual_tokens={n!r}: give the number of virtual tokens as a positive int, e.g. 50."
            )
        self._check_passage_template()
        if self.init_text is not None:
            if not isinstance(self.init_text, str) or not self.init_text.strip():
                raise ValueError(f"init_text={self.init_text!r}: give a non-empty text, or None for random init.")
            if self.tokenizer_name_or_path is None and self.init_token_ids is None:
                raise ValueError(
                    "init_text is set but tokenizer_name_or_path is None: give the base model's tokenizer folder "
                    "(tokenizer_name_or_path=...) or the ids directly (init_token_ids=tokenizer(text).input_ids)."
                )
        if self.init_token_ids is not None:
            ids = self.init_token_ids
            if (
                not isinstance(ids, (list, tuple))
                or not ids
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
            ):
                raise ValueError(f"init_token_ids={ids!r:.80}: give a non-empty list of token ids (ints >= 0).")
            self.init_token_ids = list(ids)

    def _check_passage_template(self) -> None:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(self.passage_template) if name is not None]
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"passage_template={self.passage_template!r} is not a valid format string: {exc}"
            ) from exc
        if "passage" not in names or set(names) - {"index", "passage"}:
            raise ValueError(
                f"passage_template={self.passage_template!r} must contain {{passage}} and no field other than "
                "{index}, e.g. '[{index}] {passage}\\n'."
            )
