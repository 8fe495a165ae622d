"""Publishing to and loading from the Hub, against real servers on 127.0.0.1 started and stopped here.

Uploads go to our own Hub-protocol server (tests/hub_server.py), which keeps every repository as a git repository
and serves downloads too. The tests marked by the ``olah`` fixture download through olah instead, a Hub mirror from
PyPI serving those same git repositories: an independent implementation of the download protocol. huggingface_hub,
PEFT and transformers are pointed at a server the way ``HF_ENDPOINT`` does it (``huggingface_hub.constants.ENDPOINT``
and the module-level ``HfApi``), so ``PeftModel.from_pretrained(base, "org/name")`` is exactly the path users run.
(olah answers a listing of a missing folder, which transformers asks for when loading a tokenizer, as "repository not
found", so loading tokenizers goes through our server.)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import types

import huggingface_hub
import pytest
import torch
from datasets import Dataset
from huggingface_hub import HfApi, ModelCard, constants
from peft import PeftModel, get_peft_model

import peft_ctx
from peft_ctx import hub as peft_hub
from peft_ctx.training import ContextDataCollator, ContextSFTConfig, ContextSFTTrainer
from tests.helpers import RETRIEVER_DIM, tiny_model
from tests.hub_server import HubServer, OlahServer

if shutil.which("git") is None:
    pytest.skip("the test Hub server keeps repositories in git: install git", allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "hf_PeftCtxTestToken7Qz3XwLm9RtY2bNc"
BASE_ID, ENCODER_ID = "org/tiny-llama", "org/tiny-encoder"
QUESTIONS = ["Who wrote the report?", "Where is the lighthouse?"]
EVAL = [
    {"dataset": "NQ conflicts", "dataset_id": "org/nq-conflicts", "split": "test", "n": 40, "metric": "accuracy"}
    | {"setting": setting, "score": score, "prompt_tokens": tokens, "seconds": seconds}
    for setting, score, tokens, seconds in [
        ("no_retrieval", 0.05, 40.0, 0.050),
        ("text_rag", 0.30, 240.0, 0.200),
        ("adapter", 0.20, 41.0, 0.060),
    ]
]


def point_at(patch: pytest.MonkeyPatch, url: str) -> None:
    """What HF_ENDPOINT=url does when set before huggingface_hub is imported."""
    patch.setattr(constants, "ENDPOINT", url)
    patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    # huggingface_hub's module-level functions (file_exists, model_info ...) share one HfApi made at import
    patch.setattr(huggingface_hub.hf_api.api, "endpoint", url)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Both servers, and huggingface_hub pointed at them with a token, online, with a private cache."""
    root = tmp_path_factory.mktemp("hub")
    server = HubServer(str(root / "git"), token=TOKEN, max_seconds=600).start()
    try:
        olah = OlahServer(str(root / "git"), str(root / "olah"), max_seconds=600).start()
    except Exception:
        server.stop()
        raise
    with pytest.MonkeyPatch.context() as patch:
        # The Makefile runs the suite with HF_HUB_OFFLINE=1; these tests alone talk to (local) servers.
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HUGGING_FACE_HUB_TOKEN"):
            patch.delenv(name, raising=False)
        patch.setenv("HF_TOKEN", TOKEN)
        patch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        point_at(patch, server.url)
        patch.setattr(constants, "HF_HUB_CACHE", str(root / "cache"))
        patch.setattr(constants, "HF_TOKEN_PATH", str(root / "no-stored-token"))
        try:
            yield types.SimpleNamespace(server=server, upload=server.url, olah=olah.url, root=root)
        finally:
            olah.stop()
            server.stop()


@pytest.fixture()
def olah(hub, monkeypatch):
    """Downloads in this test go through olah (pushes still go to our server: they name it as their endpoint)."""
    point_at(monkeypatch, hub.olah)
    return hub


def downloads_from_our_server(hub) -> int:
    return sum("/resolve/" in path for _, path in hub.server.requests)


