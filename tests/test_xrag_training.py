"""xRAG training with trl, the train/xrag.py script, and the official-checkpoint converter."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import peft_ctx
from peft_ctx.convert import main as convert_main
from peft_ctx.training import ContextDataCollator, ContextSFTConfig
from peft_ctx.xrag.convert import convert_official_xrag
from peft_ctx.xrag.recipe import XRAGParaphraseCollator
from tests.helpers import RETRIEVER_DIM, changed, clone, cpu_sft_config, sft_trainer, snapshot, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qa_rows(n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    colours = ["blue", "green", "red", "black"]
    return [
        {
            "question": f"What colour is item {i}?",
            "answer": colours[i % 4],
            "contexts": [f"Item {i} is {colours[i % 4]}."],
            "retrieval_embeds": (torch.randn(1, RETRIEVER_DIM, generator=generator) + 3 * (i % 4)).tolist(),
        }
        for i in range(n)
    ]


def make_trainer(model, tokenizer, tmp_path, rows, *, a_kl=0.0, task="qa", steps=12, lr=3e-2):
    args = cpu_sft_config(tmp_path, steps, lr, batch_size=4, a_kl=a_kl)
    collator = ContextDataCollator(
        model.active_peft_config,
        tokenizer,
        task=task,
        context_column="retrieval_embeds",
        text_column="contexts" if task == "qa" else "text",
        distill=a_kl > 0,
    )
    return sft_trainer(model, args, rows, collator, tokenizer)


def objective(trainer, rows):
    """The trainer's own loss (NLL, plus KL when distilling) over all rows at once, without gradients."""
    trainer.model.eval()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, trainer.data_collator(rows)).item()


@pytest.mark.parametrize("a_kl", [0.0, 2.0])
def test_training_lowers_the_loss_and_changes_only_the_projector(tokenizer, tmp_path, a_kl):
    base = tiny_model("llama", tokenizer, initializer_range=0.2)
    model = get_peft_model(base, peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM))
    before = snapshot(model)
    rows = qa_rows()
    trainer = make_trainer(model, tokenizer, tmp_path, rows, a_kl=a_kl, steps=20, lr=1e-2)
    loss_before = objective(trainer, rows)
    trainer.train()
    loss_after = objective(trainer, rows)
    assert loss_after < loss_before - 1.0, (loss_before, loss_after)
    logs = [entry for entry in trainer.state.log_history if "nll" in entry]
    assert len(logs) >= 20
    assert changed(before, model) == {n for n in before if ".ctx_modules.default.projector." in n}
    if a_kl:
        assert all(entry["kl"] >= 0 for entry in logs) and any(entry["kl"] > 0 for entry in logs)
    else:
        assert all("kl" not in entry for entry in logs)


def test_paraphrase_pretraining_puts_loss_on_the_document_tokens_only(tokenizer):
    base = tiny_model("llama", tokenizer)
    model = get_peft_model(base, peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM))
    rows = [{"text": "The lighthouse was built in 1874.", "retrieval_embeds": torch.randn(1, RETRIEVER_DIM).tolist()}]
    collator = XRAGParaphraseCollator(model.active_peft_config, tokenizer)
    batch = collator(rows)
    answer = batch["labels"][0][batch["labels"][0] != -100]
    assert tokenizer.decode(answer) == "The lighthouse was built in 1874.<|im_end|>"
    assert batch["context_mask"].sum() == 1
    with torch.no_grad():
        assert torch.isfinite(model(**{k: v for k, v in batch.items() if k != "labels"}).logits).all()


def test_distillation_teacher_reads_the_documents_as_text(tokenizer):
    base = tiny_model("llama", tokenizer)
    model = get_peft_model(base, peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM))
    collator = ContextDataCollator(
        model.active_peft_config, tokenizer, context_column="retrieval_embeds", distill=True
    )
    batch = collator(qa_rows(2))
    teacher_text = tokenizer.decode(batch["teacher_input_ids"][0])
    assert "Item 0 is blue." in teacher_text
    assert "Item 0 is blue." not in tokenizer.decode(batch["input_ids"][0])
    student_answer = batch["labels"][batch["labels"] != -100]
    teacher_answer = batch["teacher_labels"][batch["teacher_labels"] != -100]
    assert torch.equal(student_answer, teacher_answer)


def test_bad_loss_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match="a_kl=-1"):
        ContextSFTConfig(output_dir=str(tmp_path), a_kl=-1.0, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="nothing to train"):
        ContextSFTConfig(output_dir=str(tmp_path), a_nll=0.0, a_kl=0.0, use_cpu=True, report_to=[])


