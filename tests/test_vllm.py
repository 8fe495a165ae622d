"""vLLM's OpenAI-compatible server as a peft_ctx engine (``VllmEngine``).

Default run: the engine against a stand-in server (``tests/fake_vllm.py``) that the engine starts and stops as it
does vLLM: what each request carries (slots as ``prompt_embeds``, text as token ids, greedy settings), the answers,
the timings, the server's life, and the refusals. ``--engines`` (``make test-engines``): vLLM's CPU build itself
(``make vllm``) on the real SmolLM2-135M-Instruct in fp32, 50 held-out CPKC questions with one passage each (evaluation
only, nothing trains here): for text RAG and every method's export, first tokens as the torch path's on >= 95% of the
questions and whole greedy answers on >= 90% (the llama.cpp bar); a batch as one by one; the harness decoding with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import peft_ctx
from peft_ctx.serving import vllm_python
from tests import fake_vllm
from tests.helpers import assert_engine_agrees, assert_engine_refuses, cpkc_rows, every_method, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- against the stand-in server ----------------------------------------------------------------------------------
@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The stand-in ``vllm`` package on PYTHONPATH; yields the request log and the file of server pids."""
    monkeypatch.setenv("FAKE_VLLM_LOG", str(tmp_path / "requests.jsonl"))
    with fake_vllm.serving(str(tmp_path / "fake")) as pids:
        yield tmp_path / "requests.jsonl", Path(pids)


@pytest.fixture
def spring_export(tokenizer, tmp_path):
    model = get_peft_model(tiny_model("llama", tokenizer), peft_ctx.SpringConfig(num_virtual_tokens=4)).eval()
    out = str(tmp_path / "export")
    peft_ctx.export_for_serving(model, out, tokenizer=tokenizer)
    return model, out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_slots_go_as_prompt_embeds_text_as_token_ids_greedily_and_the_server_stops(fake, spring_export, tokenizer):
    log, pids = fake
    model, out = spring_export
    questions, contexts = ["Who wrote the letter?", "Where is the bridge?"], [["Ada wrote it."], ["In Rome."]]
    with peft_ctx.VllmEngine(out, python=sys.executable, dtype="float32", max_num_seqs=2) as engine:
        assert engine.running and engine.model_name == "peft_ctx"
        prompts = peft_ctx.serving.serving_prompts(model, tokenizer, questions, contexts)
        outputs = engine.generate_prompts(prompts, 4, eos_token_ids=[2])
        # The stand-in's answer, its stop token (2) dropped as the torch path drops it.
        assert outputs == [[100 + len(p.input_ids), 101, 102] for p in prompts]
        sent = [json.loads(line) for line in log.read_text().splitlines()]
        by_length = {len(s["prompt_embeds"]): s for s in sent}
        for prompt in prompts:
            body = by_length[len(prompt.input_ids)]
            assert torch.equal(torch.tensor(body["prompt_embeds"]), prompt.embeds.float())  # slots filled, exact
            assert body["temperature"] == 0.0 and body["ignore_eos"] and body["stop_token_ids"] == [2]
            assert body["max_tokens"] == 4 and body["model"] == "peft_ctx" and body["stream"]
        assert len(engine.timings.first_token_s) == 2 and engine.timings.new_tokens == 6
        assert 0 <= engine.timings.prefill_s and 0 <= engine.timings.decode_s
        # No end token: exactly max_new_tokens (what the timing rows ask for).
        assert engine.generate_prompts(prompts[:1], 5) == [[100 + len(prompts[0].input_ids), 101, 102, 2, 103]]
        # The public entry points: the adapter's prompts as embeddings, the baselines' as token ids.
        answers = peft_ctx.generate(model, tokenizer, questions, contexts, engine=engine, max_new_tokens=3)
        assert answers == [tokenizer.decode([100 + len(p.input_ids), 101, 102], skip_special_tokens=True).strip()
                           for p in prompts]  # fmt: skip
        log.write_text("")
        peft_ctx.generate_baseline(model, tokenizer, questions, contexts, engine=engine, max_new_tokens=2)
        sent = [json.loads(line) for line in log.read_text().splitlines()]
        assert all("prompt_embeds" not in s and isinstance(s["prompt"], list) for s in sent) and len(sent) == 2
        pid = int(pids.read_text().split()[0])
        assert _alive(pid)
    assert not engine.running
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def test_a_second_engine_reads_a_running_server_and_leaves_it_running(fake, spring_export, tokenizer):
    model, out = spring_export
    owner = peft_ctx.VllmEngine(out, python=sys.executable, dtype="float32")
    try:
        guest = peft_ctx.VllmEngine(out, url=owner.url)
        guest.check_model(model)
        assert peft_ctx.generate(model, tokenizer, ["Who?"], [["Ada."]], engine=guest, max_new_tokens=2)
        guest.close()
        assert owner.running  # the guest did not start it, so it does not stop it
    finally:
        owner.close()