@pytest.fixture(scope="module")
def published(hub, tokenizer, encoder_dir):
    """A tiny base model with its tokenizer, and a tiny sentence-transformers encoder, published on the Hub."""
    api = HfApi(endpoint=hub.upload)
    base_dir = hub.root / "base"
    tiny_model("llama", tokenizer).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    for repo_id, folder in ((BASE_ID, str(base_dir)), (ENCODER_ID, encoder_dir)):
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="upload")
    return hub


def vectors(counts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, RETRIEVER_DIM, generator=generator) for n in counts]


def xrag_model(tokenizer, seed=0):
    """A tiny xRAG adapter whose projector is not at its initial values (stands in for a trained one)."""
    model = get_peft_model(
        tiny_model("llama", tokenizer),
        peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM, retriever_pooling="mean", retriever_normalize=True),
    )
    shift(model, seed)
    return model


def shift(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def training_args(tmp_path, steps=2, **kwargs):
    return ContextSFTConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=steps,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        **kwargs,
    )


def train_xrag(tokenizer, tmp_path, steps=2):
    """A tiny xRAG adapter after a few real optimiser steps; returns (trainer, model)."""
    model = xrag_model(tokenizer)
    rows = [
        {"question": f"What colour is item {i}?", "answer": colour, "retrieval_embeds": v.tolist()}
        for i, (colour, v) in enumerate(zip(["blue", "green", "red", "black"], vectors([1, 1, 1, 1])))
    ]
    collator = ContextDataCollator(model.active_peft_config, tokenizer, context_column="retrieval_embeds")
    trainer = ContextSFTTrainer(
        model=model,
        args=training_args(tmp_path, steps),
        train_dataset=Dataset.from_list(rows),
        data_collator=collator,
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer, model


def logits(model, tokenizer, seed=1):
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, vectors([1, 2], seed))
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def remote_text(hub, repo_id, filename, revision="main"):
    path = HfApi(endpoint=hub.upload).hf_hub_download(repo_id, filename, revision=revision)
    with open(path) as f:
        return f.read()


def push(hub, model, repo_id, **kwargs):
    kwargs.setdefault("base_model", BASE_ID)
    kwargs.setdefault("retriever", ENCODER_ID)
    return peft_ctx.push_to_hub(model, repo_id, endpoint=hub.upload, **kwargs)


# ---- round trip -----------------------------------------------------------------------------------------------------


def test_trained_adapter_pushed_in_one_commit_loads_with_plain_peft_and_gives_identical_logits(
    olah, tokenizer, tmp_path
):
    hub = olah
    trainer, model = train_xrag(tokenizer, tmp_path)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), xrag_model(tokenizer).parameters()))
    expected = logits(model, tokenizer)
    info = push(hub, model, "org/xrag-roundtrip", training_config=trainer.args, eval_results=EVAL)
    # the repository's initial commit, then ONE commit with adapter, card and training configuration
    assert hub.server.commit_count("org/xrag-roundtrip") == 2
    files = set(HfApi(endpoint=hub.upload).list_repo_files("org/xrag-roundtrip"))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "training_config.json"} <= files
    assert info.oid == HfApi(endpoint=hub.upload).model_info("org/xrag-roundtrip").sha

    before = downloads_from_our_server(hub)
    loaded = PeftModel.from_pretrained(tiny_model("llama", tokenizer), "org/xrag-roundtrip", revision="main")
    assert downloads_from_our_server(hub) == before  # it came through olah
    assert isinstance(loaded.active_peft_config, peft_ctx.XRAGConfig)
    assert torch.equal(logits(loaded, tokenizer), expected)
    uploaded = json.loads(remote_text(hub, "org/xrag-roundtrip", "adapter_config.json"))
    assert uploaded["base_model_name_or_path"] == BASE_ID and uploaded["retriever_name_or_path"] == ENCODER_ID