@pytest.fixture()
def tiny_base_dir(tokenizer, tmp_path):
    path = tmp_path / "base"
    tiny_model("llama", tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_training_on_from_an_adapter_of_another_method_is_refused(tiny_base_dir, tmp_path):
    from peft_ctx.scripts import build_adapter_model

    spring = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base_dir), peft_ctx.SpringConfig(num_virtual_tokens=2)
    )
    spring.save_pretrained(tmp_path / "spring")
    with pytest.raises(ValueError, match="SpringConfig adapter; give a XRAGConfig"):
        build_adapter_model(str(tiny_base_dir), str(tmp_path / "spring"), peft_ctx.XRAGConfig, peft_ctx.XRAGConfig)


def test_train_script_runs_both_stages_from_yaml(tiny_base_dir, encoder_dir, tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(REPO, "train"))
    import xrag as script

    monkeypatch.chdir(REPO)
    common = [
        "--model_name_or_path", str(tiny_base_dir), "--encoder_name_or_path", encoder_dir,
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--disable_tqdm", "true",
    ]  # fmt: skip
    stage1 = tmp_path / "stage1"
    script.main(["--config", "train/configs/xrag_stage1.yaml", "--output_dir", str(stage1), *common])
    stage2 = tmp_path / "stage2"
    script.main(
        ["--config", "train/configs/xrag_stage2.yaml", "--adapter_init", str(stage1), "--output_dir", str(stage2)]
        + common
    )
    config = json.loads((stage2 / "adapter_config.json").read_text())
    assert config["method"] == "xrag" and config["retriever_hidden_size"] == RETRIEVER_DIM
    assert config["retriever_pooling"] == "mean" and config["retriever_name_or_path"] == encoder_dir
    with pytest.raises(FileExistsError, match="already holds an adapter"):
        script.main(["--config", "train/configs/xrag_stage1.yaml", "--output_dir", str(stage1), *common])


# ---- converter -----------------------------------------------------------------------------------------------


def official_checkpoint(path, tokenizer, fmt="safetensors"):
    """A synthetic checkpoint in the official layout: full model state dict with the projector inside."""
    base = tiny_model("mistral", tokenizer)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(3)
    hidden = base.config.hidden_size
    projector = {
        "model.projector.projector.0.weight": torch.randn(hidden, RETRIEVER_DIM),
        "model.projector.projector.0.bias": torch.randn(hidden),
        "model.projector.projector.2.weight": torch.randn(hidden, hidden),
        "model.projector.projector.2.bias": torch.randn(hidden),
    }
    state.update(projector)
    path.mkdir()
    config = base.config.to_dict()
    config.update({"projector_type": "mlp2x_gelu", "retriever_hidden_size": RETRIEVER_DIM})
    (path / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        save_file(state, str(path / "model.safetensors"))
    else:
        torch.save(state, path / "pytorch_model.bin")
    return base, projector


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_converted_official_projector_gives_the_same_embeddings(tokenizer, tmp_path, fmt):
    base, projector = official_checkpoint(tmp_path / "official", tokenizer, fmt)
    convert_official_xrag(str(tmp_path / "official"), str(tmp_path / "adapter"))
    model = PeftModel.from_pretrained(clone(base), tmp_path / "adapter")
    vectors = torch.randn(2, RETRIEVER_DIM)
    expected = torch.nn.functional.gelu(
        vectors @ projector["model.projector.projector.0.weight"].T + projector["model.projector.projector.0.bias"]
    )
    expected = (
        expected @ projector["model.projector.projector.2.weight"].T + projector["model.projector.projector.2.bias"]
    )
    module = model.get_base_model().get_input_embeddings().ctx_modules["default"]
    torch.testing.assert_close(module(vectors), expected)
    assert peft_ctx.generate(model, tokenizer, ["q?"], [vectors], max_new_tokens=2)


def test_converter_cli_refuses_to_overwrite_and_pickled_objects(tokenizer, tmp_path):
    official_checkpoint(tmp_path / "official", tokenizer)
    convert_main(["xrag", str(tmp_path / "official"), str(tmp_path / "adapter")])
    with pytest.raises(FileExistsError):
        convert_main(["xrag", str(tmp_path / "official"), str(tmp_path / "adapter")])
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((tmp_path / "official" / "config.json").read_text())
    torch.save(
        {"model.projector.projector.0.weight": torch.zeros(1), "payload": object.__new__(Dataset)},
        evil / "pytorch_model.bin",
    )
    with pytest.raises(ValueError, match="will not unpickle"):
        convert_official_xrag(str(evil), str(tmp_path / "out"))


def test_converter_rejects_a_checkpoint_without_projector_settings(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="which every xRAG checkpoint's config has"):
        convert_official_xrag(str(tmp_path), str(tmp_path / "out"))


def rendered(model, tokenizer, question, contexts, encoder=None):
    """The prompt as text, each context slot shown as the official checkpoint's <xRAG> token."""
    inputs = peft_ctx.prepare_inputs(model, tokenizer, [question], [contexts], encoder=encoder)
    ids, slots = inputs["input_ids"][0].tolist(), inputs["context_mask"][0].tolist()
    text, run = "", []
    for token, slot in zip(ids, slots):
        if slot:
            text += tokenizer.decode(run) + "<xRAG>"
            run = []
        else:
            run.append(token)
    return text + tokenizer.decode(run)


def test_a_converted_official_checkpoint_renders_the_official_evaluation_prompt(tokenizer, tmp_path):
    base, _ = official_checkpoint(tmp_path / "official", tokenizer)
    convert_official_xrag(str(tmp_path / "official"), str(tmp_path / "adapter"))
    model = PeftModel.from_pretrained(clone(base), tmp_path / "adapter")
    # Written out from the official eval script: start prompt, blank line, "Background: ", the xRAG tokens joined by
    # spaces, blank line, "Question: {q}?", all inside [INST] ... [/INST], then " The answer is:".
    official = (
        "[INST] Refer to the background document and answer the questions:\n\nBackground: <xRAG>\n\n"
        "Question: who wrote the letter? [/INST] The answer is:"
    )
    assert rendered(model, tokenizer, "who wrote the letter", torch.randn(1, RETRIEVER_DIM)) == official
    two = rendered(model, tokenizer, "who wrote the letter", [torch.randn(2, RETRIEVER_DIM)])  # two chunks
    assert two == official.replace("<xRAG>", "<xRAG> <xRAG>")
    assert model.active_peft_config.chunk_tokens == 180


def test_a_long_document_gets_one_slot_per_chunk_and_a_chunk_tensor_is_a_document(tokenizer, encoder):
    model = get_peft_model(tiny_model("llama", tokenizer), peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM))
    long_doc = " ".join(f"word{i}" for i in range(300))
    pieces = encoder.chunk(long_doc, 40)
    assert len(pieces) > 2 and " ".join(pieces) == long_doc
    assert all(len(encoder.tokenizer(p).input_ids) <= 40 for p in pieces)  # special tokens included
    whole = peft_ctx.prepare_inputs(model, tokenizer, ["q?"], [[long_doc, "short"]], encoder=encoder)
    assert int(whole["context_mask"].sum()) == 2  # no chunking: one vector per document
    model.active_peft_config.chunk_tokens = 40
    chunked = peft_ctx.prepare_inputs(model, tokenizer, ["q?"], [[long_doc, "short"]], encoder=encoder)
    assert int(chunked["context_mask"].sum()) == len(pieces) + 1
    expected = torch.cat([encoder.encode(pieces), encoder.encode(["short"])])
    torch.testing.assert_close(chunked["retrieval_embeds"], expected)
    # A document given as its [n_chunks, d_r] chunk vectors takes one slot per chunk (it used to be refused).
    tensors = peft_ctx.prepare_inputs(model, tokenizer, ["q?"], [[torch.randn(3, RETRIEVER_DIM)]])
    assert int(tensors["context_mask"].sum()) == 3
    with pytest.raises(ValueError, match=r"\[n_chunks, d_r\] tensor"):
        peft_ctx.prepare_inputs(model, tokenizer, ["q?"], [[torch.randn(2, 3, RETRIEVER_DIM)]])
    with pytest.raises(ValueError, match="chunk_tokens=4; give a chunk size of at least 8"):
        peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM, chunk_tokens=4)


