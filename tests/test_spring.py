"""SPRING on tiny random models of every supported architecture, with SmolLM2's real tokenizer (what every method's
adapter keeps, save / load, batching, the KV cache ...: tests/test_contract.py)."""

from __future__ import annotations

import json
import os
import random
import re

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model

import peft_ctx
from peft_ctx.harness import assets
from peft_ctx.inference import generate_baseline
from peft_ctx.prompting import IGNORE_INDEX
from peft_ctx.spring import SpringMethod
from peft_ctx.spring.convert import convert_official_spring
from peft_ctx.spring.convert import main as convert_cli
from peft_ctx.training import ContextDataCollator
from tests.helpers import (
    ARCHITECTURES,
    RETRIEVER_DIM,
    captured_embeddings,
    changed,
    clone,
    cpu_sft_config,
    load_train_script,
    sft_trainer,
    snapshot,
    tiny_model,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 6
QUESTIONS = ["Who wrote the report?", "Where is the lighthouse?", "When did the river flood?"]
PASSAGES = [
    ["The report was written by Ada Obi.", "Ada Obi works for the river authority."],
    [],
    ["The lighthouse stands on Skerry Point.", "It was built in 1874.", "Skerry Point is north of the harbour."],
]


def spring_model(arch, tokenizer, seed=0, n=N, **config_kwargs):
    base = tiny_model(arch, tokenizer, seed=seed)
    reference = clone(base)
    return get_peft_model(base, peft_ctx.SpringConfig(num_virtual_tokens=n, **config_kwargs)), reference


def tokens_of(model):
    return model.get_base_model().get_input_embeddings().ctx_modules[model.active_adapter].virtual_tokens


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_adapter_is_n_tokens_and_the_first_k_sit_between_the_passages_and_the_question(arch, tokenizer):
    model, reference = spring_model(arch, tokenizer)
    hidden = model.get_base_model().get_input_embeddings().weight.shape[1]
    trainable = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    assert list(trainable.values()) == [(N, hidden)]  # one N x d matrix and nothing else
    assert list(trainable)[0].endswith(".ctx_modules.default.virtual_tokens")
    weight = tokens_of(model).detach()
    for k in (1, 3, N):
        inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES, num_virtual_tokens=k)
        mask = inputs["context_mask"]
        assert mask.sum(1).tolist() == [k, 0, k]
        embeds = captured_embeddings(model, inputs)
        assert torch.equal(embeds[~mask], reference.get_input_embeddings()(inputs["input_ids"])[~mask])
        assert torch.equal(embeds[mask], torch.cat([weight[:k], weight[:k]]))
    ids, row = inputs["input_ids"][2], mask[2]
    first, last = int(row.nonzero()[0]), int(row.nonzero()[-1])
    assert row[first : last + 1].all()  # one run of k slots
    before, after = tokenizer.decode(ids[:first]), tokenizer.decode(ids[last + 1 :])
    lines = "".join(f"[{i + 1}] {passage}\n" for i, passage in enumerate(PASSAGES[2]))
    assert before.endswith(lines)
    assert before.startswith("<|im_start|>system")  # through the chat template
    assert after.startswith("Question: When did the river flood?\nAnswer:<|im_end|>")
    assert after.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_without_passages_or_with_k_zero_the_logits_equal_the_base_model_exactly(arch, tokenizer):
    model, reference = spring_model(arch, tokenizer)
    cases = [
        peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS),
        peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS[:2], [[], []]),
        peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES, num_virtual_tokens=0),
    ]
    with torch.no_grad():
        for inputs in cases:
            assert "context_mask" not in inputs
            assert torch.equal(model(**inputs).logits, reference(**inputs).logits)
        plugged = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES, num_virtual_tokens=2)
        # Plugging the tokens in changes the answer distribution (the test above could not pass by accident).
        assert not torch.equal(model(**plugged).logits[:, -1], reference(**cases[2]).logits[:, -1])
    assert cases[0]["input_ids"].shape[1] < cases[2]["input_ids"].shape[1]
    question_only = tokenizer.decode(cases[0]["input_ids"][0])
    assert "<|im_start|>user\nQuestion: Who wrote the report?\nAnswer:<|im_end|>" in question_only