def test_card_parses_and_carries_the_metadata_and_the_sections(olah, tokenizer, tmp_path):
    hub = olah
    model, args = xrag_model(tokenizer), training_args(tmp_path, steps=1)
    push(
        hub,
        model,
        "org/xrag-card",
        datasets=["org/colours"],
        license="apache-2.0",
        training_config={"training_arguments": args, "script": {"dataset_name": "org/colours"}},
        eval_results=EVAL,
    )
    before = downloads_from_our_server(hub)
    card = ModelCard.load("org/xrag-card")  # through olah, as any user would
    assert downloads_from_our_server(hub) == before
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "text-generation"
    assert data["base_model"] == BASE_ID and data["base_model_relation"] == "adapter"
    assert {"peft", "peft_ctx", "xrag", "rag", "context-compression"} <= set(data["tags"])
    assert data["datasets"] == ["org/colours"] and data["license"] == "apache-2.0"
    (result,) = card.data.eval_results
    assert (result.dataset_type, result.dataset_split, result.metric_type, result.metric_value) == (
        "org/nq-conflicts",
        "test",
        "accuracy",
        0.20,
    )
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    text = card.text
    assert 'peft_ctx.load("org/xrag-card")' in text and 'PeftModel.from_pretrained(base, "org/xrag-card")' in text
    assert f"| Trainable parameters | {trainable:,} (" in text
    assert "| Compression | 1 token per document, whatever its length (200.0x measured) |" in text
    assert "| learning_rate | 0.01 |" in text and "| max_steps | 1 |" in text
    assert "| No retrieval | 0.05 | 40.0 | 4.00x |" in text
    assert "| Text RAG (documents as text) | 0.3 | 240.0 | 1.00x |" in text
    assert "| xRAG (this adapter) | 0.2 | 41.0 | 3.33x |" in text
    assert "arXiv:2405.13792" in text and "@article{cheng2024xrag" in text
    assert peft_hub.card_is_unedited(remote_text(hub, "org/xrag-card", "README.md"))
    recorded = json.loads(remote_text(hub, "org/xrag-card", "training_config.json"))
    assert recorded["training_arguments"]["learning_rate"] == 0.01
    assert json.loads(remote_text(hub, "org/xrag-card", "eval_results.json")) == EVAL


def test_peft_ctx_load_fetches_the_base_model_tokenizer_and_encoder_named_in_the_config(
    published, tokenizer, encoder, tmp_path
):
    model = xrag_model(tokenizer)
    push(published, model, "org/xrag-load")
    # model kwargs reach from_pretrained; the tiny models are built with eager attention
    loaded, loaded_tokenizer, loaded_encoder = peft_ctx.load("org/xrag-load", attn_implementation="eager")
    assert torch.equal(logits(loaded, loaded_tokenizer), logits(model, tokenizer))
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    docs = ["The lighthouse stands on Skerry Point.", "The report was written by Ada Obi."]
    assert loaded_encoder.name_or_path == ENCODER_ID and loaded_encoder.pooling == "mean"
    assert torch.equal(loaded_encoder.encode(docs), encoder.encode(docs))
    contexts = [[docs[0]], [docs[1]]]
    assert peft_ctx.generate(
        loaded, loaded_tokenizer, QUESTIONS, contexts, encoder=loaded_encoder, max_new_tokens=4
    ) == (peft_ctx.generate(model, tokenizer, QUESTIONS, contexts, encoder=encoder, max_new_tokens=4))