def test_bad_input_is_refused_with_what_to_do(fake, spring_export, tokenizer, tmp_path):
    model, out = spring_export
    with pytest.raises(ValueError, match="no config.json"):
        peft_ctx.VllmEngine(str(tmp_path), python=sys.executable)
    with pytest.raises(ValueError, match="No vLLM server answers at http://127.0.0.1:9"):
        peft_ctx.VllmEngine(out, url="http://127.0.0.1:9")
    with pytest.raises(ValueError, match="dtype='int8'"):
        peft_ctx.VllmEngine(out, dtype="int8", python=sys.executable)
    # A Python without vLLM: the server dies at once, and the error says how to get one and shows its log.
    os.environ.pop("PYTHONPATH")
    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match="(?s)make vllm.*No module named 'vllm'"):
        peft_ctx.VllmEngine(out, python=sys.executable, log_file=str(log))
    assert "No module named 'vllm'" in log.read_text()  # a failed server's log is kept


def test_the_engine_refuses_prompts_it_cannot_serve(fake, spring_export, tokenizer):
    model, out = spring_export
    with peft_ctx.VllmEngine(out, python=sys.executable, max_model_len=64) as engine:
        with pytest.raises(ValueError, match="decodes greedily"):
            peft_ctx.generate(model, tokenizer, ["Who?"], [["Ada."]], engine=engine, do_sample=True)
        other = get_peft_model(tiny_model("llama", tokenizer, seed=1), peft_ctx.SpringConfig(num_virtual_tokens=4))
        with pytest.raises(ValueError, match="made for another spring adapter"):
            peft_ctx.generate(other, tokenizer, ["Who?"], [["Ada."]], engine=engine)
        wide = get_peft_model(
            tiny_model("llama", tokenizer, hidden_size=96), peft_ctx.SpringConfig(num_virtual_tokens=4)
        )
        prompts = peft_ctx.serving.serving_prompts(wide, tokenizer, ["Who?"], [["Ada."]])
        with pytest.raises(ValueError, match="width 96, the served model's hidden size is 64"):
            engine.generate_prompts(prompts, 2)
        long = peft_ctx.serving.serving_prompts(model, tokenizer, ["Who?"], [["Ada " * 80]])
        with pytest.raises(ValueError, match="do not fit max_model_len=64"):
            engine.generate_prompts(long, 2)