def test_no_retrieval_generation_is_the_frozen_model_and_k_zero_is_text_rag(tokenizer):
    model, reference = spring_model("qwen2", tokenizer, seed=3)
    assert peft_ctx.generate(model, tokenizer, QUESTIONS, max_new_tokens=5) == generate_baseline(
        model, tokenizer, QUESTIONS, max_new_tokens=5
    )
    texts = [p or ["(none)"] for p in PASSAGES]
    assert peft_ctx.generate(model, tokenizer, QUESTIONS, texts, num_virtual_tokens=0, max_new_tokens=5) == (
        generate_baseline(model, tokenizer, QUESTIONS, texts, max_new_tokens=5)
    )
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS)
    with torch.no_grad():
        ours = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        theirs = reference.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours, theirs)
    # Next to an xRAG adapter on the same base (switching: tests/test_contract.py), SPRING active is still the frozen
    # model without passages, and refuses retrieval vectors.
    model.add_adapter("xrag", peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM))
    model.set_adapter("xrag")
    model.set_adapter("default")
    vectors = [torch.randn(len(p) or 1, RETRIEVER_DIM, generator=torch.Generator().manual_seed(0)) for p in PASSAGES]
    with pytest.raises(ValueError, match="SPRING reads passages as text"):
        peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, vectors)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference(**inputs).logits)


# ---- initialisation -------------------------------------------------------------------------------------------


def test_tokens_start_from_the_embeddings_of_init_text_and_reload_without_the_tokenizer(tokenizer, tmp_path):
    text = "Answer from the passages"
    config = peft_ctx.SpringConfig(
        num_virtual_tokens=N, init_text=text, tokenizer_name_or_path=assets.smollm2_tokenizer_dir()
    )
    base = tiny_model("gemma", tokenizer)  # gemma: the embedding module's output is what counts
    reference = clone(base)
    model = get_peft_model(base, config)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert model.peft_config["default"].init_token_ids == ids and len(ids) < N
    repeated = torch.tensor((ids * N)[:N])
    with torch.no_grad():
        assert torch.equal(tokens_of(model), reference.get_input_embeddings()(repeated))
        tokens_of(model).normal_(generator=torch.Generator().manual_seed(1))  # trained: not the init_text rows now
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    saved["tokenizer_name_or_path"] = str(tmp_path / "no-such-tokenizer")
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    loaded = PeftModel.from_pretrained(clone(reference), tmp_path, is_trainable=True)
    assert torch.equal(tokens_of(loaded), tokens_of(model)) and loaded.peft_config["default"].num_virtual_tokens == N
    with torch.no_grad():
        for k in (2, N):  # any k reads the first k of the same tokens (save / load of every method: test_contract.py)
            inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES, num_virtual_tokens=k)
            assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_default_initialisation_copies_vocabulary_embeddings(tokenizer):
    model, reference = spring_model("llama", tokenizer)
    vocabulary = reference.get_input_embeddings().weight
    for row in tokens_of(model):
        assert (vocabulary == row).all(-1).any()


def test_init_token_ids_beyond_the_vocabulary_are_an_error(tokenizer):
    with pytest.raises(ValueError, match=f"beyond the base model's vocabulary of {len(tokenizer)}"):
        spring_model("llama", tokenizer, init_token_ids=[5, len(tokenizer) + 3])


# ---- training -------------------------------------------------------------------------------------------------


def qa_rows(n=8):
    colours = ["blue", "green", "red", "black", "white"]
    return [
        {
            "question": f"What colour is item {i}?",
            "answer": colours[i % 5],
            "contexts": [f"Item {j} is {colours[j % 5]}." for j in range(i, i + 1 + i % 5)],
        }
        for i in range(n)
    ]