def test_peft_ctx_load_reads_listed_local_copies_of_the_hub_ids_an_adapter_config_names(
    tokenizer, encoder, tmp_path, monkeypatch
):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = tiny_model("llama", tokenizer)
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    config = peft_ctx.XRAGConfig(
        retriever_hidden_size=RETRIEVER_DIM, retriever_pooling="mean", retriever_normalize=True
    )
    model = get_peft_model(base, config)
    shift(model, 0)
    config.base_model_name_or_path, config.retriever_name_or_path = "org/tiny-base", "org/tiny-encoder"
    model.save_pretrained(adapter_dir)
    monkeypatch.setenv("PEFT_CTX_LOCAL_COPIES", str(tmp_path / "copies.json"))
    peft_ctx.local_copies.register("org/tiny-base", str(base_dir))
    peft_ctx.local_copies.register("org/tiny-encoder", encoder.name_or_path)
    loaded, loaded_tokenizer, loaded_encoder = peft_ctx.load(str(adapter_dir), attn_implementation="eager")
    assert torch.equal(logits(loaded, loaded_tokenizer), logits(model, tokenizer))
    # The adapter's config keeps the Hub ids; the files came from the local copies.
    assert loaded.peft_config["default"].base_model_name_or_path == "org/tiny-base"
    assert loaded_encoder.name_or_path == "org/tiny-encoder"
    assert loaded_encoder.model.name_or_path == encoder.name_or_path


def test_readme_publishing_section_runs_as_written(published, tokenizer, tmp_path):
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    start = text.index("## Publishing to the Hub\n")
    end = text.find("\n## ", start + 1)
    (code,) = re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)
    code = code.replace("HuggingFaceTB/SmolLM2-135M-Instruct", BASE_ID)
    code = code.replace("sentence-transformers/all-MiniLM-L6-v2", ENCODER_ID)
    trained = xrag_model(tokenizer)
    namespace = {
        "model": trained,
        "base": tiny_model("llama", tokenizer),
        "training_args": training_args(tmp_path),
        "eval_results": EVAL,
    }
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["info"].oid == HfApi().model_info("org/xrag-smollm2", revision="main").sha
    assert isinstance(namespace["model"].active_peft_config, peft_ctx.XRAGConfig)
    assert namespace["encoder"].name_or_path == ENCODER_ID
    card = ModelCard(remote_text(published, "org/xrag-smollm2", "README.md"))
    assert card.data.datasets == ["org/my-qa-data"] and card.data.base_model == BASE_ID


# ---- revisions ------------------------------------------------------------------------------------------------------


def test_second_push_and_a_branch_keep_every_version_loadable(olah, tokenizer, tmp_path):
    hub = olah
    repo = "org/xrag-versions"
    model = xrag_model(tokenizer)
    first_logits = logits(model, tokenizer)
    first = push(hub, model, repo, eval_results=EVAL[:1])
    first_card = remote_text(hub, repo, "README.md")
    shift(model, seed=1)  # new weights
    second_logits = logits(model, tokenizer)
    assert not torch.equal(first_logits, second_logits)
    second = push(hub, model, repo, eval_results=EVAL)  # our own unedited card is updated without any flag
    assert remote_text(hub, repo, "README.md") != first_card
    assert hub.server.commit_count(repo) == 3
    shift(model, seed=2)
    branch_logits = logits(model, tokenizer)
    third = push(hub, model, repo, revision="experiment")
    assert len({first.oid, second.oid, third.oid}) == 3

    before = downloads_from_our_server(hub)
    for revision, expected in ((first.oid, first_logits), ("main", second_logits), ("experiment", branch_logits)):
        loaded = PeftModel.from_pretrained(tiny_model("llama", tokenizer), repo, revision=revision)
        assert torch.equal(logits(loaded, tokenizer), expected), revision
    assert downloads_from_our_server(hub) == before
    branch_card = ModelCard(remote_text(hub, repo, "README.md", revision="experiment")).text
    assert f'PeftModel.from_pretrained(base, "{repo}", revision="experiment")' in branch_card


# ---- cards that are not ours ----------------------------------------------------------------------------------------


