from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ..config import ContextConfig, is_int

# The separate compressor LoRA's role name (ContextMethod.companion_roles): its weights are saved as
# '...lora_A.compressor.weight'.
COMPRESSOR_ROLE = "compressor"
# The query LoRA's role (CLaRa's end-to-end checkpoints): it compresses questions for retrieval by memory states.
QUERY_ROLE = "query"
RESIDUAL_SOURCES = ("memory", "tokens")
PASSAGE_TRUNCATIONS = ("text", "sequence")
COMPRESSOR_POSITIONS = ("start", "left_padded")
COMPRESSOR_TYPES = ("encoder", "arc")
# The training recipe's stages, in order (recipe.py runs them; kept here so that the method needs no trainer).
STAGES = ("pretrain", "qa")


@dataclass
class CocomConfig(ContextConfig):
    """COCOM: each passage becomes k = ceil(n / compression_rate) context embeddings that the LLM reads instead of it.

    With ``compressor=None`` (COCOM) the LLM itself compresses: the passage's n tokens, after an ``<ENC>`` marker and
    followed by k memory tokens, run through the LLM with its LoRA on; the last hidden states at the memory positions
    are the k embeddings. With ``compressor`` a BERT-style encoder (COCOM-light), every ``compression_rate``
    consecutive encoder states are concatenated and projected into the LLM's embedding space. The trainable parts are
    LoRA on the LLM, the memory / marker embeddings and, for COCOM-light, the whole encoder and the projection; all of
    them are in the saved adapter.
    """

    method_name = "cocom"

    compression_rate: int = field(
        default=16,
        metadata={
            "help": "xi: a passage of n tokens becomes ceil(n / xi) context embeddings (the paper: 4, 16, 128)."
        },
    )
    compressor: Optional[str] = field(
        default=None,
        metadata={
            "help": "None: the LLM compresses (COCOM). A folder or Hub id of a BERT-style encoder: COCOM-light; its "
            "weights are copied into the adapter when it is created, so loading the adapter never reads this path."
        },
    )
    max_passage_tokens: int = field(
        default=128,
        metadata={"help": "Passages are truncated to this many tokens (compressor tokens) before compression."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank on the LLM's linear layers; 0 keeps the LLM frozen."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: Union[str, list[str]] = field(
        default="all-linear",
        metadata={"help": "LoRA target modules as in peft.LoraConfig: 'all-linear', a list of names, or a regex."},
    )
    separate_compressor_adapter: bool = field(
        default=False,
        metadata={
            "help": "COCOM only: one LoRA for compressing and another for decoding (as PISCO does) instead of one "
            "shared LoRA."
        },
    )
    query_adapter: bool = field(
        default=False,
        metadata={
            "help": "COCOM with a separate compressor LoRA: a third LoRA that compresses questions, as passages are "
            "compressed, into query states; CompressedIndex.search ranks passages by the cosine between a "
            "question's and a passage's flattened states (CLaRa's end-to-end retrieval). Needs "
            "memory_tokens_per_passage."
        },
    )
    passage_special_tokens: bool = field(
        default=False,
        metadata={
            "help": "COCOM only: the compressor reads <ENC> BOS passage EOS (the LLM's own BOS / EOS, as the public "
            "COCOM code does) within max_passage_tokens; False (what adapters saved before this field had): "
            "<ENC> passage."
        },
    )
    residual_pooling: bool = field(
        default=False,
        metadata={
            "help": "COCOM only: each context embedding is the mean of its compression_rate passage token embeddings "
            "(the decoder's own input embeddings) plus a learned correction, a zero-initialised Linear on the "
            "compressor's hidden state; training starts where parameter-free pooling already is."
        },
    )
    residual_source: str = field(
        default="memory",
        metadata={
            "help": "With residual_pooling: what the correction reads. 'memory': the compressor's hidden states at "
            "COCOM's k memory tokens after the passage; 'tokens': its hidden states at the passage's own tokens, "
            "mean-pooled over each run of compression_rate (ARC-Encoder's pooling; no memory tokens, no <ENC>)."
        },
    )
    memory_tokens_per_passage: Optional[int] = field(
        default=None,
        metadata={
            "help": "COCOM only: every passage becomes this many context embeddings whatever its length, each from "
            "its own memory token (PISCO and CLaRa: doc_max_length // compression rate). None: k = ceil(n / "
            "compression_rate)."
        },
    )
    passage_truncation: str = field(
        default="text",
        metadata={
            "help": "With passage_special_tokens: 'text' truncates the passage and keeps BOS and EOS around it; "
            "'sequence' tokenises BOS passage EOS as one text and truncates it at max_passage_tokens, so that a long "
            "passage loses its EOS (the PISCO lineage's code)."
        },
    )
    compressor_positions: str = field(
        default="start",
        metadata={
            "help": "COCOM only: 'start': the compressor reads <ENC> at position 0; 'left_padded': at the position "
            "it has when its input is left-padded to max_passage_tokens + 1 (the PISCO lineage pads every passage to "
            "one length and passes no position ids, so a short passage starts at a later position)."
        },
    )
    passage_end_token: bool = field(
        default=False,
        metadata={
            "help": "COCOM only: a learned <SEP> embedding after each passage's context embeddings in the decoder's "
            "prompt (PISCO, CLaRa)."
        },
    )
    passage_separator: str = field(
        default="\n", metadata={"help": "Text between the context embeddings of consecutive passages in the prompt."}
    )
    compressor_type: str = field(
        default="encoder",
        metadata={
            "help": "COCOM-light: how the compressor reads a passage. 'encoder': a BERT-style encoder whose "
            "compression_rate consecutive states are concatenated and projected (COCOM-light). 'arc': ARC-Encoder's "
            "(a Llama-style model read bidirectionally without its final norm, the last layer pooling by "
            "mean-pooled queries over about compression_rate tokens, a two-layer linear bridge to the decoder, and "
            "a learned continuation state after each passage: passage_end_token is set)."
        },
    )
    bridge_hidden_size: int = field(
        default=2048,
        metadata={"help": "compressor_type='arc': the bridge's inner width (2048 in ARC's releases)."},
    )
    compressor_layers: Optional[int] = field(
        default=None,
        metadata={
            "help": "compressor_type='arc': keep the encoder model's first N layers (ARC: 26 of Llama-3.2-3B's 28); "
            "None keeps them all."
        },
    )
    compressor_config: Optional[dict] = field(
        default=None,
        metadata={
            "help": "COCOM-light: the encoder's transformers config, filled in when the adapter is created; loading "
            "builds the encoder from it and takes its weights (and tokenizer) from the adapter file."
        },
    )

    def default_prompt_template(self) -> str:
        return "Answer the question using the background passages.\nBackground: {context}\nQuestion: {question}"

    def __post_init__(self):
        super().__post_init__()
        if self.passage_special_tokens and self.compressor is not None:
            raise ValueError(
                "passage_special_tokens=True is for COCOM with the LLM as compressor; COCOM-light's encoder "
                f"({self.compressor!r}) adds its own special tokens. Leave it False with a compressor."
            )
        if self.residual_pooling and self.compressor is not None:
            raise ValueError(
                "residual_pooling=True pools the LLM's own token embeddings (COCOM); COCOM-light's encoder "
                f"({self.compressor!r}) reads another tokenizer's tokens. Leave it False with a compressor."
            )
        if self.residual_source not in RESIDUAL_SOURCES:
            raise ValueError(
                f"residual_source={self.residual_source!r}: use one of {', '.join(map(repr, RESIDUAL_SOURCES))}."
            )
        if self.residual_source != "memory" and not self.residual_pooling:
            raise ValueError(
                f"residual_source={self.residual_source!r} says what residual_pooling's correction reads; set "
                "residual_pooling=True with it, or leave residual_source='memory'."
            )
        self._check_pisco_lineage_fields()
        if not is_int(self.compression_rate) or self.compression_rate < 1:
            raise ValueError(
                f"compression_rate={self.compression_rate!r}: give an integer >= 1 (tokens per context embedding; "
                "the paper uses 4, 16 or 128)."
            )
        if not is_int(self.max_passage_tokens) or self.max_passage_tokens < 1:
            raise ValueError(f"max_passage_tokens={self.max_passage_tokens!r}: give a positive int, e.g. 128.")
        if self.compressor is not None and (not isinstance(self.compressor, str) or not self.compressor.strip()):
            raise ValueError(
                f"compressor={self.compressor!r}: give None (the LLM compresses) or the folder / Hub id of a "
                "BERT-style encoder."
            )
        if not is_int(self.lora_r) or self.lora_r < 0:
            raise ValueError(f"lora_r={self.lora_r!r}: give a LoRA rank >= 0 (0 keeps the LLM frozen).")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r}: give a positive number, e.g. 32.")
        if (
            isinstance(self.lora_dropout, bool)
            or not isinstance(self.lora_dropout, (int, float))
            or not (0 <= self.lora_dropout < 1)
        ):
            raise ValueError(f"lora_dropout={self.lora_dropout!r}: give a probability in [0, 1).")
        targets = self.lora_target_modules
        if isinstance(targets, (list, tuple, set)):
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"lora_target_modules={targets!r}: give module names (non-empty strings).")
            self.lora_target_modules = list(targets)
        elif not isinstance(targets, str) or not targets:
            raise ValueError(
                f"lora_target_modules={targets!r}: give 'all-linear', a list of module names or a regex string."
            )
        if self.separate_compressor_adapter and self.compressor is not None:
            raise ValueError(
                "separate_compressor_adapter=True is for COCOM (compressor=None), where the LLM compresses; "
                f"COCOM-light's compressor is the encoder {self.compressor!r}, trained on its own."
            )
        if self.separate_compressor_adapter and self.lora_r == 0:
            raise ValueError("separate_compressor_adapter=True needs LoRA adapters: set lora_r >= 1.")
        if self.query_adapter and not (
            self.separate_compressor_adapter and self.memory_tokens_per_passage is not None and not self.is_light
        ):
            raise ValueError(
                "query_adapter=True (retrieval by memory states, as CLaRa's end-to-end checkpoints) needs COCOM with "
                "separate_compressor_adapter=True and memory_tokens_per_passage set (every passage and question "
                "compressed into as many states)."
            )
        if not isinstance(self.passage_separator, str):
            raise ValueError(f"passage_separator={self.passage_separator!r}: give a string, e.g. '\\n'.")
        if self.compressor_type not in COMPRESSOR_TYPES:
            raise ValueError(
                f"compressor_type={self.compressor_type!r}: use one of {', '.join(map(repr, COMPRESSOR_TYPES))}."
            )
        if self.compressor_type == "arc":
            if self.compressor is None:
                raise ValueError(
                    "compressor_type='arc' compresses with ARC's Llama-style encoder: give it as compressor= (a "
                    "folder or Hub id), or leave compressor_type='encoder'."
                )
            if not is_int(self.bridge_hidden_size) or self.bridge_hidden_size < 1:
                raise ValueError(f"bridge_hidden_size={self.bridge_hidden_size!r}: give a positive int, e.g. 2048.")
            if self.compressor_layers is not None and (
                not is_int(self.compressor_layers) or self.compressor_layers < 1
            ):
                raise ValueError(
                    f"compressor_layers={self.compressor_layers!r}: give a positive number of layers (ARC: 26), or "
                    "None to keep all."
                )
            self.passage_end_token = True  # ARC's continuation state after every passage
        elif self.compressor_layers is not None:
            raise ValueError(
                f"compressor_layers={self.compressor_layers!r} cuts ARC's encoder; it needs compressor_type='arc'."
            )
        if self.compressor_config is not None and (
            not isinstance(self.compressor_config, dict) or "model_type" not in self.compressor_config
        ):
            raise ValueError(
                "compressor_config must be the encoder's transformers config as a dict (with 'model_type'); it is "
                "filled in automatically, leave it None when creating an adapter."
            )
        # Whether this config object still has to copy the pretrained encoder in. A config read from a saved adapter
        # (compressor_config already filled) builds the encoder from its config and takes the weights from the file.
        self._fresh_compressor = self.compressor is not None and self.compressor_config is None

    def _check_pisco_lineage_fields(self) -> None:
        fixed = self.memory_tokens_per_passage
        if fixed is not None and (not is_int(fixed) or fixed < 1):
            raise ValueError(
                f"memory_tokens_per_passage={fixed!r}: give a positive int (context embeddings per passage) or None."
            )
        if self.passage_truncation not in PASSAGE_TRUNCATIONS:
            raise ValueError(
                f"passage_truncation={self.passage_truncation!r}: use one of "
                f"{', '.join(map(repr, PASSAGE_TRUNCATIONS))}."
            )
        if self.passage_truncation == "sequence" and not self.passage_special_tokens:
            raise ValueError(
                "passage_truncation='sequence' truncates BOS passage EOS as one sequence; set "
                "passage_special_tokens=True with it, or leave passage_truncation='text'."
            )
        if self.compressor_positions not in COMPRESSOR_POSITIONS:
            raise ValueError(
                f"compressor_positions={self.compressor_positions!r}: use one of "
                f"{', '.join(map(repr, COMPRESSOR_POSITIONS))}."
            )
        changed = [
            name
            for name, value in (
                ("memory_tokens_per_passage", fixed is not None),
                ("compressor_positions", self.compressor_positions != "start"),
                ("passage_end_token", self.passage_end_token and self.compressor_type != "arc"),
            )
            if value
        ]
        if changed and self.compressor is not None:
            raise ValueError(
                f"{', '.join(changed)} set the LLM compressor's input and prompt (COCOM); COCOM-light's encoder "
                f"({self.compressor!r}) has its own. Leave them at their defaults with a compressor."
            )
        if fixed is not None and self.residual_pooling:
            raise ValueError(
                "residual_pooling pools runs of compression_rate tokens, one per context embedding; it cannot give "
                f"memory_tokens_per_passage={fixed} embeddings per passage. Use one or the other."
            )

    @property
    def is_light(self) -> bool:
        return self.compressor is not None

    def memory_tokens(self, n_tokens: int) -> int:
        """k = ceil(n / compression_rate) context embeddings for a passage of n (truncated) tokens, or
        ``memory_tokens_per_passage`` when set."""
        if self.memory_tokens_per_passage is not None:
            return self.memory_tokens_per_passage
        return -(-min(n_tokens, self.max_passage_tokens) // self.compression_rate)