def test_scalable_training_draws_k_uniformly_from_the_configured_range():
    config = peft_ctx.SpringConfig(num_virtual_tokens=N)
    method, rng = SpringMethod(), random.Random(0)
    drawn = {method.training_options(config, rng, {})["num_virtual_tokens"] for _ in range(300)}
    assert drawn == set(range(1, N + 1))
    options = {"virtual_tokens_range": [2, 3]}
    drawn = {method.training_options(config, rng, options)["num_virtual_tokens"] for _ in range(50)}
    assert drawn == {2, 3}
    assert method.training_options(config, rng, {"num_virtual_tokens": 4}) == {"num_virtual_tokens": 4}
    with pytest.raises(ValueError, match=r"virtual_tokens_range=\[0, 3\] is not within 1 <= low <= high <= "):
        method.training_options(config, rng, {"virtual_tokens_range": [0, 3]})
    with pytest.raises(ValueError, match=f"virtual_tokens_range=\\(1, {N + 1}\\)"):
        method.training_options(config, rng, {"virtual_tokens_range": (1, N + 1)})
    with pytest.raises(ValueError, match="not both"):
        method.training_options(config, rng, {"virtual_tokens_range": (1, 2), "num_virtual_tokens": 2})
    with pytest.raises(ValueError, match="Unknown SPRING training option"):
        method.training_options(config, rng, {"k_range": (1, 2)})


def test_training_batches_put_the_loss_on_the_answer_only(tokenizer):
    config = peft_ctx.SpringConfig(num_virtual_tokens=N)
    collator = ContextDataCollator(config, tokenizer, method_options={"max_passages": 2})
    rows = qa_rows(5)
    batch = collator(rows)
    for i, row in enumerate(rows):
        answer = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX]
        assert answer.tolist() == tokenizer(row["answer"], add_special_tokens=False).input_ids + [
            tokenizer.eos_token_id
        ]
        text = tokenizer.decode(batch["input_ids"][i][batch["attention_mask"][i].bool()])
        lines = [f"[{j + 1}] {p}\n" for j, p in enumerate(row["contexts"][:2])]
        assert "".join(lines) in text and "[3]" not in text
    assert len(set(batch["context_mask"].sum(1).tolist())) == 1  # one k per batch
    assert 1 <= int(batch["context_mask"].sum(1)[0]) <= N


class RecordingCollator(ContextDataCollator):
    def __call__(self, rows):
        batch = super().__call__(rows)
        self.__dict__.setdefault("batches", []).append({key: value.clone() for key, value in batch.items()})
        return batch


def test_training_changes_only_the_virtual_tokens_and_logs_true_token_accuracy(tokenizer, tmp_path):
    base = tiny_model("llama", tokenizer, initializer_range=0.2)  # llama: tied input / output embeddings
    assert base.get_input_embeddings().weight is base.get_output_embeddings().weight
    model = get_peft_model(base, peft_ctx.SpringConfig(num_virtual_tokens=N))
    before = snapshot(model)
    frozen = clone(model)
    rows = qa_rows(8)
    args = cpu_sft_config(tmp_path, 3, 5e-2, batch_size=len(rows))
    collator = RecordingCollator(model.active_peft_config, tokenizer, seed=7)
    trainer = sft_trainer(model, args, rows, collator, tokenizer)
    trainer.train()
    assert changed(before, model) == {"base_model.model.model.embed_tokens.ctx_modules.default.virtual_tokens"}
    assert (
        model.get_base_model().get_output_embeddings().weight is model.get_base_model().get_input_embeddings().weight
    )

    # The first logged accuracy is the untrained adapter's on the first batch (all rows, with the k drawn for it).
    logged = [entry["mean_token_accuracy"] for entry in trainer.state.log_history if "mean_token_accuracy" in entry]
    assert len(collator.batches) == 3
    batch = dict(collator.batches[0])
    assert batch["context_mask"].any()
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = frozen(**batch).logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    manual = (logits.argmax(-1)[keep] == targets[keep]).float().mean().item()
    assert len(logged) == 3
    assert logged[0] == pytest.approx(manual, abs=1e-6)


def script_setup(tokenizer, tmp_path, monkeypatch):
    """train/spring.py loaded from the repository root, a tiny saved base model and a 4-row QA file."""
    base_dir = tmp_path / "base"
    tiny_model("llama", tokenizer).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in qa_rows(4)))
    monkeypatch.chdir(REPO)
    return load_train_script("spring", monkeypatch), base_dir, data


