"""Import a published checkpoint of the PISCO lineage (CLaRa) as a peft_ctx COCOM adapter.

The release is a folder written by its ``save_pretrained``: ``config.json`` (``model_type`` "CLaRa"), ``adapters.pth``
(the compressor's and the decoder's LoRA, ``encoder_adapter`` and ``decoder_adapter``) and
``decoder_first_last_layers.pth`` (the decoder's embedding and head, resized for the added tokens). Both ``.pth``
files hold tensors only and are read with ``torch.load(weights_only=True)``. The added tokens' rows become the
adapter's memory, <ENC>, <AE> and <SEP> embeddings; the vocabulary is not resized.

    python -m peft_ctx.convert CLaRa-7B-Instruct/compression-16 OUT --base_model mistralai/Mistral-7B-Instruct-v0.2

The adapter compresses and prompts as the release's code does (``tests/fixtures/published`` holds what that code
gives on a tiny checkpoint): ``<ENC><s>passage</s>`` truncated at doc_max_length + 3 tokens and placed as if
left-padded to that length, doc_max_length // compr_rate memory tokens per passage read from the last hidden states
with the compressor's LoRA, and the decoder's chat prompt with each passage's embeddings followed by <SEP>.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Optional

import torch
from safetensors.torch import save_file

from ..checkpoints import load_tensor_file
from ..converting import PublishedFamily, peek_config, refuse_existing_adapter, release_config
from .config import CocomConfig

# The release's decoder prompt (its _blend_standard_prompt), rendered through the decoder's chat template.
CLARA_SYSTEM_PROMPT = (
    "You are a helpful assistant. Your task is to extract relevant information from provided documents and to answer "
    "to questions as briefly as possible."
)
CLARA_TEMPLATE = "Background:\n{context}\n\nQuestion:{question}"
CLARA_BASE = "mistralai/Mistral-7B-Instruct-v0.2"
# How the PISCO lineage's code (CLaRa's) compresses and prompts, as CocomConfig fields: <ENC><s>passage</s> truncated
# as one sequence and placed as if left-padded, <SEP> after each passage's memory tokens, a compressor LoRA apart from
# the decoder's, nothing between passages. (Its fixed memory_tokens_per_passage comes from each checkpoint.)
PISCO_LINEAGE = dict(
    passage_special_tokens=True,
    passage_truncation="sequence",
    compressor_positions="left_padded",
    passage_end_token=True,
    separate_compressor_adapter=True,
    passage_separator="",
)
_ADAPTERS = {"decoder_adapter": "", "encoder_adapter": ".compressor"}  # ours: the decoder's LoRA, the companion
_QUERY_ADAPTER = {"query_reasoner_adapter": ".query"}  # end-to-end checkpoints: the LoRA that compresses questions
_LORA_KEY = re.compile(r"^(.*)\.(lora_A|lora_B)\.weight$")
_SKIPS_DECODER = ("stage1_2", "stage2_reasoning")  # the stages whose loading skips the stored decoder_adapter


def convert_clara(
    source: str,
    output_dir: str,
    base_model_name_or_path: Optional[str] = None,
    overwrite: bool = False,
    **config_overrides,
) -> CocomConfig:
    """Write a peft_ctx COCOM adapter from a CLaRa release folder (compression pretraining / instruction tuning).

    Args:
        source: the folder with config.json, adapters.pth and decoder_first_last_layers.pth.
        output_dir: folder for the adapter; an adapter already there is only replaced with ``overwrite=True``.
        base_model_name_or_path: the decoder (default: the config's ``decoder_model_name`` when it is a Hub id, else
            Mistral-7B-Instruct-v0.2, CLaRa's published decoder).
        config_overrides: further ``CocomConfig`` fields.
    """
    refuse_existing_adapter(output_dir, overwrite)
    settings = _read_config(source)
    n_memory = int(settings["doc_max_length"]) // int(settings["compr_rate"])
    adapters = _read_pickled(source, "adapters.pth")
    layers = _read_pickled(source, "decoder_first_last_layers.pth")
    embed_keys = [key for key in layers if key.endswith("embed_tokens.weight")]
    if len(embed_keys) != 1:
        raise ValueError(
            f"{source}/decoder_first_last_layers.pth holds {sorted(layers)}; expected one '...embed_tokens.weight' "
            "(the decoder's resized input embedding)."
        )
    embedding = layers[embed_keys[0]].float()  # [base vocab + added, hidden]
    ids = _added_token_ids(source, settings, n_memory, embedding.shape[0])
    roles = {**_ADAPTERS, **(_QUERY_ADAPTER if set(_QUERY_ADAPTER) <= set(adapters) else {})}
    unexpected = sorted(set(adapters) - set(roles))
    missing = sorted(set(_ADAPTERS) - set(adapters))
    if missing or unexpected:
        raise ValueError(
            f"{source}/adapters.pth holds the LoRAs {sorted(adapters)}; a CLaRa checkpoint has "
            f"{sorted(_ADAPTERS)}, and an end-to-end one also {sorted(_QUERY_ADAPTER)} (missing {missing}, "
            f"unexpected {unexpected})."
        )
    embed_module = embed_keys[0][: -len(".weight")]
    # Its from_pretrained skips the stored decoder_adapter of a stage1_2 / stage2_reasoning checkpoint unless the
    # config says pure_inference, and decodes with a fresh one (LoRA B = 0): the plain decoder. So does the adapter.
    decoder_lora_used = bool(settings.get("pure_inference")) or settings.get("training_stage") not in _SKIPS_DECODER
    if not decoder_lora_used:
        warnings.warn(
            f"{source}/config.json has training_stage={settings.get('training_stage')!r} without pure_inference: "
            "the release's own loading leaves its decoder_adapter unused, so the converted adapter decodes with "
            'the plain decoder too (its decoder LoRA is written as zeros). Add "pure_inference": true to a copy '
            "of config.json to convert it with the stored decoder LoRA.",
            stacklevel=2,
        )
    state, targets = {}, set()
    for adapter, role in roles.items():
        for key, tensor in adapters[adapter].items():
            if key in layers:
                # peft >= 0.12 saves a resized embedding / head with every adapter (CLaRa's pinned peft 0.17 does);
                # loading ignores them and the decoder reads decoder_first_last_layers.pth's: they must agree.
                if not (isinstance(tensor, torch.Tensor) and torch.equal(tensor, layers[key])):
                    raise ValueError(
                        f"{source}/adapters.pth[{adapter!r}] holds a {key!r} that differs from "
                        "decoder_first_last_layers.pth's; the release's loading reads the latter, so this checkpoint "
                        "is not one peft_ctx can convert exactly."
                    )
                continue
            match = _LORA_KEY.match(key)
            if match is None or not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
                raise ValueError(
                    f"{source}/adapters.pth[{adapter!r}] has {key!r} ({getattr(tensor, 'shape', type(tensor))}); "
                    "expected LoRA matrices named '<module>.lora_A.weight' / '<module>.lora_B.weight'."
                )
            targets.add(match.group(1).rsplit(".", 1)[-1])
            tensor = tensor.float() if adapter != "decoder_adapter" or decoder_lora_used else torch.zeros_like(tensor)
            state[f"base_model.model.{match.group(1)}.{match.group(2)}{role}.weight"] = tensor.float().contiguous()
    rank = int(settings["lora_r"])
    for key, tensor in state.items():
        if ".lora_A" in key and tensor.shape[0] != rank:
            raise ValueError(f"{key} has rank {tensor.shape[0]} but config.json says lora_r={rank}.")
    prefix = f"base_model.model.{embed_module}.ctx_modules"
    state[f"{prefix}.memory"] = embedding[ids["memory"]].contiguous()  # [n_memory, hidden]
    for name in ("enc", "ae", "sep"):
        state[f"{prefix}.{name}_marker"] = embedding[ids[name]].unsqueeze(0).contiguous()  # [1, hidden]

    config = CocomConfig(
        compression_rate=int(settings["compr_rate"]),
        memory_tokens_per_passage=n_memory,
        max_passage_tokens=int(settings["doc_max_length"]) + 2,  # BOS passage EOS; <ENC> is the adapter's own
        **PISCO_LINEAGE,
        query_adapter=len(roles) > len(_ADAPTERS),  # CompressedIndex.search ranks passages by memory states
        lora_r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.1,
        lora_target_modules=sorted(targets),
        base_model_name_or_path=base_model_name_or_path or _hub_decoder(settings),
        base_hidden_size=int(embedding.shape[1]),
        **{
            "prompt_template": CLARA_TEMPLATE,
            "system_prompt": CLARA_SYSTEM_PROMPT,
            "use_chat_template": True,
            **config_overrides,
        },
    )
    os.makedirs(output_dir, exist_ok=True)
    config.save_pretrained(output_dir)
    save_file(state, os.path.join(output_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    return config


def _read_config(source: str) -> dict:
    path = os.path.join(source, "config.json")
    settings = release_config(source, ("doc_max_length", "compr_rate", "lora_r"), "CLaRa", "e.g. compression-16/")
    if settings.get("compr_model_name") is not None:
        raise ValueError(
            f"{path} names a separate compressor model (compr_model_name={settings['compr_model_name']!r}); only "
            "checkpoints where the decoder compresses (compr_model_name null) are converted."
        )
    if not settings.get("lora", False):
        raise ValueError(f"{path} has lora={settings.get('lora')!r}; CLaRa's releases keep LoRA adapters (lora true).")
    if int(settings["doc_max_length"]) % int(settings["compr_rate"]):
        raise ValueError(
            f"{path}: doc_max_length={settings['doc_max_length']} is not a multiple of compr_rate="
            f"{settings['compr_rate']}."
        )
    return settings


def _read_pickled(source: str, name: str) -> dict:
    path = os.path.join(source, name)
    if not os.path.isfile(path):
        raise ValueError(
            f"{source} has no {name}; a CLaRa checkpoint folder holds config.json, adapters.pth and "
            "decoder_first_last_layers.pth."
        )
    loaded = load_tensor_file(path)
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds a {type(loaded).__name__}; expected a dict of tensors.")
    return loaded


def _added_token_ids(source: str, settings: dict, n_memory: int, rows: int) -> dict:
    """The rows of the memory tokens, <AE>, <ENC> and <SEP>: from the saved tokenizer when there is one, else in the
    order the release's code adds them (after the base vocabulary: the memory tokens, <AE>, <ENC>, <SEP>)."""
    numbered = bool(settings.get("different_mem_tokens", False))
    names = [f"<MEM{i}>" for i in range(n_memory)] if numbered else ["<MEM>"]
    found = _tokenizer_ids(source)
    if found is not None:
        wanted = names + ["<AE>", "<ENC>", "<SEP>"]
        absent = [token for token in wanted if token not in found]
        if absent:
            raise ValueError(
                f"The tokenizer in {source} lacks the added tokens {absent}; it is not this checkpoint's."
            )
        index = {token: found[token] for token in wanted}
    else:
        first = rows - len(names) - 3
        index = {token: first + i for i, token in enumerate(names + ["<AE>", "<ENC>", "<SEP>"])}
    memory = [index[token] for token in names] * (1 if numbered else n_memory)
    out = {"memory": memory, "ae": index["<AE>"], "enc": index["<ENC>"], "sep": index["<SEP>"]}
    if max(memory + [out["ae"], out["enc"], out["sep"]]) >= rows:
        raise ValueError(
            f"The added tokens' ids reach {max(index.values())} but the embedding has {rows} rows; the tokenizer and "
            "decoder_first_last_layers.pth are not from the same checkpoint."
        )
    return out


def _tokenizer_ids(source: str) -> Optional[dict[str, int]]:
    path = os.path.join(source, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        added = json.load(f).get("added_tokens", [])
    return {entry["content"]: int(entry["id"]) for entry in added}


def _hub_decoder(settings: dict) -> str:
    name = settings.get("decoder_model_name")
    if isinstance(name, str) and re.match(r"^[\w.-]+/[\w.-]+$", name) and not os.path.exists(name):
        return name
    return CLARA_BASE  # the releases record a training machine's path


def _is_release(path: str) -> bool:
    settings = peek_config(path)
    is_clara = settings is not None and settings.get("model_type") == "CLaRa"
    return is_clara and os.path.isfile(os.path.join(path, "adapters.pth"))


CLARA = PublishedFamily(
    name="clara",
    title="CLaRa",
    method="cocom",
    convert=convert_clara,
    detect=_is_release,
    hub_ids=("apple/CLaRa-7B-Base", "apple/CLaRa-7B-Instruct", "apple/CLaRa-7B-E2E"),
    base_models=(CLARA_BASE,),
    paper="He et al. 2025, CLaRa: Bridging Retrieval and Generation with Continuous Latent Reasoning "
    "(arXiv:2511.18659)",
    license="other",
    license_text="Apple's licence for the release (the Hub tags it apple-amlr; read the release's LICENSE before "
    "use); the base model's own licence applies to it",
    looks_for="a folder with adapters.pth and a config.json of model_type 'CLaRa'",
)