def test_one_command_serves_an_export(fake, spring_export, tokenizer, monkeypatch):
    """python -m peft_ctx.serving vllm EXPORT: the server in the foreground, which a plain client reads."""
    from peft_ctx.serving.vllm_server import _free_port

    model, out = spring_export
    monkeypatch.setenv("PEFT_CTX_VLLM_PYTHON", sys.executable)
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "peft_ctx.serving",
        "vllm",
        out,
        "--port",
        str(port),
        "--dtype",
        "float32",
    ]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert "--enable-prompt-embeds" in server.stdout.readline()  # the command it runs, printed first
        deadline = time.monotonic() + 60
        while True:
            try:
                client = peft_ctx.VllmEngine(out, url=f"http://127.0.0.1:{port}")
                break
            except ValueError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.3)
        assert client.model_name == out  # served under its folder's name, as vllm serve does
        assert peft_ctx.generate(model, tokenizer, ["Who?"], [["Ada."]], engine=client, max_new_tokens=2)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_failure_names_the_first_error_of_the_servers_log(tmp_path):
    """vLLM's worker logs the root cause, then every process above it its own failure; the message leads with the
    cause (the log's end follows), not with a warning's quoted error or the final EngineDeadError."""
    from peft_ctx.serving.vllm_server import _tail

    log = tmp_path / "server.log"
    log.write_text(
        "(APIServer pid=1) WARNING [system_utils.py:255] fd limit errors like `OSError: [Errno 24] Too many`\n"
        "(Worker pid=3) ERROR [multiproc_executor.py:1063] RuntimeError: Unsupported CPU attention configuration: "
        "head_dim=16\n"
        "(APIServer pid=1) ERROR [serving.py:500] vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered\n"
    )
    assert _tail(str(log)).startswith("First error: RuntimeError: Unsupported CPU attention configuration: head_dim")


def test_default_dtype_is_bf16_only_where_the_hardware_multiplies_it(monkeypatch):
    from peft_ctx.serving import vllm_server

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(vllm_server, "cpu_flags", lambda: {"avx2", "fma"})
    assert vllm_server.default_dtype() == "float32"
    monkeypatch.setattr(vllm_server, "cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16"})
    assert vllm_server.default_dtype() == "bfloat16"


# ---- vLLM itself, on real weights ---------------------------------------------------------------------------------
N_QUESTIONS = 50
NEW_TOKENS = 6
# fp32, as the torch path computes; PEFT_CTX_VLLM_TEST_DTYPE=bfloat16 measures what the default dtype of a CPU with
# AMX / AVX-512 BF16 gives (see docs/serving.md).
DTYPE = os.environ.get("PEFT_CTX_VLLM_TEST_DTYPE", "float32")


@pytest.fixture(scope="module")
def vllm():
    python = vllm_python()
    if python is None:
        if os.environ.get("PEFT_CTX_REQUIRE_ENGINES") == "1":
            pytest.fail("vLLM's venv is not built here: make vllm (make test-engines builds it).")
        pytest.skip("vLLM's venv is not built here (make vllm)")
    return python


@pytest.fixture(scope="module")
def rows():
    return cpkc_rows(N_QUESTIONS)


@pytest.fixture(scope="module")
def served(vllm, smollm2, minilm, tmp_path_factory):
    """Every method's adapter on one PeftModel (random LoRA B, so COCOM's merged export differs from the base) and a
    vLLM engine per adapter: xRAG and SPRING serve on the unchanged base model, so they share one server (started on
    xRAG's export; SPRING's engine reads it with its own export's fingerprint); each COCOM its merged export's."""
    base, tokenizer = smollm2
    model = every_method(base, minilm)
    exports = {}
    for name in model.peft_config:
        model.set_adapter(name)
        exports[name] = str(tmp_path_factory.mktemp(f"served_{name}"))
        peft_ctx.export_for_serving(model, exports[name], tokenizer=tokenizer, overwrite=True)

    def start(name):
        return peft_ctx.VllmEngine(exports[name], python=vllm, dtype=DTYPE, max_num_seqs=16, kv_cache_gib=1)

    owners = ("xrag", "cocom_xi16", "cocom_light")
    with ThreadPoolExecutor(3) as pool:  # ~50 s each to start on 2 cores, mostly imports: start them together
        engines = dict(zip(owners, pool.map(start, owners)))
    engines["spring"] = peft_ctx.VllmEngine(exports["spring"], url=engines["xrag"].url, dtype=DTYPE)
    yield model, tokenizer, engines
    for engine in engines.values():
        engine.close()