def test_train_script_runs_end_to_end_from_yaml(tokenizer, tmp_path, monkeypatch):
    script, base_dir, data = script_setup(tokenizer, tmp_path, monkeypatch)
    argv = [
        "--config", "train/configs/spring.yaml", "--model_name_or_path", str(base_dir), "--dataset_name", str(data),
        "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--num_virtual_tokens", "4", "--init_text", "Use the passages", "--max_passages", "2",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    out = script.main(argv)
    config = PeftConfig.from_pretrained(out)
    assert isinstance(config, peft_ctx.SpringConfig) and config.num_virtual_tokens == 4
    assert config.init_token_ids == tokenizer("Use the passages", add_special_tokens=False).input_ids
    model = PeftModel.from_pretrained(tiny_model("llama", tokenizer), out)
    answers = peft_ctx.generate(model, tokenizer, ["What colour is item 1?"], [["Item 1 is green."]], max_new_tokens=2)
    assert len(answers) == 1
    with pytest.raises(FileExistsError, match="already holds an adapter"):
        script.main(argv)
    with pytest.raises(ValueError, match="virtual_tokens_range=\\(1, 9\\)"):
        script.main([*argv[:-2], "--output_dir", str(tmp_path / "other"), "--max_virtual_tokens", "9"])


# ---- converter ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_converted_official_tensor_loads_as_an_adapter_with_exactly_those_tokens(arch, tokenizer, tmp_path):
    base = tiny_model(arch, tokenizer)
    base.save_pretrained(tmp_path / "base")
    hidden = base.get_input_embeddings().weight.shape[1]
    official = torch.randn(N, hidden, generator=torch.Generator().manual_seed(0))
    torch.save(official, tmp_path / "tiny.added_token_embeddings.pt")
    config = convert_official_spring(
        str(tmp_path / "tiny.added_token_embeddings.pt"), str(tmp_path / "adapter"), str(tmp_path / "base")
    )
    assert config.num_virtual_tokens == N and config.use_chat_template is False
    loaded = PeftModel.from_pretrained(clone(base), tmp_path / "adapter")
    assert torch.equal(tokens_of(loaded), official)

    expected, _ = spring_model(arch, tokenizer, use_chat_template=False)
    with torch.no_grad():
        tokens_of(expected).copy_(official)
    inputs = peft_ctx.prepare_inputs(loaded, tokenizer, QUESTIONS, PASSAGES, num_virtual_tokens=N)
    plain = tokenizer.decode(inputs["input_ids"][0][inputs["attention_mask"][0].bool()])
    assert plain.startswith("[1] The report") and "<|im_start|>" not in plain
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected(**inputs).logits)


def test_converter_cli_defaults_to_llama_layout_and_refuses_overwrite_pickles_and_wrong_sizes(tokenizer, tmp_path):
    base = tiny_model("mistral", tokenizer)
    source = tmp_path / "m.added_token_embeddings.pt"
    torch.save(torch.randn(N, 64), source)
    convert_cli([str(source), str(tmp_path / "adapter")])
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.equal(tokens_of(loaded), torch.load(source, weights_only=True))
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        convert_cli([str(source), str(tmp_path / "adapter")])
    convert_cli([str(source), str(tmp_path / "adapter"), "--overwrite"])

    torch.save({"tokens": torch.randn(N, 64), "note": object()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="will not unpickle"):
        convert_official_spring(str(tmp_path / "pickled.pt"), str(tmp_path / "x"))
    torch.save(torch.randn(2, 3, 4), tmp_path / "cube.pt")
    with pytest.raises(ValueError, match=r"holds \(2, 3, 4\); expected one floating-point \[N, d\] tensor"):
        convert_official_spring(str(tmp_path / "cube.pt"), str(tmp_path / "x"))
    tiny_model("llama", tokenizer, hidden_size=96).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="64-d embeddings but .* has hidden size 96"):
        convert_official_spring(str(source), str(tmp_path / "x"), str(tmp_path / "wide"))
    assert not (tmp_path / "x").exists()


# ---- bad input ------------------------------------------------------------------------------------------------