def test_card_edited_on_the_hub_is_not_overwritten_without_the_flag(hub, tokenizer):
    repo = "org/xrag-edited"
    model = get_peft_model(tiny_model("llama", tokenizer), peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM))
    push(hub, model, repo)
    edited = remote_text(hub, repo, "README.md").replace("## How it works", "## How it works\n\nHand-written note.")
    hub.server.edit_file(repo, "README.md", edited.encode())  # as if edited in the Hub's web editor
    commits = hub.server.commit_count(repo)
    with pytest.raises(peft_hub.CardConflictError, match="org/xrag-edited.*overwrite_card=True"):
        push(hub, model, repo)
    assert hub.server.commit_count(repo) == commits and remote_text(hub, repo, "README.md") == edited

    shift(model, seed=3)
    push(hub, model, repo, card=False)  # new weights, the hand-edited card stays
    assert remote_text(hub, repo, "README.md") == edited
    loaded = PeftModel.from_pretrained(tiny_model("llama", tokenizer), repo)
    assert torch.equal(logits(loaded, tokenizer), logits(model, tokenizer))

    push(hub, model, repo, card=ModelCard.load(repo), overwrite_card=True)
    kept = remote_text(hub, repo, "README.md")
    assert "Hand-written note." in kept and peft_hub.card_is_unedited(kept)
    push(hub, model, repo)  # the card we wrote last is ours again: a plain push may replace it
    assert "Hand-written note." not in remote_text(hub, repo, "README.md")


def test_a_card_written_by_peft_is_not_overwritten_without_the_flag(hub, tokenizer, tmp_path):
    repo = "org/xrag-peft-card"
    model = get_peft_model(tiny_model("llama", tokenizer), peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM))
    model.save_pretrained(tmp_path / "plain")  # PEFT's own README.md, as PEFT's / trl's push paths upload it
    api = HfApi(endpoint=hub.upload)
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=str(tmp_path / "plain"))
    peft_card = remote_text(hub, repo, "README.md")
    with pytest.raises(peft_hub.CardConflictError, match="not written by peft_ctx"):
        push(hub, model, repo)
    assert remote_text(hub, repo, "README.md") == peft_card
    push(hub, model, repo, overwrite_card=True)
    assert ModelCard.load(repo).data.base_model_relation == "adapter"


# ---- the token ------------------------------------------------------------------------------------------------------


def test_token_from_the_environment_is_used_but_never_uploaded_printed_or_logged(
    hub, tokenizer, tmp_path, caplog, capfd
):
    repo = "org/xrag-token"
    caplog.set_level(logging.DEBUG)
    model, args = xrag_model(tokenizer), training_args(tmp_path, hub_token=TOKEN)
    settings = peft_hub.HubSettings(repo_id=repo, token=TOKEN)
    assert TOKEN not in repr(settings)
    push(
        hub,
        model,
        repo,
        private=True,
        training_config={"training_arguments": args, "notes": {"api_key": TOKEN, "pad_token": "<|im_end|>"}},
    )
    assert repo in hub.server.private  # created private
    blobs = hub.server.all_blobs(repo)
    assert len(blobs) >= 4 and not any(TOKEN.encode() in blob for blob in blobs)
    recorded = json.loads(remote_text(hub, repo, "training_config.json"))
    assert recorded["notes"] == {"api_key": "<redacted>", "pad_token": "<|im_end|>"}
    out, err = capfd.readouterr()
    assert TOKEN not in out + err + caplog.text
    # the server refuses a wrong token: the push above authenticated with the one from HF_TOKEN
    with pytest.raises(Exception, match="401"):
        peft_ctx.push_to_hub(model, repo, endpoint=hub.upload, token="hf_wrong", card=False)


def test_a_file_holding_the_token_is_refused_before_anything_is_committed(hub, tokenizer):
    repo = "org/xrag-leak"
    model = get_peft_model(tiny_model("llama", tokenizer), peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM))
    with pytest.raises(ValueError, match="README.md contains your Hugging Face token") as error:
        push(hub, model, repo, card=f"---\nlicense: mit\n---\n# Oops\nmy token is {TOKEN}\n")
    assert TOKEN not in str(error.value)
    assert hub.server.commit_count(repo) == 1  # only the repository's initial commit


