"""ARC-Encoder's compressor (Kyutai, 2025): a Llama-style encoder read bidirectionally whose last layer pools.

A passage's tokens go through the encoder's layers with full attention inside the passage and no final norm; the
last layer's queries are the means of consecutive groups of about ``pooling_factor`` tokens (of the residual stream,
before the layer's norm, at positions 0..k-1), attending to every token's keys and values (at the tokens' own
positions). After each passage's k pooled states comes one learned continuation state; a two-layer linear bridge
(no bias, no activation) maps all of them to the decoder's width. The decoder stays frozen and reads them in place
of the passage's tokens.

The published checkpoints (kyutai/ARC8_Encoder_*) are converted by ``peft_ctx.cocom.arc_convert``.

Example::

    encoder = ArcEncoder(LlamaConfig(...), pooling_factor=8, bridge_hidden_size=2048, output_size=4096)
    slots = encoder(input_ids, lengths)  # [sum (k_i + 1), 4096]
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import rotate_half

from .compressor import load_encoder
from .modules import EncoderCompressor, tokenizer_blob


def pooling_groups(n_tokens: int, factor: int) -> list[int]:
    """Sizes of the consecutive token groups pooled into one state each: one group for a passage shorter than
    ``factor``, else ceil(n / factor) groups as equal as possible, the larger ones first (17 by 8 -> [6, 6, 5])."""
    if n_tokens < 1 or factor < 1:
        raise ValueError(f"pooling_groups(n_tokens={n_tokens}, factor={factor}): both must be positive.")
    if n_tokens < factor:
        return [n_tokens]
    groups = -(-n_tokens // factor)
    size, larger = divmod(n_tokens, groups)
    return [size + 1] * larger + [size] * (groups - larger)


def pooling_matrix(lengths: list[int], width: int, factor: int) -> torch.Tensor:
    """Per passage, the averaging weights of its groups over its right-padded tokens.  # [n, k_max, width]"""
    groups = [pooling_groups(n, factor) for n in lengths]
    matrix = torch.zeros(len(lengths), max(map(len, groups)), width)
    for row, sizes in enumerate(groups):
        start = 0
        for group, size in enumerate(sizes):
            matrix[row, group, start : start + size] = 1.0 / size
            start += size
    return matrix


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [n, heads, len, head_dim]; cos / sin: [n, len, head_dim]
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class ArcEncoder(nn.Module):
    """The encoder, its continuation state and its bridge to the decoder's width.

    Args:
        config: the encoder's ``LlamaConfig`` (its layers; ``rope_parameters`` as the checkpoint was trained, i.e.
            ARC's plain RoPE, without Llama 3's scaling).
        pooling_factor: tokens per pooled state (8 for ARC8, 4 for ARC4).
        bridge_hidden_size: the bridge's inner width (2048 in the releases).
        output_size: the decoder's hidden size.
        encoder: the encoder's layers as loaded (``config``'s ``LlamaModel``, e.g. partitioned by a ZeRO-3 init
            while loading); None builds new ones.
    """

    def __init__(
        self,
        config: LlamaConfig,
        pooling_factor: int,
        bridge_hidden_size: int,
        output_size: int,
        encoder: Optional[LlamaModel] = None,
    ) -> None:
        super().__init__()
        if pooling_factor < 1:
            raise ValueError(f"pooling_factor={pooling_factor}; use a positive number of tokens per state.")
        self.pooling_factor = pooling_factor
        self.encoder = LlamaModel(config) if encoder is None else encoder
        self.encoder.norm = nn.Identity()  # ARC's encoder has no final norm
        self.continuation = nn.Parameter(torch.ones(1, config.hidden_size))  # [1, h_enc], ARC's <Cont>
        self.bridge_in = nn.Linear(config.hidden_size, bridge_hidden_size, bias=False)
        self.bridge_out = nn.Linear(bridge_hidden_size, output_size, bias=False)

    def pooled_states(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The encoder's pooled states of right-padded passages, passage by passage.  # [sum k_i, h_enc]

        input_ids: [n, len]; lengths: [n] (no special tokens: ARC reads the bare passage)."""
        model = self.encoder
        n, width = input_ids.shape
        valid = torch.arange(width, device=input_ids.device).unsqueeze(0) < lengths.unsqueeze(1)  # [n, len]
        hidden = model.embed_tokens(input_ids)  # [n, len, h]
        positions = torch.arange(width, device=input_ids.device).expand(n, width)
        cos, sin = model.rotary_emb(hidden, positions)  # [n, len, head_dim]
        # Every token sees every real token of its passage: additive [n, 1, len, len], padding keys at the minimum.
        blocked = torch.finfo(hidden.dtype).min
        mask = torch.zeros(n, 1, width, width, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~valid[:, None, None, :], blocked)
        for layer in model.layers[:-1]:
            hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=(cos, sin))
        pooled = self._pooling_layer(model.layers[-1], hidden, valid, lengths, (cos, sin))  # [n, k_max, h]
        counts = self.pooled_counts(lengths).to(pooled.device)
        keep = torch.arange(pooled.shape[1], device=pooled.device).unsqueeze(0) < counts.unsqueeze(1)  # [n, k_max]
        return pooled[keep]

    def pooled_counts(self, lengths: torch.Tensor) -> torch.Tensor:
        """k_i, the pooled states of each passage: ceil(n / pooling_factor), one for a passage shorter than the
        factor (the number of ``pooling_groups``).  # [n]"""
        return -(-lengths // self.pooling_factor)

    def _pooling_layer(self, layer, hidden, valid, lengths, key_rope) -> torch.Tensor:
        """The last layer with mean-pooled queries over unpooled keys / values.  # [n, k_max, h]"""
        attention = layer.self_attn
        n, width, _ = hidden.shape
        weights = pooling_matrix(lengths.tolist(), width, self.pooling_factor).to(hidden)  # [n, k_max, len]
        pooled = weights @ hidden  # [n, k_max, h], the residual stream's means, before the layer's norm
        k_max = pooled.shape[1]
        head_dim, heads, kv_heads = (
            attention.head_dim,
            attention.config.num_attention_heads,
            attention.config.num_key_value_heads,
        )
        query = attention.q_proj(layer.input_layernorm(pooled)).view(n, k_max, heads, head_dim).transpose(1, 2)
        normed = layer.input_layernorm(hidden)
        key = attention.k_proj(normed).view(n, width, kv_heads, head_dim).transpose(1, 2)
        value = attention.v_proj(normed).view(n, width, kv_heads, head_dim).transpose(1, 2)
        # Pooled queries sit at positions 0..k-1 (their index), the keys at their tokens' own positions.
        query_positions = torch.arange(k_max, device=hidden.device).expand(n, k_max)
        query_cos, query_sin = self.encoder.rotary_emb(pooled, query_positions)
        query = _rope(query, query_cos, query_sin)
        key = _rope(key, *key_rope)
        key = key.repeat_interleave(heads // kv_heads, dim=1)  # [n, heads, len, head_dim]
        value = value.repeat_interleave(heads // kv_heads, dim=1)
        mask = valid[:, None, None, :].expand(n, 1, k_max, width)
        out = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=1 / math.sqrt(head_dim)
        )
        hidden = pooled + attention.o_proj(out.transpose(1, 2).reshape(n, k_max, heads * head_dim))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def forward(
        self, input_ids: Optional[torch.Tensor] = None, lengths: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The decoder's slot embeddings: each passage's pooled states and the continuation state, bridged
        (``[sum (k_i + 1), output_size]``); with no passages, the bridged continuation state alone (``[1,
        output_size]``, read through forward so that ZeRO-3 gathers it)."""
        if input_ids is None:
            return self.bridge(self.continuation)
        pooled = self.pooled_states(input_ids, lengths)  # [sum k_i, h_enc]
        parts = []
        for chunk in pooled.split(self.pooled_counts(lengths).tolist()):
            parts += [chunk, self.continuation.to(chunk.dtype)]
        return self.bridge(torch.cat(parts))

    def bridge(self, states: torch.Tensor) -> torch.Tensor:
        """Encoder states to the decoder's width: two linear maps, no bias, no activation.  # [m, h] -> [m, out]"""
        return self.bridge_out(self.bridge_in(states))


class ArcCompressor(EncoderCompressor):
    """COCOM-light with ARC-Encoder's compressor: a passage's context embeddings are its bridged pooled states; the
    slot after each passage (``passage_end_token``) holds the bridged continuation state, except in auto-encoding
    prompts, where the <AE> marker (ARC's reconstruction token) takes its place."""

    def __init__(
        self,
        config: LlamaConfig,
        pooling_factor: int,
        bridge_hidden_size: int,
        hidden_size: int,
        ae_initial: torch.Tensor,
        tokenizer_blob: Optional[bytes] = None,
        encoder: Optional[LlamaModel] = None,
    ) -> None:
        super().__init__()
        self.arc = ArcEncoder(config, pooling_factor, bridge_hidden_size, hidden_size, encoder)
        self._add_marker_and_tokenizer(ae_initial, tokenizer_blob)

    def forward(
        self, input_ids: Optional[torch.Tensor] = None, lengths: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Context embeddings of right-padded passages, all passages' rows concatenated (``[sum k_i, hidden]``); with
        no passages, the markers (read through forward so that ZeRO-3 gathers them): <AE>, then the continuation
        state (``[2, hidden]``)."""
        if input_ids is None:
            return torch.cat([self.ae_marker, self.arc().to(self.ae_marker.dtype)])
        return self.arc.bridge(self.arc.pooled_states(input_ids, lengths))

    def marker(self) -> torch.Tensor:
        return self()  # [2, hidden]


def arc_compressor(config, hidden_size: int, ae_initial: torch.Tensor) -> ArcCompressor:
    """ARC's compressor for a COCOM config with ``compressor_type='arc'``: a new one from the Llama-style model
    ``config.compressor`` (its layers and token embeddings; a new bridge and continuation state), or, for a saved
    adapter, one built from ``compressor_config`` whose weights come from the adapter file."""
    if getattr(config, "_fresh_compressor", config.compressor_config is None):
        tokenizer, model = load_encoder(config.compressor, "ARC's encoder", "a Llama-style model")
        if not isinstance(model, LlamaModel):
            raise ValueError(
                f"compressor_type='arc' reads with a Llama-style encoder; {config.compressor!r} is a "
                f"{type(model).__name__}. Give a Llama-architecture model (ARC: Llama-3.2-3B's first 26 layers)."
            )
        layers = config.compressor_layers
        if layers is not None:
            if layers > len(model.layers):
                raise ValueError(
                    f"compressor_layers={layers}, but {config.compressor!r} has {len(model.layers)} layers."
                )
            model.layers = model.layers[:layers]  # ARC drops the last layers of its Llama (26 of 28 kept)
            model.config.num_hidden_layers = layers
        settings = LlamaConfig.from_dict(model.config.to_dict())
        # The loaded module itself (not a copy of its weights): under a ZeRO-3 init it is already partitioned.
        module = ArcCompressor(
            settings, config.compression_rate, config.bridge_hidden_size, hidden_size, ae_initial,
            tokenizer_blob(config.compressor, tokenizer), encoder=model,
        )  # fmt: skip
        config.compressor_config = settings.to_dict()
        return module
    settings = LlamaConfig.from_dict(dict(config.compressor_config))
    return ArcCompressor(settings, config.compression_rate, config.bridge_hidden_size, hidden_size, ae_initial)
