"""Import a published ARC-Encoder checkpoint (kyutai/ARC8_Encoder_*) as a peft_ctx COCOM adapter (compressor_type
'arc').

The release is a folder written by ``PyTorchModelHubMixin``: ``config.json`` (the reference's model / embedder /
bridge arguments) and ``model.safetensors`` (``embedder.*``: the encoder in Meta's layout, its continuation and
reconstruction tokens; ``bridge_module.*``: one bridge, or one per decoder). It lacks the encoder's tokenizer, which
is Llama-3.2-3B's: give it as ``encoder_tokenizer``.

    python -m peft_ctx.convert kyutai/ARC8_Encoder_Llama OUT --base_model meta-llama/Llama-3.1-8B \\
        --encoder_tokenizer meta-llama/Llama-3.2-3B

The adapter compresses and prompts as the release's evaluation does (``tests/fixtures/published`` holds what its
code gives on a tiny checkpoint): the bare passage (no BOS / EOS) through the encoder, its pooled states and the
continuation state bridged into the frozen decoder, in ``<bos>Document: [slots]\\nQuestion: {q}\\nAnswer:`` with
each text piece tokenised on its own. ARC's decoders read plain RoPE: load Llama-3.1 without its Llama 3 scaling
(``rope_parameters={"rope_type": "default", "rope_theta": 500000.0}``) to decode as the release does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig

from .. import local_copies
from ..converting import PublishedFamily, peek_config, refuse_existing_adapter, release_config
from .config import CocomConfig
from .modules import tokenizer_blob

# ARC's evaluation prompt, 0-shot (its create_prompt: "Document: ", the document's slots, then the question).
ARC_TEMPLATE = "Document: {context}\nQuestion: {question}\nAnswer:"
ARC_BASES = ("meta-llama/Llama-3.1-8B", "mistralai/Mistral-7B-v0.3")  # the multi release's decoders, in bridge order
ENCODER_TOKENIZER = "meta-llama/Llama-3.2-3B"
# ARC truncates an evaluated document at 32768 tokens (its max_len_4_oom).
MAX_PASSAGE_TOKENS = 32768


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


def convert_arc(
    source: str,
    output_dir: str,
    base_model_name_or_path: Optional[str] = None,
    overwrite: bool = False,
    encoder_tokenizer: str = ENCODER_TOKENIZER,
    decoder_index: int = 0,
    embedding_module: str = "model.embed_tokens",
    **config_overrides,
) -> CocomConfig:
    """Write a peft_ctx COCOM adapter (``compressor_type='arc'``, the decoder frozen) from an ARC-Encoder release.

    Args:
        source: the folder with config.json and model.safetensors.
        output_dir: folder for the adapter; an adapter already there is only replaced with ``overwrite=True``.
        base_model_name_or_path: the decoder the bridge was trained for (ARC8_Encoder_Llama: Llama-3.1-8B,
            ARC8_Encoder_Mistral: Mistral-7B-v0.3; ARC8_Encoder_multi: the one of ``decoder_index``).
        encoder_tokenizer: the encoder's tokenizer (a folder or Hub id; the releases were trained with
            Llama-3.2-3B's and do not include it).
        decoder_index: which bridge of a multi-decoder release (0: Llama-3.1-8B, 1: Mistral-7B-v0.3).
        embedding_module: the input embedding's module path in the base model (``model.embed_tokens`` for Llama
            and Mistral).
        config_overrides: further ``CocomConfig`` fields (e.g. ``max_passage_tokens``).
    """
    from transformers import AutoTokenizer

    refuse_existing_adapter(output_dir, overwrite)
    settings = release_config(
        source, ("model_args", "embedder_args", "bridge_args"), "ARC-Encoder", "e.g. ARC8_Encoder_Llama/"
    )
    config, factor, bridge_hidden, out_dim = reference_config(settings)
    weights = os.path.join(source, "model.safetensors")
    if not os.path.isfile(weights):
        raise ValueError(f"{source} has no model.safetensors; an ARC-Encoder release holds it beside config.json.")
    with safe_open(weights, framework="pt") as f:
        state = {key: f.get_tensor(key).float() for key in f.keys()}
    bridges = {k.split(".")[1] for k in state if k.startswith("bridge_module.") and k.split(".")[1].isdigit()}
    if base_model_name_or_path is None:
        if len(bridges) < 2:
            raise ValueError(
                f"Name the decoder {source}'s bridge was trained for with --base_model (ARC8_Encoder_Llama: "
                f"{ARC_BASES[0]}, ARC8_Encoder_Mistral: {ARC_BASES[1]})."
            )
        base_model_name_or_path = ARC_BASES[decoder_index] if decoder_index < len(ARC_BASES) else None
    arc = from_reference_state_dict(state, config, decoder_index)
    reconstruction = state.get(f"embedder.rec_tok.{decoder_index}.weight")
    if reconstruction is None:
        raise ValueError(
            f"{weights} holds no embedder.rec_tok.{decoder_index}.weight (the reconstruction token, which every "
            "ARC release has); it is not an ARC-Encoder release."
        )
    with torch.no_grad():  # <Rec> as the decoder reads it: through the bridge
        ae_marker = arc["bridge_out.weight"] @ (arc["bridge_in.weight"] @ reconstruction.T)  # [out, 1]
    try:
        tokenizer = AutoTokenizer.from_pretrained(local_copies.resolve(encoder_tokenizer))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"Cannot load the encoder's tokenizer {encoder_tokenizer!r} ({exc}). ARC's releases do not include it: "
            f"give the folder of {ENCODER_TOKENIZER}'s tokenizer with --encoder_tokenizer."
        ) from exc
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"The tokenizer {encoder_tokenizer!r} has {len(tokenizer)} ids but the encoder's embedding has "
            f"{config.vocab_size} rows; give the tokenizer the release was trained with ({ENCODER_TOKENIZER}'s)."
        )
    prefix = f"base_model.model.{embedding_module}.ctx_modules"
    tensors = {f"{prefix}.arc.{name}": value.contiguous() for name, value in arc.items()}
    tensors[f"{prefix}.ae_marker"] = ae_marker.T.contiguous()  # [1, out]
    blob = tokenizer_blob(encoder_tokenizer, tokenizer)
    tensors[f"{prefix}.tokenizer_blob"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)

    adapter = CocomConfig(
        compressor=encoder_tokenizer,
        compressor_type="arc",
        compressor_config=config.to_dict(),
        compression_rate=factor,
        bridge_hidden_size=bridge_hidden,
        lora_r=0,
        max_passage_tokens=MAX_PASSAGE_TOKENS,
        passage_separator="",
        base_model_name_or_path=base_model_name_or_path,
        base_hidden_size=out_dim,
        **{"prompt_template": ARC_TEMPLATE, "use_chat_template": False, **config_overrides},
    )
    os.makedirs(output_dir, exist_ok=True)
    adapter.save_pretrained(output_dir)
    save_file(tensors, os.path.join(output_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    return adapter


def _is_release(path: str) -> bool:
    settings = peek_config(path)
    is_arc = settings is not None and {"embedder_args", "bridge_args"} <= set(settings)
    return is_arc and os.path.isfile(os.path.join(path, "model.safetensors"))


ARC = PublishedFamily(
    name="arc",
    title="ARC-Encoder",
    method="cocom",
    convert=convert_arc,
    detect=_is_release,
    hub_ids=("kyutai/ARC8_Encoder_Llama", "kyutai/ARC8_Encoder_Mistral", "kyutai/ARC8_Encoder_multi"),
    base_models=ARC_BASES,
    paper="Pilchen et al. 2025, ARC-Encoder: learning compressed text representations for large language models "
    "(arXiv:2510.20535)",
    license="cc-by-4.0",
    license_text="CC-BY-4.0 for the weights (the release's README; its code is Apache-2.0), plus the terms of Llama "
    "3.2, from which the encoder was trained; the decoder's own licence applies to it",
    looks_for="a folder with model.safetensors and a config.json with embedder_args and bridge_args",
)
