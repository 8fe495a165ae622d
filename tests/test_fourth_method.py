"""A fourth method, defined entirely in this module, goes through everything peft_ctx gives a method, with no edit
anywhere else: ``get_peft_model``, save / load, ``generate``, training with the one stack, the evaluation harness, a
rendered model card, and every place that iterates the registered methods: the demo's rows, the benchmark's, the
planner's, the CUDA check's, the robustness checks and the serving export (its rows: ``ROWS`` below, named by
``rows_module``).

The method: each passage is tokenised by the LLM's tokenizer, its token embeddings (the base model's own) are
mean-pooled, and one trained linear map turns the mean into the passage's single context slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from torch import nn

import peft_ctx
from benchmarks import cuda_check, planner
from benchmarks.methods import registry
from benchmarks.run import Bench, Settings
from peft_ctx import ContextMethod, register_method
from peft_ctx.config import ContextConfig
from peft_ctx.harness import demo
from peft_ctx.harness import eval as harness
from peft_ctx.harness.rows import Entry, MethodRows, method_rows, tiny_configs
from peft_ctx.hub import make_card
from peft_ctx.methods import TrainingData
from peft_ctx.prompting import Slots, check_documents
from peft_ctx.training import StageSettings, train_method
from tests import fake_vllm
from tests.helpers import ARCHITECTURES, changed, clone, snapshot, tiny_adapter, tiny_adapter_config, tiny_model

QUESTIONS = ["What colour is the door?", "Who keeps the lighthouse?"]
CONTEXTS = [["The door of the old mill is painted blue."], ["Ada keeps the lighthouse.", "It stands on a cliff."]]


@dataclass
class MeanPoolConfig(ContextConfig):
    """Mean-pooled passage embeddings through a linear map: one context slot per passage."""

    method_name = "meanpool"

    max_passage_tokens: int = field(default=32, metadata={"help": "Passages are cut to this many tokens."})

    def default_prompt_template(self) -> str:
        return "Background: {context}\nQuestion: {question}"

    def __post_init__(self):
        super().__post_init__()
        if self.max_passage_tokens < 1:
            raise ValueError(f"max_passage_tokens={self.max_passage_tokens!r}: give a positive int.")


class MeanPoolMap(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.pool_map = nn.Linear(hidden_size, hidden_size)

    def forward(self, pooled):
        return self.pool_map(pooled)  # [n_passages, hidden]


class MeanPoolMethod(ContextMethod):
    name = "meanpool"
    title = "Mean-pool"
    config_class = MeanPoolConfig
    input_names = ("meanpool_ids", "meanpool_lengths")
    option_resources = ("tokenizer",)
    rows_module = __name__  # ROWS, below

    def create_module(self, config, base_embedding, model_config):
        return MeanPoolMap(int(base_embedding.weight.shape[-1]))

    def prepare_docs(self, config, contexts, options):
        tokenizer = options["tokenizer"]
        prepared = []
        for i, docs in enumerate(contexts):
            check_documents(i, docs)
            prepared.append(
                [tokenizer(d, add_special_tokens=False).input_ids[: config.max_passage_tokens] for d in docs]
            )
        return prepared

    def prompt_fields(self, config, docs, options):
        return {"context": [Slots(len(docs))]}, {"ids": list(docs)}

    def collate_context(self, config, payloads, device):
        ids = [p for payload in payloads for p in payload["ids"]]
        longest = max(len(p) for p in ids)
        batch = {
            "meanpool_ids": torch.tensor([p + [0] * (longest - len(p)) for p in ids]),
            "meanpool_lengths": torch.tensor([len(p) for p in ids]),
        }
        return {k: v.to(device) for k, v in batch.items()} if device is not None else batch

    def before_forward(self, tuner, adapter_name, config, context_mask, inputs):
        ids, lengths = inputs["meanpool_ids"], inputs["meanpool_lengths"]
        embeds = tuner.context_layer().base_layer(ids)  # [n_passages, length, hidden]
        keep = (torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]).unsqueeze(-1)
        pooled = (embeds * keep).sum(1) / lengths[:, None].to(embeds.dtype)  # [n_passages, hidden]
        return {**inputs, "meanpool_pooled": pooled}

    def slot_embeddings(self, module, context_mask, inputs, dtype):
        weight = module.pool_map.weight
        return module(inputs["meanpool_pooled"].to(weight.device, weight.dtype)).to(dtype)


def _config(resources):
    return MeanPoolConfig(base_model_name_or_path=resources.base_model_name_or_path)


ROWS = MethodRows(
    demo=(
        Entry(
            "meanpool", "Mean-pool (1 token)", _config,
            stages={"tiny": {"qa": {"steps": 3, "batch_size": 2, "learning_rate": 1e-2}}},
        ),
    ),
    benchmark=(Entry("meanpool", "Mean-pool (1 token / passage)", _config, trains="the linear map"),),
    tiny=(Entry("meanpool", "Mean-pool", lambda resources: MeanPoolConfig(max_passage_tokens=16)),),
    paper=(Entry("meanpool", "Mean-pool", lambda resources: MeanPoolConfig(max_passage_tokens=128)),),
)  # fmt: skip
register_method(MeanPoolMethod())


def meanpool_model(arch, tokenizer, **kwargs):
    base = tiny_model(arch, tokenizer, **kwargs)
    reference = clone(base)
    return get_peft_model(base, MeanPoolConfig()), reference


def logits(model, tokenizer):
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, CONTEXTS)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_fourth_method_saves_loads_and_generates_like_any_adapter(arch, tokenizer, tmp_path):
    model, reference = meanpool_model(arch, tokenizer)
    hidden = reference.get_input_embeddings().weight.shape[1]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == hidden * hidden + hidden  # the linear map, nothing else
    expected = logits(model, tokenizer)
    model.save_pretrained(tmp_path)
    assert isinstance(PeftConfig.from_pretrained(str(tmp_path)), MeanPoolConfig)
    loaded = PeftModel.from_pretrained(clone(reference), str(tmp_path))
    assert torch.equal(logits(loaded, tokenizer), expected)
    batched = peft_ctx.generate(loaded, tokenizer, QUESTIONS, CONTEXTS, max_new_tokens=4)
    one_by_one = [
        peft_ctx.generate(loaded, tokenizer, [q], [c], max_new_tokens=4)[0] for q, c in zip(QUESTIONS, CONTEXTS)
    ]
    assert batched == one_by_one
    inputs = peft_ctx.prepare_inputs(model, tokenizer, QUESTIONS, CONTEXTS)
    assert inputs["context_mask"].sum(1).tolist() == [1, 2]  # one slot per passage
    with torch.no_grad(), model.disable_adapter():
        plain = model(**{k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}).logits
    assert torch.equal(plain, reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits)


def test_the_fourth_method_trains_evaluates_and_gets_a_card(tokenizer, tmp_path):
    method = peft_ctx.get_method("meanpool")
    (row,) = [entry for m, entry in demo.demo_entries() if m is method]  # the demo's registry has it
    model, reference = meanpool_model("llama", tokenizer, initializer_range=0.2)
    before = snapshot(model.get_base_model())
    rows = [
        {"id": str(i), "question": f"What colour is item {i}?", "answer": c, "answers": [c],
         "contexts": [f"Item {i} is painted {c}."], "choices": [c, "grey"], "label": 0}
        for i, c in enumerate(["blue", "green", "red", "black", "white", "pink"])
    ]  # fmt: skip
    stages = {stage: StageSettings(**values) for stage, values in row.stages["tiny"].items()}
    reports = train_method(method, model, tokenizer, TrainingData(rows), stages, str(tmp_path / "work"))
    assert [r.steps for r in reports] == [3]
    moved = changed(before, model.get_base_model())
    assert moved and all(".ctx_modules.default.pool_map." in key for key in moved)  # adapter changed, base did not

    model.eval()
    runner = harness.AdapterRunner(name="meanpool", label=row.label)
    settings = harness.EvalSettings(max_new_tokens=2, batch_size=2, timing_examples=1, timing_new_tokens=2)
    result = harness.evaluate_runner(model, tokenizer, runner, rows[:4], settings)
    assert 0.0 <= result["choice_accuracy"] <= 1.0 and result["prompt_tokens"] > 0

    card = str(make_card(model, "org/meanpool-tiny", base_model="org/tiny-llama"))
    assert "Mean-pool" in card and "method: meanpool" in card and "org/tiny-llama" in card
    template = tmp_path / "meanpool.md.j2"
    template.write_text('{% extends "_base.md.j2" %}{% block compression %}1 token per passage{% endblock %}')
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MeanPoolMethod, "card_template", str(template))
        assert "| Compression | 1 token per passage |" in str(make_card(model, "org/meanpool-tiny"))


def test_the_fourth_method_runs_in_the_benchmark(tokenizer, encoder_dir, tmp_path):
    assert "meanpool" in registry()
    base = tiny_model("llama", tokenizer)
    base.requires_grad_(False)
    settings = Settings(
        methods=["rag", "meanpool"], encoder=encoder_dir, docs=[1], batch=[2], doc_tokens=16, instruction_tokens=50,
        new_tokens=2, repeats=1, device="cpu", train_batch=2, train_steps=1, encode_passages=2, out=str(tmp_path),
    )  # fmt: skip
    passages = [f"Passage {i} tells how the harbour town of Vell{i} rebuilt its lighthouse." for i in range(8)]
    # The vLLM rows on the stand-in server (vLLM itself is make test-engines').
    with fake_vllm.serving(str(tmp_path / "fake_vllm")):
        result = Bench(settings, base=base, tokenizer=tokenizer, passages=passages).run()
    row = next(r for r in result["rows"] if r["method"] == "meanpool")
    rag = next(r for r in result["rows"] if r["method"] == "rag")
    assert row["prompt_tokens"] < rag["prompt_tokens"] and row["e2e_s"] > 0 and row["train_samples_per_s"] > 0
    assert {r["engine"] for r in result["rows"] if r["method"] == "meanpool"} >= {"torch", "vllm"}


def test_the_fourth_method_is_in_the_planner_the_cuda_check_robustness_and_serving(tokenizer, encoder_dir, tmp_path):
    # The planner: its paper row counted on the meta device and its tokens per example measured.
    assert "meanpool" in planner.paper_rows()
    tiny = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
    assert planner.count_parameters(tiny, 32)["meanpool"] == 64 * 64 + 64
    tokens = planner.workload_tokens(planner.paper_rows()["meanpool"], tokenizer, None, encoder_dir)
    assert (
        planner.PASSAGES + 2 * planner.QUESTION_TOKENS <= tokens <= planner.PASSAGES + 2 * planner.QUESTION_TOKENS + 60
    )
    # The CUDA check (its bf16 step against the fp32 reference, here on the CPU).
    assert "meanpool" in cuda_check.methods() and "meanpool" in tiny_configs()
    row = cuda_check.check_method("meanpool", tokenizer, encoder_dir, torch.device("cpu"), torch.bfloat16)
    assert row["ok"], row
    # Robustness: bad passages are refused by name; a config of a newer peft_ctx is refused on load.
    model = get_peft_model(tiny_model("llama", tokenizer), tiny_adapter_config("meanpool", encoder_dir))
    with pytest.raises(ValueError, match=r"contexts\[0\]\[1\]"):
        peft_ctx.prepare_inputs(model, tokenizer, ["q?"], [["a fine passage", ""]])
    # Serving: the export's prompt_embeds decode what peft_ctx.generate does.
    model = tiny_adapter("meanpool", "llama", tokenizer, encoder_dir)
    expected = peft_ctx.generate(model, tokenizer, QUESTIONS, CONTEXTS, batch_size=1, max_new_tokens=4)
    peft_ctx.export_for_serving(model, str(tmp_path / "export"), tokenizer=tokenizer)
    served = type(model.get_base_model()).from_pretrained(tmp_path / "export").eval()
    got = []
    for embeds in peft_ctx.prompt_embeds(model, tokenizer, QUESTIONS, CONTEXTS):
        mask = torch.ones(1, embeds.shape[0], dtype=torch.long)
        out = served.generate(inputs_embeds=embeds[None], attention_mask=mask, max_new_tokens=4, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        got.append(tokenizer.decode(out[0], skip_special_tokens=True).strip())
    assert got == expected


def test_rows_that_do_not_add_up_are_refused():
    class NoConfig(MeanPoolMethod):
        name = "meanpool_broken"

    with pytest.raises(ValueError, match="config_class"):
        register_method(NoConfig())
    assert type(peft_ctx.get_method("meanpool")) is MeanPoolMethod  # the refused one changed nothing

    class UnknownStage(MeanPoolMethod):
        rows_module = "tests.test_fourth_method_rows"

    class NoRows(MeanPoolMethod):
        rows_module = "tests.helpers"  # a module without ROWS

    import sys
    import types

    broken = types.ModuleType("tests.test_fourth_method_rows")
    broken.ROWS = MethodRows(demo=(Entry("meanpool", "Mean-pool", _config, stages={"tiny": {"pretrain": {}}}),))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, broken.__name__, broken)
        with pytest.raises(ValueError, match=r"\['pretrain'\].*\['qa'\]"):
            method_rows(UnknownStage())
    with pytest.raises(ValueError, match="must define ROWS = MethodRows"):
        method_rows(NoRows())
