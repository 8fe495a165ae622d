"""Speed, memory and index size of every peft_ctx method against text RAG, measured side by side in one process.

    python -m benchmarks.run                      # SmolLM2-135M-Instruct, the xRAG paper's profile (make bench)
    python -m benchmarks.run --model PATH_OR_ID --methods rag xrag --repeats 5 --out /tmp/bench

Profile (xRAG paper): 1 and 5 documents of 180 tokens, a 54-token instruction, 30 generated tokens, batch 1 and 8.
Every method decodes with the same loop and the same weights (``peft_ctx.harness.fast``; by default the set-up that
``benchmarks/decoding.py`` found fastest with fp32's answers, recorded in ``results/decoding.json``), the text-RAG
baseline included. Per row:
prompt tokens, FLOPs (FlopCounterMode, checked against 2 x parameters x tokens), time to first token, end-to-end
latency, tokens/s, peak memory, index bytes per passage and encode throughput; per method the training throughput
against LoRA SFT on text-RAG prompts. Timings are medians over repetitions after a warm-up, with the methods
interleaved in every repetition so that a busy machine slows all of them alike; ratios are against text RAG.
Adapters are freshly initialised unless ``--adapter NAME=DIR`` loads trained ones: speed does not depend on the
weights, the answers do. Writes ``bench.json``, ``bench.md`` and ``bench.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm

import peft_ctx
from peft_ctx.harness.fast import CACHES, WEIGHT_FORMATS, convert_weights, greedy_generate, weight_bytes
from peft_ctx.inference import batch_prompts
from peft_ctx.prompting import RAG_TEMPLATE

from . import engine_rows, measure
from .common import DEFAULT_MODEL, load_model, machine, median, resolve_device, set_threads
from .engine_rows import EXPORT_TYPES
from .methods import BenchMethod, Env, registry, select
from .report import markdown, notes, plot
from .workload import build_workload

RESULTS = os.path.join(os.path.dirname(__file__), "results")
WEIGHTS = ("auto",) + WEIGHT_FORMATS
# "both": torch and llama.cpp; "all": and vLLM (its server in the venv make vllm builds).
BENCH_ENGINES = ("torch", "llama.cpp", "vllm", "both", "all")
ENGINE_SETS = {"both": ["torch", "llama.cpp"], "all": ["torch", "llama.cpp", "vllm"]}


@dataclass
class EngineRun:
    ttft_s: float
    e2e_s: float


@dataclass
class Settings:
    model: str = DEFAULT_MODEL
    encoder: Optional[str] = None
    methods: Optional[list[str]] = None
    docs: list[int] = field(default_factory=lambda: [1, 5])
    batch: list[int] = field(default_factory=lambda: [1, 8])
    doc_tokens: int = 180
    instruction_tokens: int = 54
    new_tokens: int = 30
    repeats: int = 5
    weights: str = "auto"
    cache: str = "auto"
    device: str = "auto"
    threads: Optional[int] = None
    train_batch: int = 2
    train_docs: int = 1
    train_steps: int = 2
    encode_passages: int = 16
    skip_training: bool = False
    skip_memory: bool = False
    adapters: dict[str, str] = field(default_factory=dict)
    engine: str = "all"  # torch, llama.cpp, vllm, both (torch and llama.cpp) or all (every row on each engine)
    gguf_type: str = "auto"  # llama.cpp weights: engines.json's pick, else f16
    vllm_dtype: str = "auto"  # vLLM's weights: auto (bf16 where the hardware has it, else fp32), float32 or bfloat16
    out: str = RESULTS

    def __post_init__(self):
        for name in (
            "doc_tokens",
            "instruction_tokens",
            "new_tokens",
            "repeats",
            "train_batch",
            "train_docs",
            "train_steps",
            "encode_passages",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)}; give a positive number.")
        if not self.docs or min(self.docs) < 1 or not self.batch or min(self.batch) < 1:
            raise ValueError(f"--docs {self.docs} and --batch {self.batch} must be positive numbers.")
        if self.new_tokens < 2:
            raise ValueError("--new-tokens must be >= 2: end-to-end time then covers decoding, not only the prefill.")
        if self.weights not in WEIGHTS:
            raise ValueError(f"--weights={self.weights!r}; choose one of {', '.join(WEIGHTS)}.")
        if self.cache not in ("auto",) + CACHES:
            raise ValueError(f"--cache={self.cache!r}; choose auto or one of {', '.join(CACHES)}.")
        if self.engine not in BENCH_ENGINES:
            raise ValueError(f"--engine={self.engine!r}; choose one of {', '.join(BENCH_ENGINES)}.")
        if self.vllm_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--vllm-dtype={self.vllm_dtype!r}; choose auto, float32 or bfloat16.")
        if self.gguf_type not in ("auto",) + EXPORT_TYPES:
            raise ValueError(f"--gguf-type={self.gguf_type!r}; choose auto or one of {', '.join(EXPORT_TYPES)}.")
        known = registry()
        unknown = sorted(set(self.adapters) - set(known))
        if unknown:
            raise ValueError(f"--adapter names {unknown} are no benchmark method; choose from {', '.join(known)}.")


def recommended_setup(device: torch.device, model: str) -> dict:
    """The decoding set-up ``benchmarks/decoding.py`` recommends for this model on CPU; fp32 / static cache when it
    was not run for this model. GPUs use bf16 weights."""
    if device.type != "cpu":
        return {"weights": "bf16", "cache": "static", "source": "GPU default"}
    path = os.path.join(RESULTS, "decoding.json")
    if os.path.isfile(path):
        with open(path) as f:
            decoding = json.load(f)
        if decoding.get("model") == model and decoding.get("recommended"):
            return {**decoding["recommended"], "source": path}
    return {"weights": "fp32", "cache": "static", "source": "default (no decoding.json for this model)"}


def _weights_for(settings: Settings, device: torch.device) -> str:
    if settings.weights != "auto":
        if settings.weights in ("fp16w", "int8") and device.type != "cpu":
            raise ValueError(f"--weights {settings.weights} uses torch's CPU kernels; on a GPU use fp32 or bf16.")
        return settings.weights
    return recommended_setup(device, settings.model)["weights"]


class Bench:
    """One comparison: every method built from the same base model and measured in this process."""

    def __init__(self, settings: Settings, base=None, tokenizer=None, passages=None):
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.threads = set_threads(settings.threads) if self.device.type == "cpu" else None
        start = time.perf_counter()
        if base is None:
            base, tokenizer = load_model(settings.model, self.device)
        self.base, self.tokenizer = base.eval(), tokenizer
        self.load_s = time.perf_counter() - start
        self.weights = _weights_for(settings, self.device)
        self.cache = settings.cache
        if self.cache == "auto":
            self.cache = recommended_setup(self.device, settings.model)["cache"]
        self.env = Env(
            tokenizer=tokenizer, device=self.device, encoder_path=settings.encoder, base_model=settings.model
        )
        n_examples = max(max(settings.batch), settings.train_batch)
        self.work = build_workload(
            tokenizer,
            RAG_TEMPLATE,  # text RAG's prompt, as in xRAG
            n_examples=n_examples,
            max_docs=max(max(settings.docs), settings.train_docs),
            doc_tokens=settings.doc_tokens,
            instruction_tokens=settings.instruction_tokens,
            passages=passages,
        )
        self.methods, self.skipped = select(settings.methods)
        self.models: dict[str, object] = {}
        self.entries: dict[str, list] = {}
        self.setup_s: dict[str, float] = {}
        self.warmup_s: dict[str, float] = {}
        self.engines: dict[str, object] = {}  # llama.cpp, per method
        self.vllm: dict[str, object] = {}  # vLLM, per method
        self.engine_names = ENGINE_SETS.get(settings.engine, [settings.engine])
        self.vllm_dtype = peft_ctx.serving.default_dtype() if settings.vllm_dtype == "auto" else settings.vllm_dtype
        self.gguf_type, self.gguf_source = (
            engine_rows.recommended_gguf_type()
            if settings.gguf_type == "auto"
            else (settings.gguf_type, "--gguf-type")
        )

    # ---- building -----------------------------------------------------------------------------------------------
    def _load_adapter(self, method: BenchMethod, model) -> None:
        path = self.settings.adapters.get(method.name)
        if path is None:
            return
        if not method.adapter:
            raise ValueError(f"--adapter {method.name}={path}: {method.name} has no adapter to load.")
        model.load_adapter(path, adapter_name="trained")
        model.set_adapter("trained")
        model.delete_adapter(method.name)

    def build(self) -> None:
        for method in tqdm(self.methods, desc="Building models"):
            start = time.perf_counter()
            model = method.build(self.env, copy.deepcopy(self.base))
            self._load_adapter(method, model)
            self.models[method.name] = model.eval()
            self.setup_s[method.name] = time.perf_counter() - start

    def export_engines(self) -> None:
        """Each method's model as llama.cpp serves it (GGUF) and as vLLM serves it, for the engines this run has."""
        if "llama.cpp" in self.engine_names:
            self.engines = engine_rows.llama_cpp_engines(self)
        if "vllm" in self.engine_names:
            self.vllm = engine_rows.vllm_engines(self)

    def close(self) -> None:
        """Stop the vLLM servers (owners last, after the engines that only read them)."""
        for engine in sorted(self.vllm.values(), key=lambda e: e.running):
            engine.close()

    def serve(self) -> None:
        """Every model as a server runs it once its index is built (merged LoRA), in the benchmark's weight format."""
        for method in self.methods:
            start = time.perf_counter()
            model = method.serve(self.env, self.models[method.name])
            self.models[method.name] = convert_weights(model, self.weights).eval()
            self.setup_s[method.name] += time.perf_counter() - start

    # ---- the index ----------------------------------------------------------------------------------------------
    def index(self) -> dict[str, dict]:
        """Encode every workload passage once per method (kept for the inference rows); report bytes per passage on
        disk and the encode throughput, timed on the first ``encode_passages`` passages after a warm-up."""
        passages = self.work.passages
        n_timed = min(self.settings.encode_passages, len(passages))
        out = {}
        for method in tqdm(self.methods, desc="Encoding passages"):
            model = self.models[method.name]
            method.encode(self.env, model, passages[:2])  # warm-up
            start = time.perf_counter()
            timed = method.encode(self.env, model, passages[:n_timed])
            seconds = time.perf_counter() - start
            rest = method.encode(self.env, model, passages[n_timed:]).entries if n_timed < len(passages) else []
            self.entries[method.name] = timed.entries + rest
            out[method.name] = {
                "index_bytes_per_passage": timed.bytes_on_disk() / n_timed,
                "encode_passages_per_s": n_timed / seconds if method.encodes else None,
            }
        return out

    def _entries(self, method: BenchMethod, docs: int, batch: int) -> tuple[list[str], list[list]]:
        """Questions and their looked-up index entries (example i reads passages ``Workload.docs_for(i, docs)``)."""
        position = {text: i for i, text in enumerate(self.work.passages)}
        entries = [
            [self.entries[method.name][position[text]] for text in self.work.docs_for(i, docs)] for i in range(batch)
        ]
        return self.work.questions[:batch], entries

    # ---- inference ----------------------------------------------------------------------------------------------
    def _generate(self, name: str, inputs: dict, engine: str = "torch"):
        if engine == "torch":
            return greedy_generate(self.models[name], inputs, self.settings.new_tokens, cache=self.cache)
        # The same inputs: the slots are filled (embedding lookup, COCOM's index entries) inside the timed part, as
        # in the torch path; no end token, so every row decodes exactly new_tokens tokens.
        start = time.perf_counter()
        prompts = batch_prompts(self.models[name], inputs)
        runner = (self.engines if engine == "llama.cpp" else self.vllm)[name]
        runner.generate_prompts(prompts, self.settings.new_tokens)
        e2e = time.perf_counter() - start
        return EngineRun(ttft_s=e2e - runner.timings.decode_s, e2e_s=e2e)

    def group(self, docs: int, batch: int) -> list[dict]:
        """All methods at one (docs, batch) point, timed interleaved."""
        s = self.settings
        inputs, rows = {}, {}
        for method in self.methods:
            questions, entries = self._entries(method, docs, batch)
            inputs[method.name] = method.inputs(self.env, self.models[method.name], questions, entries)
        for method in tqdm(self.methods, desc=f"FLOPs/memory, {docs} docs, batch {batch}", leave=False):
            name, model, batch_inputs = method.name, self.models[method.name], inputs[method.name]
            start = time.perf_counter()
            # One untimed run counts FLOPs and peak memory together; it is also this method's warm-up.
            flops, peak = measure.profile_generation(
                model, batch_inputs, s.new_tokens, self.cache, self.device, memory=not s.skip_memory
            )
            self.warmup_s.setdefault(name, time.perf_counter() - start)
            prompt_total = int(batch_inputs["attention_mask"].sum())
            estimate = measure.flops_estimate(model, prompt_total, batch, s.new_tokens)
            rows[name] = {
                "method": name,
                "label": method.label,
                "docs": docs,
                "batch": batch,
                "prompt_tokens": prompt_total / batch,
                "padded_prompt_tokens": int(batch_inputs["input_ids"].shape[1]),
                **flops,
                "flops_estimate_2NT": estimate,
                "flops_linear_vs_estimate": (flops["flops"] - flops["flops_attention"]) / estimate,
                "weight_bytes": weight_bytes(model),
                "peak_activation_bytes": peak,
                "peak_mem_bytes": None if peak is None else weight_bytes(model) + peak,
                "_ttft": [],
                "_e2e": [],
            }
        for row in rows.values():
            row["engine"] = self.engine_names[0]
        for engine_name in self.engine_names[1:] if "torch" in self.engine_names else self.engine_names:
            for method in self.methods:
                self._generate(method.name, inputs[method.name], engine_name)  # warm-up
                engine = (self.engines if engine_name == "llama.cpp" else self.vllm)[method.name]
                rows[(method.name, engine_name)] = engine_rows.engine_row(self, engine, rows[method.name], batch)
        if "torch" not in self.engine_names:
            for method in self.methods:
                del rows[method.name]
        else:
            for method in self.methods:
                rows[method.name]["engine"] = "torch"
        timed = [
            (key, key if isinstance(key, str) else key[0], "torch" if isinstance(key, str) else key[1]) for key in rows
        ]
        for rep in tqdm(range(s.repeats), desc=f"Timing, {docs} docs, batch {batch}", leave=False):
            # Rotate the order each repetition: a method never always runs right after the same neighbour.
            shift = rep % len(timed)
            for key, name, engine in timed[shift:] + timed[:shift]:
                result = self._generate(name, inputs[name], engine)
                rows[key]["_ttft"].append(result.ttft_s)
                rows[key]["_e2e"].append(result.e2e_s)
        out = []
        for key, _, _ in timed:
            row = rows[key]
            ttfts, e2es = row.pop("_ttft"), row.pop("_e2e")
            row["ttft_s"], row["e2e_s"] = median(ttfts), median(e2es)
            row["ttft_runs_s"], row["e2e_runs_s"] = ttfts, e2es
            row["tokens_per_s"] = batch * s.new_tokens / row["e2e_s"]
            row["decode_s_per_token"] = (row["e2e_s"] - row["ttft_s"]) / (s.new_tokens - 1)
            out.append(row)
        for row in out:
            rag = next(r for r in out if r["method"] == "rag" and r["engine"] == row["engine"])  # same engine
            row["ttft_speedup_vs_rag"] = rag["ttft_s"] / row["ttft_s"]
            row["e2e_speedup_vs_rag"] = rag["e2e_s"] / row["e2e_s"]
            row["prompt_token_ratio_vs_rag"] = rag["prompt_tokens"] / row["prompt_tokens"]
            row["flops_ratio_vs_rag"] = rag["flops"] / row["flops"]
            # Paired ratios (same repetition) are steadier than ratios of medians when the machine's load drifts.
            row["e2e_speedup_paired_median"] = median(r / m for r, m in zip(rag["e2e_runs_s"], row["e2e_runs_s"]))
        fastest_rag = min((r for r in out if r["method"] == "rag"), key=lambda r: r["e2e_s"])
        for row in out:
            # Against text RAG on whichever engine serves it fastest (issue 16's end-to-end comparison).
            row["e2e_speedup_vs_fastest_rag"] = fastest_rag["e2e_s"] / row["e2e_s"]
            row["fastest_rag_engine"] = fastest_rag["engine"]
        return out

    # ---- training -----------------------------------------------------------------------------------------------
    def training(self) -> dict[str, dict]:
        """Samples/s of one optimiser step per method (fp32), against LoRA SFT on text-RAG prompts (row ``rag``); every
        step computes the one training stack's loss (``ContextSFTTrainer.compute_loss``)."""
        s = self.settings
        questions = self.work.questions[: s.train_batch]
        passages = [self.work.docs_for(i, s.train_docs) for i in range(s.train_batch)]
        answers = [_answer(self.tokenizer, p[0], s.new_tokens) for p in passages]
        steps = {}
        scratch = tempfile.mkdtemp(prefix="peft_ctx_bench_")  # the trainers' output_dir; nothing is saved there
        for method in tqdm(self.methods, desc="Training set-up", leave=False):
            if method.trains is None:
                continue
            model = method.trainable(self.env, copy.deepcopy(self.base).requires_grad_(False))
            batch = method.train_inputs(self.env, model, questions, passages, answers)
            loss = measure.one_stack_loss(model, self.tokenizer, self.device, scratch)
            step = measure.make_train_step(model, batch, loss)
            step()  # warm-up (and optimiser state allocation)
            steps[method.name] = (step, model, method)
        times: dict[str, list[float]] = {name: [] for name in steps}
        names = list(steps)
        for rep in tqdm(range(s.train_steps), desc="Training steps", leave=False):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(measure.timed(steps[name][0], self.device))
        out = {}
        lora = median(times["rag"]) if "rag" in times else None
        for name, (_, model, method) in steps.items():
            seconds = median(times[name])
            out[name] = {
                "train_samples_per_s": s.train_batch / seconds,
                "train_speedup_vs_lora_sft": None if lora is None else lora / seconds,
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "trains": method.trains,
            }
        del steps
        shutil.rmtree(scratch, ignore_errors=True)
        return out

    # ---- everything ---------------------------------------------------------------------------------------------
    def run(self) -> dict:
        s = self.settings
        load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        started = time.perf_counter()
        self.build()
        index = self.index()
        self.export_engines()
        self.serve()
        rows = []
        try:
            for docs in s.docs:
                for batch in s.batch:
                    rows.extend(self.group(docs, batch))
        finally:
            self.close()
        training = {} if s.skip_training else self.training()
        by_name = {m.name: m for m in self.methods}
        for row in rows:
            row.update(index[row["method"]])
            row.update(training.get(row["method"], {}))
            row["weights"] = {"torch": self.weights, "llama.cpp": self.gguf_type}.get(row["engine"], self.vllm_dtype)
            row["adapter"] = (
                "trained" if row["method"] in s.adapters else ("untrained" if by_name[row["method"]].adapter else None)
            )
        info = machine()
        info["load_average_before"] = load_before
        return {
            "description": "peft_ctx benchmarks: methods vs text RAG, one process, medians of interleaved runs",
            "settings": {
                **asdict(s),
                "weights": self.weights,
                "cache": self.cache,
                "engines": self.engine_names,
                "gguf_type": self.gguf_type if "llama.cpp" in self.engine_names else None,
                "gguf_type_source": self.gguf_source,
                "vllm_dtype": self.vllm_dtype if "vllm" in self.engine_names else None,
            },
            "machine": info,
            "notes": notes(self),
            "timing_s": {
                "load_model": self.load_s,
                "build_and_quantize_per_method": self.setup_s,
                "first_generation_per_method": self.warmup_s,
                "total": time.perf_counter() - started + self.load_s,
            },
            "skipped_methods": self.skipped,
            "rows": rows,
        }