def test_push_without_a_token_says_how_to_log_in(hub, tokenizer, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    model = get_peft_model(tiny_model("llama", tokenizer), peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM))
    with pytest.raises(ValueError, match="No Hugging Face token found.*hf auth login"):
        push(hub, model, "org/xrag-no-token")


# ---- errors ---------------------------------------------------------------------------------------------------------


def test_missing_repository_file_or_revision_gives_a_clear_error_naming_it(published, tokenizer, monkeypatch):
    with pytest.raises(ValueError, match="Repository 'org/does-not-exist' was not found"):
        peft_ctx.load("org/does-not-exist")
    with pytest.raises(ValueError, match="adapter_config.json is not in 'org/tiny-llama' at revision 'main'"):
        peft_ctx.load(BASE_ID)
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json' at 'org/does-not-exist'"):
        PeftModel.from_pretrained(tiny_model("llama", tokenizer), "org/does-not-exist")
    # our server tells a missing revision from a missing repository (olah answers both as "not found")
    monkeypatch.setattr(constants, "ENDPOINT", published.upload)
    with pytest.raises(ValueError, match="Revision 'no-such-branch' does not exist in 'org/tiny-llama'"):
        peft_ctx.load(BASE_ID, revision="no-such-branch")


def test_bad_arguments_to_push_are_named_in_the_error(hub, tokenizer):
    model = get_peft_model(tiny_model("llama", tokenizer), peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM))
    with pytest.raises(ValueError, match="repo_id='no-namespace'"):
        push(hub, model, "no-namespace")
    with pytest.raises(ValueError, match="got LlamaForCausalLM"):
        push(hub, tiny_model("llama", tokenizer), "org/x")
    with pytest.raises(ValueError, match="adapter_name='other'"):
        push(hub, model, "org/x", adapter_name="other")
    with pytest.raises(ValueError, match=r"eval_results\[0\]\['setting'\]='rag'"):
        push(hub, model, "org/x", eval_results=[{"dataset": "d", "setting": "rag", "metric": "em", "score": 1}])
    with pytest.raises(ValueError, match="revision='refs/pr/1'"):
        push(hub, model, "org/x", revision="refs/pr/1")
    with pytest.raises(ValueError, match="--push_to_hub needs --hub_model_id"):
        peft_hub.take_push_settings(types.SimpleNamespace(push_to_hub=True, hub_model_id=None))


# ---- training scripts -----------------------------------------------------------------------------------------------


def test_train_script_pushes_at_the_end_with_push_to_hub(published, tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(REPO, "train"))
    import xrag as script

    monkeypatch.chdir(REPO)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"Item {i} is kept in room {i + 2}."}) + "\n" for i in range(4)))
    script.main(
        [
            "--config", "train/configs/xrag_stage1.yaml", "--model_name_or_path", BASE_ID,
            "--encoder_name_or_path", ENCODER_ID, "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"),
            "--max_steps", "1", "--per_device_train_batch_size", "2", "--disable_tqdm", "true",
            "--push_to_hub", "--hub_model_id", "org/xrag-script",
        ]
    )  # fmt: skip
    card = ModelCard.load("org/xrag-script")
    assert card.data.base_model == BASE_ID and "xrag" in card.data.tags
    assert f"[{ENCODER_ID}](https://huggingface.co/{ENCODER_ID})" in card.text
    recorded = json.loads(remote_text(published, "org/xrag-script", "training_config.json"))
    assert recorded["global_step"] == 1 and recorded["script"]["dataset_name"] == str(data)
    assert recorded["training_arguments"]["push_to_hub"] is False  # the Trainer did not push on its own
    model, _, encoder = peft_ctx.load("org/xrag-script")
    assert isinstance(model.active_peft_config, peft_ctx.XRAGConfig) and encoder.name_or_path == ENCODER_ID


# ---- templates ------------------------------------------------------------------------------------------------------


