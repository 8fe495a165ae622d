"""Every shipped YAML config parses with its script's own parser; the *_paper.yaml ones carry the papers' settings."""

from __future__ import annotations

import os

import pytest
import yaml
from trl import TrlParser

from peft_ctx.scripts import ModelArguments
from peft_ctx.training import ContextSFTConfig
from tests.helpers import load_train_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f for f in os.listdir(os.path.join(REPO, "train", "configs")) if f.endswith(".yaml"))
# The papers' numbers (shared/notes/methods.md); a batch is per device x 8 GPUs.
PAPER = {
    "xrag_stage1_paper.yaml": {"learning_rate": 6e-3, "batch": 384, "max_length": 336, "num_train_epochs": 1},
    "xrag_stage2_paper.yaml": {
        "learning_rate": 2e-5, "batch": 64, "max_length": 1024, "a_nll": 1.0, "a_kl": 2.0, "kl_temperature": 1.0,
        "num_train_epochs": 1,
    },
    "spring_paper.yaml": {
        "learning_rate": 1e-4, "batch": 64, "max_length": 800, "num_train_epochs": 3, "num_virtual_tokens": 50,
        "max_passages": 5, "min_passages": 1, "use_chat_template": False,
    },
    "cocom_pretrain_paper.yaml": {
        "learning_rate": 1e-4, "num_train_epochs": 1, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.1,
        "max_passage_tokens": 128, "autoencode_ratio": 0.5,
    },
    "cocom_qa_paper.yaml": {"learning_rate": 1e-4, "num_train_epochs": 1, "top_k": 5},
    "cocom_clara_qa_paper.yaml": {
        "learning_rate": 1e-4, "batch": 128, "num_train_epochs": 1, "top_k": 5, "lora_r": 16, "lora_alpha": 32,
        "lora_dropout": 0.1, "compression_rate": 16, "memory_tokens_per_passage": 16, "pisco_lineage": True,
        "max_grad_norm": 1.0,
    },
    "cocom_arc_pretrain_paper.yaml": {
        "learning_rate": 1e-5, "batch": 128, "max_steps": 80000, "warmup_steps": 1000, "weight_decay": 0.1,
        "adam_beta2": 0.95, "compression_rate": 8, "compressor_layers": 26, "bridge_hidden_size": 2048,
        "max_passage_tokens": 256, "lora_r": 0, "autoencode_ratio": 0.2, "compressor_type": "arc",
    },
}  # fmt: skip


def parse(name: str, monkeypatch):
    module = load_train_script(name.removesuffix(".yaml").split("_")[0], monkeypatch)
    parser = TrlParser((module.ScriptArguments, ModelArguments, ContextSFTConfig))
    return parser.parse_args_and_config(args=["--config", os.path.join(REPO, "train", "configs", name)])


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_parses_and_leaves_device_and_precision_to_the_machine(name, monkeypatch):
    with open(os.path.join(REPO, "train", "configs", name)) as f:
        keys = set(yaml.safe_load(f))
    assert not keys & {"use_cpu", "bf16", "fp16"}, "the config would pin a device or a precision"
    script_args, loading, training_args = parse(name, monkeypatch)
    assert training_args.output_dir and loading.dtype in ("auto", "bf16")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_the_paper_configs_carry_the_papers_settings(name, monkeypatch):
    script_args, loading, training_args = parse(name, monkeypatch)
    for key, value in PAPER[name].items():
        if key == "batch":
            assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * 8 == value
            continue
        got = getattr(script_args, key, getattr(training_args, key, None))
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, (key, got)
    assert loading.dtype == "bf16" and training_args.gradient_checkpointing


@pytest.mark.parametrize(("name", "official"), [("official_train", True), ("official_eval", True), (None, False)])
def test_the_xrag_script_names_the_official_prompts(name, official, monkeypatch):
    from peft_ctx.xrag.config import OFFICIAL_EVAL_TEMPLATE, OFFICIAL_TRAIN_TEMPLATE

    module = load_train_script("xrag", monkeypatch)
    args = module.ScriptArguments(
        model_name_or_path="m", encoder_name_or_path="e", dataset_name="d", prompt_template=name
    )
    expected = {"official_train": OFFICIAL_TRAIN_TEMPLATE, "official_eval": OFFICIAL_EVAL_TEMPLATE}.get(name)
    assert args.prompt_template == expected
    assert args.official_prompt is official and args.use_chat_template is not official  # plain text, as published
