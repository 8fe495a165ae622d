"""llama.cpp on the CPU: ``LlamaCppEngine`` decodes peft_ctx prompts in this process, from a GGUF file.

It serves the model that ``export_for_serving`` wrote, converted to GGUF; the ``peft_ctx_serving.json`` beside the
GGUF says which adapter's embeddings it takes. llama.cpp comes from the ``llama-cpp-python`` package, built for this
CPU by ``make install`` (the ``serving`` extra); ``python -m peft_ctx.serving gguf EXPORT_DIR`` converts an
export with the converter that ships with llama.cpp.

Example::

    engine = peft_ctx.LlamaCppEngine("served/model-f16.gguf")
    answers = peft_ctx.generate(model, tokenizer, questions, contexts, encoder=encoder, engine=engine)
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from ..inference import ServingPrompt
from .engine import EngineTimings, GreedyEngine, check_positive, read_serving_info

_INSTALL_HINT = (
    "llama.cpp's Python binding (llama-cpp-python) is not installed: `make install` builds it for this CPU, or "
    "install it yourself with CMAKE_ARGS set for your machine (pip install llama-cpp-python)."
)


def _llama_cpp():
    try:
        import llama_cpp  # the optional `serving` extra
        from llama_cpp import _logger
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return llama_cpp, _logger


class LlamaCppEngine(GreedyEngine):
    """Greedy, batched decoding with llama.cpp of peft_ctx prompts (token runs fed as tokens, slots as embeddings).

    Args:
        model_path: a GGUF file of the model ``export_for_serving`` wrote (any weight type: f16, bf16, q8_0 ...).
        serving_info: the export's ``peft_ctx_serving.json`` (path or dict); by default the one beside the GGUF.
            Without one the engine serves a plain base model: baselines only (``generate_baseline``).
        n_ctx: context length of each sequence (prompt plus new tokens).
        n_seq_max: how many sequences one batch decodes together.
        n_threads: CPU threads (default: the CPUs this process may use).
        n_batch: the most tokens one prefill call takes.

    Example::

        engine = peft_ctx.LlamaCppEngine("served/model-f16.gguf", n_seq_max=8)
        answers = peft_ctx.generate(model, tokenizer, questions, contexts, engine=engine, max_new_tokens=30)
    """

    name = "llama.cpp"
    export_hint = "the GGUF of a peft_ctx.export_for_serving folder (python -m peft_ctx.serving gguf DIR)"
    base_hint = "the base model's GGUF"

    def __init__(
        self,
        model_path: str,
        serving_info: Optional[dict | str] = None,
        *,
        n_ctx: int = 2048,
        n_seq_max: int = 8,
        n_threads: Optional[int] = None,
        n_batch: int = 2048,
        verbose: bool = False,
    ) -> None:
        if not os.path.isfile(model_path):
            raise ValueError(
                f"No GGUF file at {model_path!r}; convert an export with python -m peft_ctx.serving gguf DIR."
            )
        check_positive(n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=n_batch)
        llama_cpp, logger = _llama_cpp()
        logger.set_verbose(verbose)
        self._lib = llama_cpp
        self.model_path = model_path
        self.info = read_serving_info(serving_info, os.path.dirname(os.path.abspath(model_path)))
        self.n_threads = n_threads or len(os.sched_getaffinity(0))
        self.n_ctx, self.n_seq_max, self.n_batch = n_ctx, n_seq_max, n_batch
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self._model = llama_cpp.llama_model_load_from_file(model_path.encode(), model_params)
        if not self._model:
            raise ValueError(f"llama.cpp could not load {model_path!r}: not a GGUF file, or an architecture it lacks.")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.hidden_size = llama_cpp.llama_model_n_embd(self._model)
        params = llama_cpp.llama_context_default_params()
        # Every sequence gets its own n_ctx (the KV cache is split evenly among n_seq_max sequences).
        params.n_ctx = n_ctx * n_seq_max
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)
        params.n_seq_max = n_seq_max
        params.n_threads = params.n_threads_batch = self.n_threads
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise ValueError(f"llama.cpp could not create a context for {model_path!r} (n_ctx={n_ctx * n_seq_max}).")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._token_batch = llama_cpp.llama_batch_init(max(n_batch, n_seq_max), 0, 1)
        self._embd_batch = llama_cpp.llama_batch_init(n_batch, self.hidden_size, 1)
        self.timings = EngineTimings()

    def close(self) -> None:
        """Free the llama.cpp model, context and batches (also done when the engine is garbage-collected)."""
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        for batch in ("_token_batch", "_embd_batch"):
            if getattr(self, batch, None) is not None:
                lib.llama_batch_free(getattr(self, batch))
                setattr(self, batch, None)
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except (TypeError, AttributeError):  # interpreter shutdown: llama_cpp's bindings are already torn down
            pass

    def __repr__(self) -> str:
        method = (self.info or {}).get("method", "base model")
        return f"LlamaCppEngine({self.model_path!r}, {method}, threads={self.n_threads})"

    def weight_bytes(self) -> int:
        """Bytes of the model's weights as llama.cpp holds them."""
        return int(self._lib.llama_model_size(self._model))

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token takes (f16 keys and values in every layer, llama.cpp's default)."""
        lib, model = self._lib, self._model
        head_dim = lib.llama_model_n_embd(model) // lib.llama_model_n_head(model)
        return 2 * 2 * lib.llama_model_n_layer(model) * lib.llama_model_n_head_kv(model) * head_dim

    # ---- decoding ----------------------------------------------------------------------------------------------
    def _decode(self, batch) -> None:
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} (context full? n_ctx={self.n_ctx}).")

    def _fill_tokens(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """Token batch from (token, position, sequence, wants logits)."""
        batch = self._token_batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(entries)

    def _prefill(self, prompt: ServingPrompt, seq: int) -> int:
        """Feed one prompt as runs of tokens and of slot embeddings; returns the position after it."""
        if prompt.slot_mask.any() and (prompt.embeds is None or prompt.embeds.dim() != 2):
            raise ValueError("A prompt with context slots needs its [seq, hidden] embeddings (see serving_prompts).")
        if prompt.embeds is not None and prompt.embeds.shape[-1] != self.hidden_size:
            raise ValueError(
                f"The prompt's embeddings have width {prompt.embeds.shape[-1]}, the GGUF model's hidden size is "
                f"{self.hidden_size}: they were built for another base model."
            )
        n = int(prompt.input_ids.shape[0])
        if n + 1 > self.n_ctx:
            raise ValueError(
                f"A prompt of {n} tokens does not fit n_ctx={self.n_ctx}; create the engine with a larger n_ctx."
            )
        ids = prompt.input_ids.tolist()
        for is_slot, start, stop in prompt.segments():
            for chunk in range(start, stop, self.n_batch):
                end = min(stop, chunk + self.n_batch)
                last = end == n
                if is_slot:
                    rows = prompt.embeds[chunk:end].detach().to(torch.float32).contiguous().cpu().numpy()
                    batch = self._embd_batch
                    ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
                    for i in range(end - chunk):
                        batch.pos[i] = chunk + i
                        batch.n_seq_id[i] = 1
                        batch.seq_id[i][0] = seq
                        batch.logits[i] = last and i == end - chunk - 1
                    batch.n_tokens = end - chunk
                else:
                    self._fill_tokens([(ids[p], p, seq, last and p == end - 1) for p in range(chunk, end)])
                    batch = self._token_batch
                self._decode(batch)
        return n

    def _argmax(self, index: int) -> int:
        logits = self._lib.llama_get_logits_ith(self._ctx, index)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def _greedy(
        self, prompts: Sequence[ServingPrompt], max_new_tokens: int, stop: set[int], min_new_tokens: int
    ) -> list[list[int]]:
        outputs: list[list[int]] = []
        timings = EngineTimings()
        for start in range(0, len(prompts), self.n_seq_max):
            group = prompts[start : start + self.n_seq_max]
            self._lib.llama_memory_clear(self._memory, True)
            began = time.perf_counter()
            positions, tokens, done = [], [], []
            for seq, prompt in enumerate(group):
                positions.append(self._prefill(prompt, seq))
                tokens.append([self._argmax(-1)])
                done.append(tokens[-1][-1] in stop and min_new_tokens <= 1)
                timings.first_token_s.append(time.perf_counter() - began)
                timings.prompt_tokens += positions[-1]
            prefilled = time.perf_counter()
            timings.prefill_s += prefilled - began
            for _ in range(max_new_tokens - 1):
                active = [seq for seq in range(len(group)) if not done[seq]]
                if not active:
                    break
                if any(positions[seq] + 1 >= self.n_ctx for seq in active):
                    raise ValueError(f"Generation ran past n_ctx={self.n_ctx}; create the engine with a larger n_ctx.")
                self._fill_tokens([(tokens[seq][-1], positions[seq], seq, True) for seq in active])
                self._decode(self._token_batch)
                for i, seq in enumerate(active):
                    positions[seq] += 1
                    tokens[seq].append(self._argmax(i))
                    done[seq] = tokens[seq][-1] in stop and len(tokens[seq]) >= min_new_tokens
            timings.decode_s += time.perf_counter() - prefilled
            for seq_tokens in tokens:
                if seq_tokens and seq_tokens[-1] in stop:
                    seq_tokens.pop()
                timings.new_tokens += len(seq_tokens)
                outputs.append(seq_tokens)
        self.timings = timings
        return outputs