def _method_model(method, tokenizer):
    configs = {
        "xrag": lambda: peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM),
        "spring": lambda: peft_ctx.SpringConfig(num_virtual_tokens=4),
        "cocom": lambda: peft_ctx.CocomConfig(compression_rate=4, lora_r=2),
    }
    from peft_ctx.methods import _METHODS

    if method not in _METHODS or (method == "cocom" and not hasattr(peft_ctx, "CocomConfig")):
        pytest.skip(f"peft_ctx has no {method} method (yet)")
    return get_peft_model(tiny_model("llama", tokenizer), configs[method]())


@pytest.mark.parametrize(
    ("method", "arxiv"), [("xrag", "2405.13792"), ("spring", "2405.19670"), ("cocom", "2407.09252")]
)
def test_every_method_has_a_card_template_with_its_paper(method, arxiv, tokenizer):
    model = _method_model(method, tokenizer)
    card = peft_hub.make_card(model, f"org/{method}-card", base_model=BASE_ID, eval_results=EVAL)
    assert method in card.data.tags and card.data.library_name == "peft"
    assert f"arXiv:{arxiv}" in card.text and "## Usage" in card.text and "## Evaluation" in card.text
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"| Trainable parameters | {trainable:,} (" in card.text


def test_the_card_templates_ship_inside_the_built_wheel(tmp_path):
    import subprocess
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path],
        check=True,
    )
    (wheel,) = tmp_path.glob("peft_ctx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {f"peft_ctx/hub_cards/{name}" for name in os.listdir(os.path.join(REPO, "hub_cards"))}
    assert templates and templates <= names
    # installed from the wheel alone (no source tree next to it), the card code finds them
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install would unpack
    found = subprocess.run(
        [sys.executable, "-c", "import peft_ctx.hub.common as h; print(h._template_dir())"],
        env={**os.environ, "PYTHONPATH": str(site)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert found == str(site / "peft_ctx" / "hub_cards")


def test_a_published_checkpoint_converts_from_the_hub_by_its_id_and_a_path_inside_it(hub, tmp_path):
    """`python -m peft_ctx.convert org/name/subfolder OUT`: only that folder is downloaded, the card names the id
    and the revision it converted."""
    fixtures = os.path.join(REPO, "tests", "fixtures", "published")
    api = HfApi(endpoint=hub.upload)
    api.create_repo("org/clara-tiny", exist_ok=True)
    api.upload_folder(
        repo_id="org/clara-tiny",
        folder_path=os.path.join(fixtures, "clara", "checkpoint"),
        path_in_repo="compression-8",
    )
    api.upload_file(
        repo_id="org/clara-tiny",
        path_or_fileobj=os.path.join(fixtures, "xrag", "expected.json"),
        path_in_repo="other.json",
    )
    sha = api.model_info("org/clara-tiny").sha
    base = os.path.join(fixtures, "base")
    from peft_ctx.convert import main as convert_cli

    convert_cli(["org/clara-tiny/compression-8", str(tmp_path / "clara"), "--base_model", base])
    card = (tmp_path / "clara" / "README.md").read_text()
    assert f"[org/clara-tiny/compression-8](https://huggingface.co/org/clara-tiny/tree/{sha}/compression-8)" in card
    assert f"at revision `{sha}`" in card
    assert json.loads((tmp_path / "clara" / "conversion.json").read_text())["revision"] == sha
    snapshot = os.path.join(constants.HF_HUB_CACHE, "models--org--clara-tiny", "snapshots", sha)
    assert not os.path.exists(os.path.join(snapshot, "other.json"))  # only the folder asked for
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "clara")
    assert model.active_peft_config.memory_tokens_per_passage == 4
    with pytest.raises(ValueError, match="has no 'compression-128'"):
        peft_ctx.convert("org/clara-tiny/compression-128", str(tmp_path / "none"))
    with pytest.raises(ValueError, match="Cannot download org/missing"):
        peft_ctx.convert("org/missing", str(tmp_path / "none"))
