"""COCOM's adapter modules: learned memory / marker embeddings (COCOM) or an encoder plus projection (COCOM-light)."""

from __future__ import annotations

import json
from typing import Optional

import torch
from tokenizers import Tokenizer
from torch import nn

from ..distributed import full_shape


class CocomTokens(nn.Module):
    """COCOM with the LLM as compressor: k_max memory-token embeddings, the <ENC> marker that opens a passage in the
    compressor's input, the <AE> marker that asks the decoder to reconstruct (auto-encoding pretraining) and, where
    passages end with one, the <SEP> marker.

    They are trained embeddings held here, not new vocabulary entries: the LLM's embedding matrix is never resized.
    """

    def __init__(
        self,
        initial: torch.Tensor,
        max_memory_tokens: int,
        residual_pooling: bool = False,
        separator: Optional[torch.Tensor] = None,
    ) -> None:
        super().__init__()
        # initial: [k_max + 2, hidden], embeddings of random vocabulary tokens (the scale the LLM expects)
        self.memory = nn.Parameter(initial[:max_memory_tokens].clone())  # [k_max, hidden]
        self.enc_marker = nn.Parameter(initial[max_memory_tokens : max_memory_tokens + 1].clone())  # [1, hidden]
        self.ae_marker = nn.Parameter(initial[max_memory_tokens + 1 :].clone())  # [1, hidden]
        # passage_end_token: the <SEP> after each passage's context embeddings in the decoder's prompt.
        self.sep_marker = None if separator is None else nn.Parameter(separator.clone())  # [1, hidden]
        # residual_pooling: the correction added to the pooled token embeddings, zero at first (see CocomConfig).
        self.residual: Optional[nn.Linear] = None
        if residual_pooling:
            hidden = initial.shape[-1]
            self.residual = nn.Linear(hidden, hidden, dtype=initial.dtype, device=initial.device)
            nn.init.zeros_(self.residual.weight)
            nn.init.zeros_(self.residual.bias)
            # The correction reads the compressor's hidden state RMS-normalised to the entry scale of the input
            # embeddings: last hidden states are ~16x larger than embeddings on SmolLM2, and at that scale one Adam
            # step on the zero-initialised Linear already moves its output past the pooled embeddings it corrects.
            # A buffer, saved with the adapter: its value comes from the random tokens of ``initial``.
            self.register_buffer("residual_scale", initial.float().pow(2).mean().sqrt().reshape(1))

    @property
    def enc_row(self) -> int:
        return full_shape(self.memory)[0]

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the table [memory tokens; <ENC>; <AE>] (``enc_row`` is <ENC>, ``enc_row + 1`` is <AE>).

        The embeddings are read through forward, so that engines that gather a module's parameters around its
        forward (DeepSpeed ZeRO-3) hand over whole tensors, not this rank's empty partitions.
        """
        parts = [self.memory, self.enc_marker, self.ae_marker]
        if self.sep_marker is not None:
            parts.append(self.sep_marker)
        table = torch.cat(parts)  # [k_max + 2 (+ 1), hidden]
        return table[rows]  # [*rows.shape, hidden]

    def marker(self) -> torch.Tensor:
        """<AE>, and <SEP> after it when passages end with one (the rows after the context embeddings' in the
        decoder's slot table).  # [1 or 2, hidden]"""
        rows = [self.enc_row + 1] + ([self.enc_row + 2] if self.sep_marker is not None else [])
        return self(torch.tensor(rows, device=self.memory.device))

    def correction(self, hidden: torch.Tensor) -> torch.Tensor:
        """residual_pooling's learned term from the compressor's hidden states.  # [m, hidden] -> [m, hidden]"""
        x = hidden.to(self.residual.weight.dtype)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.residual_scale.to(x.dtype)
        return self.residual(x)


def pooled_runs(tokens: torch.Tensor, lengths: torch.Tensor, rate: int) -> torch.Tensor:
    """The mean of each run of ``rate`` consecutive token embeddings of each right-padded passage (a passage's last
    run may be shorter), passage by passage, run by run.  # [sum ceil(n_i / rate), hidden]

    tokens: [n, len, hidden]; lengths: [n]."""
    n, width, hidden = tokens.shape
    position = torch.arange(width, device=tokens.device)  # [len]
    valid = position.unsqueeze(0) < lengths.unsqueeze(1)  # [n, len]
    counts = -(-lengths // rate)  # [n] runs per passage
    first = torch.cumsum(counts, 0) - counts  # [n] each passage's first output row
    run = (first.unsqueeze(1) + position.unsqueeze(0) // rate)[valid]  # [sum n_i] output row of each token
    total = int(counts.sum())
    sums = tokens.new_zeros(total, hidden).index_add(0, run, tokens[valid])
    sizes = tokens.new_zeros(total).index_add(0, run, torch.ones_like(run, dtype=tokens.dtype))
    return sums / sizes.unsqueeze(1)


def tokenizer_blob(name: str, tokenizer) -> bytes:
    """An encoder's fast tokenizer and pad id as the bytes an adapter carries (``EncoderCompressor.tokenizer``)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"The compressor {name!r} has no fast tokenizer (tokenizer.json); COCOM-light stores the fast tokenizer "
            "in the adapter. Save the encoder with a fast tokenizer first."
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return json.dumps({"tokenizer": tokenizer.backend_tokenizer.to_str(), "pad_token_id": pad_id}).encode("utf-8")


class EncoderCompressor(nn.Module):
    """What the COCOM-light compressors share: the <AE> marker, and the encoder's tokenizer carried in the adapter
    file (``tokenizer_blob``: its ``tokenizer.json`` and pad id as UTF-8 bytes), so that a saved adapter needs neither
    the original encoder folder nor the network."""

    def _add_marker_and_tokenizer(self, ae_initial: torch.Tensor, tokenizer_blob: Optional[bytes]) -> None:
        # Registered after the subclass's own modules: the order of an adapter's tensors stays what it was.
        self.ae_marker = nn.Parameter(ae_initial.clone())  # [1, hidden]
        blob = torch.frombuffer(bytearray(tokenizer_blob), dtype=torch.uint8) if tokenizer_blob else torch.zeros(0)
        self.register_buffer("tokenizer_blob", blob.to(torch.uint8))
        self._tokenizer = None

    # The blob's length is only known from the saved file: take its shape when loading.
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        saved = state_dict.get(prefix + "tokenizer_blob")
        if saved is not None and saved.shape != self.tokenizer_blob.shape:
            self.tokenizer_blob = torch.zeros(saved.shape, dtype=torch.uint8, device=self.tokenizer_blob.device)
        self._tokenizer = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    @property
    def tokenizer(self):
        """The encoder's fast tokenizer (a ``tokenizers.Tokenizer``) and its pad id, rebuilt from the blob."""
        if self._tokenizer is None:
            if self.tokenizer_blob.numel() == 0 or self.tokenizer_blob.device.type == "meta":
                raise ValueError(
                    "This COCOM-light adapter holds no encoder tokenizer (its weights were not loaded); load it with "
                    "PeftModel.from_pretrained or create it with get_peft_model."
                )

            data = json.loads(self.tokenizer_blob.cpu().numpy().tobytes().decode("utf-8"))
            tokenizer = Tokenizer.from_str(data["tokenizer"])
            tokenizer.no_padding()
            self._tokenizer = (tokenizer, int(data["pad_token_id"]))
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self.ae_marker.device


class CocomLightCompressor(EncoderCompressor):
    """COCOM-light: a fine-tuned encoder; each ``rate`` consecutive hidden states are concatenated and projected by
    Linear(h * rate -> d) into one context embedding."""

    def __init__(
        self,
        encoder: nn.Module,
        encoder_hidden_size: int,
        rate: int,
        hidden_size: int,
        ae_initial: torch.Tensor,
        tokenizer_blob: Optional[bytes] = None,
    ) -> None:
        super().__init__()
        self.rate = rate
        self.encoder = encoder
        self.projection = nn.Linear(encoder_hidden_size * rate, hidden_size)
        self._add_marker_and_tokenizer(ae_initial, tokenizer_blob)

    def forward(
        self, input_ids: Optional[torch.Tensor] = None, lengths: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Context embeddings of right-padded passages, all passages' rows concatenated.  # [sum k_i, hidden]

        input_ids: [n_passages, max_len]; lengths: [n_passages] (real tokens, special tokens included).
        With no passages, the <AE> marker (read through forward for the same reason as ``CocomTokens.forward``).
        """
        if input_ids is None:
            return self.ae_marker.clone()  # [1, hidden]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        mask = positions.unsqueeze(0) < lengths.unsqueeze(1)  # [n_passages, max_len]
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state  # [n, len, h]
        # States past a passage's end are zeroed, not padding-token outputs: a passage compresses the same alone or
        # in a batch.
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        n_passages, length, h = hidden.shape
        groups = -(-length // self.rate)
        hidden = nn.functional.pad(hidden, (0, 0, 0, groups * self.rate - length))
        chunks = hidden.reshape(n_passages, groups, self.rate * h)  # [n, groups, rate * h]
        counts = -(-lengths // self.rate)  # [n_passages] k_i
        keep = torch.arange(groups, device=lengths.device).unsqueeze(0) < counts.unsqueeze(1)  # [n, groups]
        return self.projection(chunks[keep].to(self.projection.weight.dtype))  # [sum k_i, hidden]

    def marker(self) -> torch.Tensor:
        return self()  # [1, hidden]
