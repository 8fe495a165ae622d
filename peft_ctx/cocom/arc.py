"""ARC-Encoder's compressor (Kyutai, 2025): a Llama-style encoder read bidirectionally whose last layer pools.

A passage's tokens go through the encoder's layers with full attention inside the passage and no final norm; the
last layer's queries are the means of consecutive groups of about ``pooling_factor`` tokens (of the residual stream,
before the layer's norm, at positions 0..k-1), attending to every token's keys and values (at the tokens' own
positions). After each passage's k pooled states comes one learned continuation state; a two-layer linear bridge
(no bias, no activation) maps all of them to the decoder's width. The decoder stays frozen and reads them in place
of the passage's tokens.

The published checkpoints (kyutai/ARC8_Encoder_*) store the encoder in Meta's layout (interleaved RoPE pairs);
``from_reference_state_dict`` renames it onto transformers' ``LlamaModel`` and permutes the query / key rows to
transformers' half-split RoPE.

Example::

    encoder = ArcEncoder(LlamaConfig(...), pooling_factor=8, bridge_hidden_size=2048, output_size=4096)
    slots = encoder(input_ids, lengths)  # [sum (k_i + 1), 4096]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import rotate_half

from .. import local_copies
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
    """

    def __init__(self, config: LlamaConfig, pooling_factor: int, bridge_hidden_size: int, output_size: int) -> None:
        super().__init__()
        if pooling_factor < 1:
            raise ValueError(f"pooling_factor={pooling_factor}; use a positive number of tokens per state.")
        self.pooling_factor = pooling_factor
        self.encoder = LlamaModel(config)
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

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The decoder's slot embeddings: each passage's pooled states and the continuation state, bridged.
        # [sum (k_i + 1), output_size]"""
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
    slot after each passage (``passage_end_token``) holds the bridged continuation state, and the <AE> marker asks
    the decoder to reconstruct, as in COCOM's pretraining."""

    def __init__(
        self,
        config: LlamaConfig,
        pooling_factor: int,
        bridge_hidden_size: int,
        hidden_size: int,
        ae_initial: torch.Tensor,
        tokenizer_blob: Optional[bytes] = None,
    ) -> None:
        super().__init__()
        self.arc = ArcEncoder(config, pooling_factor, bridge_hidden_size, hidden_size)
        self._add_marker_and_tokenizer(ae_initial, tokenizer_blob)

    def forward(
        self, input_ids: Optional[torch.Tensor] = None, lengths: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Context embeddings of right-padded passages, all passages' rows concatenated (``[sum k_i, hidden]``); with
        no passages, the markers (read through forward so that ZeRO-3 gathers them): <AE>, then the continuation
        state (``[2, hidden]``)."""
        if input_ids is None:
            continuation = self.arc.bridge(self.arc.continuation).to(self.ae_marker.dtype)
            return torch.cat([self.ae_marker, continuation])
        return self.arc.bridge(self.arc.pooled_states(input_ids, lengths))

    def marker(self) -> torch.Tensor:
        return self()  # [2, hidden]


def arc_compressor(config, hidden_size: int, ae_initial: torch.Tensor) -> ArcCompressor:
    """ARC's compressor for a COCOM config with ``compressor_type='arc'``: a new one from the Llama-style model
    ``config.compressor`` (its layers and token embeddings; a new bridge and continuation state), or, for a saved
    adapter, one built from ``compressor_config`` whose weights come from the adapter file."""
    if getattr(config, "_fresh_compressor", config.compressor_config is None):
        name = local_copies.resolve(config.compressor)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModel.from_pretrained(name, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise ValueError(f"Cannot load ARC's encoder {config.compressor!r} (a Llama-style model): {exc}") from exc
        if not isinstance(model, LlamaModel):
            raise ValueError(
                f"compressor_type='arc' reads with a Llama-style encoder; {config.compressor!r} is a "
                f"{type(model).__name__}. Give a Llama-architecture model (ARC: Llama-3.2-3B's first 26 layers)."
            )
        settings = LlamaConfig.from_dict(model.config.to_dict())
        module = ArcCompressor(
            settings, config.compression_rate, config.bridge_hidden_size, hidden_size, ae_initial,
            tokenizer_blob(config.compressor, tokenizer),
        )  # fmt: skip
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("norm.")}  # ARC reads no final norm
        module.arc.encoder.load_state_dict(state)
        config.compressor_config = settings.to_dict()
        return module
    settings = LlamaConfig.from_dict(dict(config.compressor_config))
    return ArcCompressor(settings, config.compression_rate, config.bridge_hidden_size, hidden_size, ae_initial)


def reference_config(reference: Mapping) -> tuple[LlamaConfig, int, int, int]:
    """(the encoder's ``LlamaConfig``, pooling factor, bridge inner width, decoder width) from a published
    checkpoint's ``config.json`` (the reference's model / embedder / bridge arguments)."""
    model, embedder, bridge = reference["model_args"], reference["embedder_args"], reference["bridge_args"]
    rates = embedder.get("compress_rates") or []
    if (
        len(rates) != 1
        or rates[0] >= -1
        or (embedder.get("pooling_module") or {}).get("pool_type") != ("mean_pooled_queries")
    ):
        raise ValueError(
            f"compress_rates={rates}, pooling_module={embedder.get('pooling_module')}: ARC's releases pool once, in "
            "the last layer, by mean-pooled queries (compress_rates [-8] or [-4]); other settings are not supported."
        )
    if embedder.get("causal_embedder"):
        raise ValueError("causal_embedder=True: ARC's releases read passages bidirectionally; not supported.")
    config = LlamaConfig(
        vocab_size=model["vocab_size"],
        hidden_size=model["dim"],
        intermediate_size=model["hidden_dim"],
        num_hidden_layers=model["n_layers"] - embedder.get("n_truncated_layers", 0),
        num_attention_heads=model["n_heads"],
        num_key_value_heads=model["n_kv_heads"],
        head_dim=model.get("head_dim") or model["dim"] // model["n_heads"],
        rms_norm_eps=model["norm_eps"],
        # ARC's RoPE: plain, at the checkpoint's theta (no Llama 3 scaling, which its code never applies).
        rope_parameters={"rope_type": "default", "rope_theta": model.get("rope_theta") or 1e6},
        tie_word_embeddings=False,
    )
    return config, -rates[0], bridge["hidden_dim"], bridge["out_dim"]


def from_reference_state_dict(
    state: Mapping[str, torch.Tensor], config: LlamaConfig, decoder_index: int = 0
) -> dict[str, torch.Tensor]:
    """A published ARC checkpoint's tensors (``embedder.*``, ``bridge_module.*``) under ``ArcEncoder``'s names, with
    the query / key rows permuted from Meta's interleaved RoPE pairs to transformers' halves. A multi-decoder
    checkpoint holds a bridge and a continuation token per decoder: ``decoder_index`` picks one."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    renames = {
        "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
        "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }  # fmt: skip
    own = {
        f"embedder.cont_tok.{decoder_index}.weight": "continuation",
        f"bridge_module.{decoder_index}.layer1.weight": "bridge_in.weight",
        f"bridge_module.{decoder_index}.layer2.weight": "bridge_out.weight",
    }
    if decoder_index == 0:  # one decoder: the bridge without an index
        own.update(
            {"bridge_module.layer1.weight": "bridge_in.weight", "bridge_module.layer2.weight": "bridge_out.weight"}
        )

    def halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
        rows, columns = weight.shape  # [n_heads * head_dim, in]: pairs (2i, 2i+1) -> halves (i, i + head_dim / 2)
        return weight.view(n_heads, rows // n_heads // 2, 2, columns).transpose(1, 2).reshape(rows, columns)

    out = {}
    for key, value in state.items():
        if key == "embedder.tok_embeddings.weight":
            out["encoder.embed_tokens.weight"] = value
        elif key.startswith("embedder.layers."):
            name = key.removeprefix("embedder.")
            for old, new in renames.items():
                name = name.replace(f".{old}.", f".{new}.")
            if ".q_proj." in name:
                value = halves(value, heads)
            elif ".k_proj." in name:
                value = halves(value, kv_heads)
            out[f"encoder.{name}"] = value
        elif key in own:
            out[own[key]] = value
    missing = {"continuation", "bridge_in.weight", "bridge_out.weight"} - set(out)
    if missing:
        raise ValueError(
            f"The checkpoint holds no {sorted(missing)} for decoder_index={decoder_index}; its bridges: "
            f"{sorted(k for k in state if k.startswith('bridge_module.'))}."
        )
    return out
