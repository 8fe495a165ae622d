"""Memory and time planner for training each method at the papers' scale (Mistral-7B, 1 and 8 GPUs).

    python -m benchmarks.planner                  # prints the tables, writes benchmarks/results/planner.{json,md}
    python -m benchmarks.planner --out /tmp/plan

Computed from the model config, not guessed:
- the methods: every registered method's paper rows (``peft_ctx.harness.rows``, ``MethodRows.paper``);
- parameters: the base and every adapter are built on the meta device from the config and counted exactly
  (an encoder a row trains, COCOM-light's BERT-base, likewise from BertConfig());
- tokens per training example: one paper-sized example (5 passages of 128 tokens, a 32-token question and answer)
  through a tiny model with the row's adapter, counting the tokens that enter the first decoder layer (the
  compressor's passes included, where the LLM compresses);
- static memory per GPU: bf16 base weights (whole under DDP, 1/n under FSDP2 / ZeRO-3) plus the fp32 adapter with
  its gradient and AdamW's two moments (16 bytes per trainable parameter, sharded likewise);
- activations: bytes saved for backward per token per decoder layer, fitted as ``a * hidden + b * intermediate``
  from tiny llama models trained here one step with every method (``saved_tensors_hooks`` on the CPU, counting each
  saved storage once, parameters excluded; the difference between 4 and 2 layers isolates one layer), then checked
  against a third tiny config the fit never saw (the "check" rows); with gradient checkpointing, only each layer's
  input (``hidden`` values per token) is kept plus one layer recomputed at a time;
- xRAG's encoding of 2M passages x 180 tokens by SFR-Embedding-Mistral: 2 x parameters x tokens FLOPs (checked
  against torch's FlopCounterMode on a tiny encoder), at a stated sustained rate.

The per-layer fit holds for the same attention kernel (sdpa, whose backward saves O(sequence) per head on GPUs too)
and the same dtype scaling (fp32 bytes here, halved for bf16 activations).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, LlamaConfig, MistralConfig

import peft_ctx
from peft_ctx.harness import assets
from peft_ctx.harness.rows import Entry, Resources, encoder_for, paper_entries

HERE = os.path.dirname(os.path.abspath(__file__))
# Mistral-7B-Instruct-v0.2's config (its config.json); SFR-Embedding-Mistral has the same decoder (no LM head).
MISTRAL_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=32768, tie_word_embeddings=False,
)  # fmt: skip
RETRIEVER_DIM = 4096
# The papers' training examples, in tokens: 5 passages of 128 tokens (xRAG: a vector each; SPRING: as text beside its
# virtual tokens; COCOM: compressed at xi = 16), a 32-token question and a 32-token answer.
PASSAGES, PASSAGE_TOKENS, QUESTION_TOKENS, ANSWER_TOKENS = 5, 128, 32, 32
# Sustained bf16 rate assumed for encoding: 40% of an A100's 312 TFLOP/s peak.
SUSTAINED_FLOPS = 0.4 * 312e12
N_PASSAGES, CHUNK_TOKENS = 2_000_000, 180


def paper_rows() -> dict[str, Entry]:
    """The rows planned: every registered method's paper-scale training rows, by name."""
    return {entry.name: entry for _, entry in paper_entries()}


def paper_resources(retriever_dim: int) -> Resources:
    """What a paper row is built from at scale: a ``retriever_dim``-wide retriever and BERT-base by config."""
    return Resources(
        encoder_name_or_path="google-bert/bert-base-uncased", encoder_config=BertConfig().to_dict(),
        retriever_hidden_size=retriever_dim,
    )  # fmt: skip