def test_k_larger_than_n_is_an_error_naming_both(tokenizer):
    model, _ = spring_model("llama", tokenizer)
    with pytest.raises(ValueError, match=f"num_virtual_tokens=9 is more than the {N} virtual tokens"):
        peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES, num_virtual_tokens=9)
    with pytest.raises(ValueError, match=f"num_virtual_tokens=9 is more than the {N} virtual tokens"):
        peft_ctx.generate(model, tokenizer, QUESTIONS, PASSAGES, num_virtual_tokens=9)


def test_a_prompt_with_more_slots_than_tokens_is_an_error(tokenizer):
    model, _ = spring_model("llama", tokenizer)
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, PASSAGES)
    inputs["context_mask"][0] = False
    inputs["context_mask"][0, -N - 1 :] = True
    with pytest.raises(ValueError, match=f"{N + 1} virtual-token slots but the SPRING adapter has only"):
        model(**inputs)


@pytest.mark.parametrize(
    ("contexts", "options", "message"),
    [
        (PASSAGES, {"num_virtual_tokens": -1}, "num_virtual_tokens=-1; give an int between 0 and"),
        (PASSAGES, {"num_virtual_tokens": 2.5}, "num_virtual_tokens=2.5"),
        (PASSAGES, {"num_virtual_token": 2}, r"Unknown SPRING option\(s\) \['num_virtual_token'\]"),
        (PASSAGES, {"max_passages": 0}, "max_passages=0"),
        (["a passage", [], []], {}, "contexts\\[0\\] must be a list of passages"),
        ([[torch.randn(4)], [], []], {}, "contexts\\[0\\]\\[0\\] is .* non-empty strings"),
        ([["ok", " "], [], []], {}, "contexts\\[0\\]\\[1\\] is ' '"),
    ],
)
def test_bad_options_and_passages_are_named_in_the_error(tokenizer, contexts, options, message):
    model, _ = spring_model("llama", tokenizer)
    with pytest.raises(ValueError, match=message):
        peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, contexts, **options)


def test_max_passages_keeps_the_best_ranked_passages(tokenizer):
    model, _ = spring_model("llama", tokenizer, use_chat_template=False)
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS[2:], PASSAGES[2:], max_passages=2)
    text = tokenizer.decode(inputs["input_ids"][0][~inputs["context_mask"][0]])
    assert "[2] It was built in 1874." in text and "Skerry Point is north" not in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens=0"),
        ({"num_virtual_tokens": "50"}, "num_virtual_tokens='50'"),
        ({"init_text": "hello"}, "tokenizer_name_or_path is None"),
        ({"init_text": "  ", "tokenizer_name_or_path": "x"}, "init_text='  '"),
        ({"init_token_ids": []}, "init_token_ids=\\[\\]"),
        ({"init_token_ids": [3, -1]}, "init_token_ids=\\[3, -1\\]"),
        ({"passage_template": "[{index}]"}, "must contain {passage}"),
        ({"passage_template": "{passage} {title}"}, "no field other than {index}"),
        ({"prompt_template": "{context}Question: {question}"}, "missing: \\['virtual'\\]"),
        ({"task_type": "SEQ_CLS"}, "task_type='SEQ_CLS'"),
    ],
)
def test_bad_config_values_are_named_in_the_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peft_ctx.SpringConfig(**kwargs)