def _answer(tokenizer, passage: str, n_tokens: int) -> str:
    ids = tokenizer(passage, add_special_tokens=False).input_ids[:n_tokens]
    return tokenizer.decode(ids).strip()


def write_results(result: dict, out: str) -> dict[str, str]:

    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, f"bench.{name}") for name in ("json", "md", "png")}
    with open(paths["json"] + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(paths["json"] + ".tmp", paths["json"])
    with open(paths["md"], "w") as f:
        f.write(markdown(result))
    plot(result, paths["png"])
    return paths


def parse_args(argv=None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Settings()
    parser.add_argument(
        "--model", default=d.model, help="Model Hub id (offline assets: a local copy), alias ('smollm2') or folder."
    )
    parser.add_argument("--encoder", default=None, help="xRAG's retriever / COCOM-light's encoder (default MiniLM).")
    parser.add_argument("--methods", nargs="+", default=None, help=f"Subset of: {' '.join(registry())} (rag always).")
    parser.add_argument("--docs", nargs="+", type=int, default=d.docs)
    parser.add_argument("--batch", nargs="+", type=int, default=d.batch)
    parser.add_argument("--doc-tokens", type=int, default=d.doc_tokens)
    parser.add_argument("--instruction-tokens", type=int, default=d.instruction_tokens)
    parser.add_argument("--new-tokens", type=int, default=d.new_tokens)
    parser.add_argument("--repeats", type=int, default=d.repeats, help="Timed repetitions after the warm-up.")
    parser.add_argument(
        "--weights", default=d.weights, choices=WEIGHTS, help="auto: decoding.json's pick on CPU, bf16 on GPU."
    )
    parser.add_argument("--cache", default=d.cache, choices=("auto",) + CACHES)
    parser.add_argument("--device", default=d.device, help="auto, cpu or cuda.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--train-batch", type=int, default=d.train_batch)
    parser.add_argument("--train-docs", type=int, default=d.train_docs)
    parser.add_argument("--train-steps", type=int, default=d.train_steps, help="Timed training steps per method.")
    parser.add_argument("--encode-passages", type=int, default=d.encode_passages)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=DIR", help="Load a trained adapter for a method."
    )
    parser.add_argument(
        "--engine",
        default=d.engine,
        choices=BENCH_ENGINES,
        help="who decodes: one engine, both (torch, llama.cpp) or all",
    )
    parser.add_argument("--vllm-dtype", default=d.vllm_dtype, choices=("auto", "float32", "bfloat16"))
    parser.add_argument(
        "--gguf-type", default=d.gguf_type, help=f"llama.cpp weights: auto or one of {', '.join(EXPORT_TYPES)}"
    )
    parser.add_argument("--out", default=d.out, help="Folder for bench.json / bench.md / bench.png.")
    args = parser.parse_args(argv)
    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise SystemExit(f"--adapter {item!r}: write NAME=DIR, e.g. --adapter xrag=out/xrag-adapter.")
        adapters[name] = path
    values = {k: v for k, v in vars(args).items() if k != "adapter"}
    return Settings(**values, adapters=adapters)


def main(argv=None) -> dict:
    settings = parse_args(argv)
    result = Bench(settings).run()
    paths = write_results(result, settings.out)

    print(markdown(result))
    print(f"Wrote {', '.join(paths.values())}")
    return result


if __name__ == "__main__":
    main()