def count_parameters(config_kwargs: dict, retriever_dim: int) -> dict:
    """Exact parameter counts of the base and of each row's adapter (trainable), built on the meta device."""
    config = MistralConfig(**config_kwargs)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    counts = {"base": sum(p.numel() for p in base.parameters())}
    resources = paper_resources(retriever_dim)
    for name, row in paper_rows().items():
        with torch.device("meta"):
            model = get_peft_model(AutoModelForCausalLM.from_config(config), row.make_config(resources))
        counts[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


def _words(tokenizer, n: int, word: str) -> str:
    """A text of exactly ``n`` tokens of ``tokenizer``."""
    ids = tokenizer((word + " ") * (2 * n), add_special_tokens=False).input_ids[:n]
    text = tokenizer.decode(ids)
    assert len(tokenizer(text, add_special_tokens=False).input_ids) == n, text
    return text


class LayerTokens:
    """Counts the tokens that enter a decoder layer (batch x sequence of each call) while it is in a ``with``."""

    def __init__(self, layer: torch.nn.Module):
        self.layer, self.tokens = layer, 0

    def __enter__(self):
        def count(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # [batch, sequence, hidden]
            self.tokens += hidden.shape[0] * hidden.shape[1]

        self.handle = self.layer.register_forward_pre_hook(count, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _first_layer(model) -> torch.nn.Module:
    return model.get_base_model().model.layers[0]


def workload_tokens(row: Entry, tokenizer, encoder, encoder_dir) -> int:
    """Tokens through the decoder layers for one paper-sized training example: counted on a tiny llama with the row's
    adapter (the passages' compression included, where the LLM compresses)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    resources = Resources(encoder_name_or_path=encoder_dir, encoder=encoder)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), row.make_config(resources))
    passages = [[_words(tokenizer, PASSAGE_TOKENS, f"p{j}") for j in range(PASSAGES)]]
    inputs = _inputs(model, tokenizer, encoder, passages, _words(tokenizer, QUESTION_TOKENS, "q"),
                     _words(tokenizer, ANSWER_TOKENS, "a"))  # fmt: skip
    with LayerTokens(_first_layer(model)) as counter, torch.no_grad():
        model(**inputs)
    return counter.tokens


def _inputs(model, tokenizer, encoder, passages, question: str, answer: str) -> dict:
    return peft_ctx.prepare_inputs(
        model, tokenizer, [question], passages, answers=[answer], encoder=encoder_for(model, encoder)
    )


# ---- measuring activations on tiny models --------------------------------------------------------------------------
@dataclass
class Tiny:
    hidden: int
    intermediate: int


def saved_bytes(model, inputs) -> tuple[int, int]:
    """(bytes autograd saves for backward in one training step, tokens through the decoder layers: the decoder's,
    plus the compressor's when the LLM compresses, as COCOM's does)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return tensor

    model.train()
    with LayerTokens(_first_layer(model)) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs, use_cache=False).loss
    loss.backward()
    return total, counter.tokens


def per_layer_bytes_per_token(row: Entry, tiny: Tiny, tokenizer, encoder, encoder_dir) -> float:
    """Bytes saved per token by one decoder layer: (4 layers - 2 layers) / 2, per token."""
    values = []
    for layers in (2, 4):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=tiny.hidden, intermediate_size=tiny.intermediate,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        model = get_peft_model(base, row.make_config(Resources(encoder_name_or_path=encoder_dir, encoder=encoder)))
        words = " ".join(f"w{i}" for i in range(40))
        passages = [[f"{words} passage {j}." for j in range(3)]]
        inputs = _inputs(
            model, tokenizer, encoder, passages, "What is the answer to the question?", "the answer is here"
        )
        total, tokens = saved_bytes(model, inputs)
        values.append((total, tokens))
    (small, tokens), (large, _) = values
    return (large - small) / 2 / tokens


def fit_activations(tokenizer, encoder, encoder_dir) -> dict:
    """Per row: bytes per token per layer = a * hidden + b * intermediate (fp32), fitted on two tiny configs and
    checked on a third."""
    fits = {}
    train_configs, check = (Tiny(64, 128), Tiny(64, 512)), Tiny(128, 320)
    for method, row in paper_rows().items():
        (m1, m2) = [per_layer_bytes_per_token(row, t, tokenizer, encoder, encoder_dir) for t in train_configs]
        matrix = torch.tensor([[float(t.hidden), float(t.intermediate)] for t in train_configs], dtype=torch.float64)
        a, b = torch.linalg.solve(matrix, torch.tensor([m1, m2], dtype=torch.float64)).tolist()
        measured = per_layer_bytes_per_token(row, check, tokenizer, encoder, encoder_dir)
        predicted = a * check.hidden + b * check.intermediate
        fits[method] = {"a": a, "b": b, "check_measured": measured, "check_predicted": predicted}
    return fits


def encoding_flops_check(encoder) -> dict:
    """FlopCounterMode on the (tiny) encoder against 2 x parameters x tokens, the rule used for SFR."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = encoder.tokenizer(["word " * 170] * 4, return_tensors="pt", truncation=True, max_length=180)
    params = sum(p.numel() for n, p in encoder.model.named_parameters() if "embeddings" not in n)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder.model(**batch)
    tokens = int(batch["attention_mask"].sum())
    return {"measured": counter.get_total_flops(), "rule": 2 * params * tokens, "tokens": tokens}


# ---- the plan ------------------------------------------------------------------------------------------------------
def plan(counts: dict, fits: dict, workloads: dict, config_kwargs: dict, batch_per_gpu: int = 8) -> list[dict]:
    h, i, layers = config_kwargs["hidden_size"], config_kwargs["intermediate_size"], config_kwargs["num_hidden_layers"]
    gib = 1024**3
    rows = []
    for method, fit in fits.items():
        tokens = workloads[method] * batch_per_gpu
        per_layer = (fit["a"] * h + fit["b"] * i) / 2 * tokens  # bf16: half the fp32 bytes
        full = per_layer * layers
        checkpointed = tokens * h * 2 * layers + per_layer  # layer inputs kept + one layer recomputed
        trainable = counts[method]
        for gpus, engine in ((1, "single GPU"), (8, "DDP x 8"), (8, "FSDP2 / ZeRO-3 x 8")):
            shard = gpus if engine.startswith("FSDP") else 1
            weights = 2 * counts["base"] / shard
            adapter = 16 * trainable / shard
            rows.append(
                {
                    "method": method, "gpus": gpus, "engine": engine, "adapter_params": trainable,
                    "weights_gib": weights / gib, "adapter_optimizer_gib": adapter / gib,
                    "activations_gib": full / gib, "activations_checkpointed_gib": checkpointed / gib,
                    "total_gib": (weights + adapter + full) / gib,
                    "total_checkpointed_gib": (weights + adapter + checkpointed) / gib,
                    "tokens_per_gpu_step": tokens,
                }
            )  # fmt: skip
    return rows


def markdown(counts, fits, workloads, rows, flops_check, encode) -> str:
    measured = ", ".join(f"{name} {tokens}" for name, tokens in workloads.items())
    lines = [
        "# Training plan: Mistral-7B, bf16 base, fp32 adapter + AdamW, batch 8 per GPU",
        "",
        f"Base parameters: {counts['base'] / 1e9:.2f} B (exact, from the config on the meta device). Tokens through "
        f"the decoder layers per training example ({PASSAGES} passages x {PASSAGE_TOKENS} tokens, {QUESTION_TOKENS}-"
        f"token question and answer, counted on a tiny model with each adapter): {measured}. Per GPU:",
        "",
        "| method | adapter params | GPUs | engine | weights GiB | adapter+grad+Adam GiB | activations GiB "
        "(no ckpt / ckpt) | total GiB (no ckpt / ckpt) |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['adapter_params'] / 1e6:.2f} M | {r['gpus']} | {r['engine']} | "
            f"{r['weights_gib']:.1f} | {r['adapter_optimizer_gib']:.2f} | {r['activations_gib']:.1f} / "
            f"{r['activations_checkpointed_gib']:.1f} | {r['total_gib']:.1f} / {r['total_checkpointed_gib']:.1f} |"
        )
    lines += [
        "",
        "Activations: fitted bytes per token per decoder layer (fp32, tiny llama, sdpa) and the check on a held-out "
        "tiny config (hidden 128, intermediate 320):",
        "",
        "| method | a (x hidden) | b (x intermediate) | check: predicted | check: measured |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, fit in fits.items():
        lines.append(
            f"| {method} | {fit['a']:.2f} | {fit['b']:.2f} | {fit['check_predicted']:.0f} | "
            f"{fit['check_measured']:.0f} |"
        )
    lines += [
        "",
        f"xRAG encoding, {N_PASSAGES / 1e6:.0f}M passages x {CHUNK_TOKENS} tokens with SFR-Embedding-Mistral "
        f"({encode['params'] / 1e9:.2f} B parameters): {encode['flops']:.2e} FLOPs = {encode['hours_1']:.1f} h on 1 "
        f"GPU, {encode['hours_8']:.1f} h on 8 (each rank encodes its share), at a sustained "
        f"{SUSTAINED_FLOPS / 1e12:.0f} TFLOP/s (40% of an A100's bf16 peak). The 2 x parameters x tokens rule vs "
        f"FlopCounterMode on the tiny encoder: {flops_check['rule']:.3g} vs {flops_check['measured']:.3g} FLOPs. "
        f"Index: {N_PASSAGES * RETRIEVER_DIM * 2 / 1e9:.1f} GB in float16 "
        f"({N_PASSAGES * RETRIEVER_DIM * 8 / 1e9:.0f} GB as float64 lists).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_tokenizer_dir())
    encoder_dir = assets.minilm_dir()
    encoder = peft_ctx.Encoder(encoder_dir)
    counts = count_parameters(MISTRAL_7B, RETRIEVER_DIM)
    fits = fit_activations(tokenizer, encoder, encoder_dir)
    workloads = {name: workload_tokens(row, tokenizer, encoder, encoder_dir) for name, row in paper_rows().items()}
    rows = plan(counts, fits, workloads, MISTRAL_7B)
    flops_check = encoding_flops_check(encoder)
    retriever = counts["base"] - MISTRAL_7B["vocab_size"] * MISTRAL_7B["hidden_size"]  # no LM head
    flops = 2 * retriever * N_PASSAGES * CHUNK_TOKENS
    encode = {
        "params": retriever, "flops": flops, "hours_1": flops / SUSTAINED_FLOPS / 3600,
        "hours_8": flops / SUSTAINED_FLOPS / 3600 / 8,
    }  # fmt: skip
    result = {"parameters": counts, "activation_fits": fits, "workload_tokens": workloads, "plan": rows}
    result["flops_check"] = flops_check
    result["encode"] = encode
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "planner.json"), "w") as f:
        json.dump(result, f, indent=2)
    text = markdown(counts, fits, workloads, rows, flops_check, encode)
    with open(os.path.join(args.out, "planner.md"), "w") as f:
        f.write(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