@pytest.mark.engines
@pytest.mark.parametrize("row", ["rag", "xrag", "spring", "cocom_xi16", "cocom_light"])
def test_vllm_answers_as_the_torch_path_does(row, served, rows, minilm):
    model, tokenizer, engines = served
    model.set_adapter("xrag" if row == "rag" else row)
    engine = engines["xrag" if row == "rag" else row]
    assert_engine_agrees(model, tokenizer, engine, row, *rows, minilm, NEW_TOKENS)


@pytest.mark.engines
def test_a_batch_is_decoded_as_one_by_one(served, rows):
    model, tokenizer, engines = served
    questions, contexts = rows
    model.set_adapter("cocom_xi16")
    prompts = peft_ctx.serving.serving_prompts(model, tokenizer, questions[:16], contexts[:16])
    stop = peft_ctx.inference.eos_ids(model, tokenizer)
    together = engines["cocom_xi16"].generate_prompts(prompts, NEW_TOKENS, stop)
    alone = [engines["cocom_xi16"].generate_prompts([p], NEW_TOKENS, stop)[0] for p in prompts]
    assert together == alone


@pytest.mark.engines
def test_vllm_refuses_another_adapters_embeddings_and_the_wrong_width(served, rows):
    model, tokenizer, engines = served
    assert_engine_refuses(model, tokenizer, engines, *rows, served_model="served model")


@pytest.mark.engines
def test_the_evaluation_harness_decodes_with_vllm_and_stops_its_servers(served, rows, tmp_path):
    from peft_ctx.harness import eval as harness

    model, tokenizer, _ = served
    questions, contexts = rows
    test_rows = [
        {"id": str(i), "question": q, "contexts": c, "answers": ["x"], "answer": "x", "choices": [], "label": None}
        for i, (q, c) in enumerate(zip(questions[:5], contexts[:5]))
    ]
    runners = [harness.AdapterRunner(name="cocom_xi16", label="COCOM", adapter_name="cocom_xi16")]
    by_engine = {}
    for engine in ("torch", "vllm"):
        settings = harness.EvalSettings(
            n_test=5, timing_examples=1, engine=engine, engine_dir=str(tmp_path), show_progress=False,
            vllm_dtype="float32",
        )  # fmt: skip
        by_engine[engine] = harness.evaluate(model, tokenizer, runners, test_rows, settings)
    torch_row, engine_row = by_engine["torch"][0], by_engine["vllm"][0]
    assert engine_row["engine"] == "vllm"
    agree = [a["prediction"] == b["prediction"] for a, b in zip(torch_row["examples"], engine_row["examples"])]
    assert sum(agree) >= 4, (torch_row["examples"], engine_row["examples"])  # of 5
    assert engine_row["e2e_s"] > 0 and engine_row["ttft_s"] > 0
    assert model.base_model.merged_lora_adapters() == []  # COCOM exported merged, then unmerged again
    served_here = str(tmp_path / "cocom_xi16")
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert served_here not in listing  # the row's server was stopped


@pytest.mark.engines
def test_the_vllm_example_runs_as_written(served, tmp_path):
    """examples/serve_vllm.py on a saved SPRING adapter: export, the engine (its own server), and the plain HTTP
    client against a running server of the base model (SPRING serves on it unchanged)."""
    model, _, engines = served
    model.save_pretrained(str(tmp_path), selected_adapters=["spring"])
    adapter, out = str(tmp_path / "spring"), str(tmp_path / "served")
    example = [sys.executable, os.path.join(ROOT, "examples", "serve_vllm.py")]

    def run(*args):
        done = subprocess.run([*example, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    run("export", "--adapter", adapter, "--out", out)
    report = run(
        "engine", "--adapter", adapter, "--served", out, "--n", "8", "--max_new_tokens", "6", "--dtype", "float32"
    )
    scores = json.loads(report[report.index("{") :])
    assert scores["same_answer_as_torch"] >= 7 / 8, scores
    lines = run("client", "--adapter", adapter, "--served", out, "--url", engines["xrag"].url, "--n", "2").splitlines()
    answers = [line for line in lines if " -> " in line]
    assert len(answers) == 2 and all(line.split(" -> ")[1] for line in answers)