def test_the_offline_index_and_the_diagnostics_chunk_as_the_adapter_reads(tokenizer, encoder, tmp_path):
    model = get_peft_model(tiny_model("llama", tokenizer), peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM))
    method = peft_ctx.get_method("xrag")
    long_doc = " ".join(f"word{i}" for i in range(300))
    passages = [long_doc, "A short passage about the sea."]
    whole = method.index_passages(model, tokenizer, passages, encoder=encoder)
    assert [tuple(e.shape) for e in whole.entries] == [(RETRIEVER_DIM,)] * 2  # one vector per passage
    model.active_peft_config.chunk_tokens = 40
    chunked = method.index_passages(model, tokenizer, passages, encoder=encoder)
    n_chunks = len(encoder.chunk(long_doc, 40))
    assert [tuple(e.shape) for e in chunked.entries] == [(n_chunks, RETRIEVER_DIM), (1, RETRIEVER_DIM)]
    # The indexed entries read as the text does: the same slots and vectors as encoding on the fly.
    from_index = peft_ctx.prepare_inputs(model, tokenizer, ["q?"], [chunked.entries])
    on_the_fly = peft_ctx.prepare_inputs(model, tokenizer, ["q?"], [passages], encoder=encoder)
    assert int(from_index["context_mask"].sum()) == n_chunks + 1
    torch.testing.assert_close(from_index["retrieval_embeds"], on_the_fly["retrieval_embeds"])
    chunked.save(str(tmp_path / "index.safetensors"))
    assert tuple(peft_ctx.load_vectors(str(tmp_path / "index.safetensors"))[0].shape) == (n_chunks + 1, RETRIEVER_DIM)
    scores = method.diagnostics(model, tokenizer, passages, encoder=encoder)  # reads each passage's chunks
    assert {"paraphrase_nll", "paraphrase_nll_wrong_passage"} <= set(scores)