def test_the_docs_spring_example_runs_as_written(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = open(os.path.join(REPO, "docs", "spring.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    base = tiny_model("llama", tokenizer)
    reference = clone(base)
    get_peft_model(clone(base), peft_ctx.XRAGConfig(retriever_hidden_size=RETRIEVER_DIM)).save_pretrained(
        "xrag-adapter"
    )
    namespace = {"base_causal_lm": base, "tokenizer": tokenizer}
    exec(compile(blocks[0], "docs/spring.md", "exec"), namespace)
    assert len(namespace["answers"]) == 2
    loaded, questions = namespace["loaded"], namespace["questions"]
    assert loaded.active_adapter == "spring" and set(loaded.peft_config) >= {"spring", "xrag"}
    with torch.no_grad():
        inputs = peft_ctx.prepare_inputs(loaded, tokenizer, questions, namespace["passages"], num_virtual_tokens=20)
        assert torch.equal(loaded(**inputs).logits, namespace["model"](**inputs).logits)
        plain = peft_ctx.prepare_inputs(loaded, tokenizer, questions)
        assert torch.equal(loaded(**plain).logits, reference(**plain).logits)


def test_train_script_loads_the_base_in_bf16_with_the_adapter_in_fp32(tokenizer, tmp_path, monkeypatch):
    script, base_dir, data = script_setup(tokenizer, tmp_path, monkeypatch)
    built = []
    build_adapter_model = script.scripts.build_adapter_model

    def recorded(*args, **kwargs):  # the script's own build_model, its base model and adapter kept for the checks
        built.append(build_adapter_model(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(script.scripts, "build_adapter_model", recorded)
    argv = [
        "--config", "train/configs/spring.yaml", "--model_name_or_path", str(base_dir), "--dataset_name", str(data),
        "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--per_device_train_batch_size", "2",
        "--num_virtual_tokens", "4", "--disable_tqdm", "true", "--dtype", "bf16", "--attn_implementation", "eager",
    ]  # fmt: skip
    out = script.main(argv)
    (model,) = built
    assert model.get_base_model().lm_head.weight.dtype == torch.bfloat16
    assert model.get_base_model().config._attn_implementation == "eager"
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert trainable == {torch.float32}
    assert isinstance(PeftConfig.from_pretrained(out), peft_ctx.SpringConfig)


def test_dtype_auto_is_measured_on_the_cpu_and_bad_names_are_refused(monkeypatch):
    from peft_ctx import scripts

    assert scripts.resolve_dtype("fp16") == torch.float16 and scripts.resolve_dtype("fp32") == torch.float32
    monkeypatch.setattr(scripts.torch.cuda, "is_available", lambda: False)
    for speedup, expected in ((2.0, torch.bfloat16), (1.2, torch.float32), (0.1, torch.float32)):
        monkeypatch.setattr(scripts, "cpu_bf16_speedup", lambda s=speedup: s)
        assert scripts.resolve_dtype("auto") == expected
    monkeypatch.undo()
    assert scripts.cpu_bf16_speedup(size=64, repeats=3) > 0  # measured here, whatever this CPU has
    with pytest.raises(ValueError, match="dtype='half'; choose auto, bf16, fp16, fp32"):
        scripts.ModelArguments(dtype="half")
    with pytest.raises(ValueError, match="dtype='half'"):
        scripts.resolve_dtype("half")


def test_the_script_samples_one_to_five_of_the_top_passages_shuffled_and_starts_from_an_instruction(
    tokenizer, tmp_path, monkeypatch
):
    script, base_dir, data = script_setup(tokenizer, tmp_path, monkeypatch)
    row = {"contexts": [f"passage {i}" for i in range(8)]}
    draws = [script.choose_passages(row, i, low=1, high=5, seed=0)["contexts"] for i in range(200)]
    assert draws == [script.choose_passages(row, i, low=1, high=5, seed=0)["contexts"] for i in range(200)]
    assert {len(d) for d in draws} == {1, 2, 3, 4, 5}  # every count drawn
    assert all(set(d) <= set(row["contexts"][:5]) and len(set(d)) == len(d) for d in draws)
    assert any(d != sorted(d) for d in draws)  # and the order shuffled
    assert script.choose_passages(row, 0, low=None, high=5, seed=0)["contexts"] == row["contexts"][:5]
    out = script.main([
        "--config", "train/configs/spring.yaml", "--model_name_or_path", str(base_dir), "--dataset_name", str(data),
        "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--num_virtual_tokens", "4",
        "--disable_tqdm", "true",
    ])  # fmt: skip
    config = PeftConfig.from_pretrained(out)
    assert config.use_chat_template is False  # the paper's plain text
    assert config.init_token_ids == tokenizer(script.INIT_INSTRUCTION, add_special_tokens=False).input_ids
    with pytest.raises(ValueError, match="min_passages=6 with max_passages=5"):
        script.ScriptArguments(model_name_or_path="m", dataset_name="d", min_passages=6)
