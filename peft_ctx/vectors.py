"""Document vectors encoded once, offline, stored as safetensors with what produced them: one file of ``[n, d_r]``
vectors (``save_vectors``), or a row-addressed index that training reads row by row (``build_vector_index``)."""

from __future__ import annotations

import bisect
import glob
import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoints import read_tagged_safetensors
from .config import is_int

_KEY = "vectors"


def save_vectors(
    path: str, vectors: torch.Tensor, encoder=None, metadata: Optional[dict] = None, overwrite: bool = False
) -> None:
    """Write ``vectors`` ([n_docs, d_r]) to a safetensors file, recording the encoder that made them."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    if vectors.dim() != 2:
        raise ValueError(f"vectors must be [n_docs, dim], got shape {tuple(vectors.shape)}.")
    meta = dict(metadata or {})
    if encoder is not None:
        meta.update(encoder.describe())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    save_file({_KEY: vectors.detach().float().cpu().contiguous()}, tmp, metadata={"peft_ctx": json.dumps(meta)})
    os.replace(tmp, path)  # a half-written file never takes the real name


def load_vectors(path: str) -> tuple[torch.Tensor, dict]:
    """Read vectors written by ``save_vectors``; returns (vectors [n_docs, d_r], metadata)."""
    tensors, meta = read_tagged_safetensors(path, "document vectors")
    if _KEY not in tensors:
        raise ValueError(f"{path} holds no {_KEY!r} tensor; it was not written by peft_ctx.save_vectors.")
    return tensors[_KEY], meta


# ---- the on-disk index training reads by row --------------------------------------------------------------------
VECTOR_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_SHARD = "vectors-{rank:05d}-of-{world:05d}.safetensors"


def build_vector_index(
    folder: str,
    documents: Sequence[Sequence[str]],
    encoder,
    *,
    dtype: torch.dtype = torch.float16,
    chunk_tokens: Optional[int] = None,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
) -> str:
    """Encode this rank's share of ``documents`` (row i: its list of passages) into a shard of the index in
    ``folder``; returns the shard's path. Open the whole index with ``VectorIndex(folder)`` once every rank is done.

    Rank r of ``world_size`` encodes the contiguous rows [r * n / world_size, (r + 1) * n / world_size). Each
    passage becomes one vector, or one per chunk of ``chunk_tokens`` encoder tokens. A shard holds ``vectors``
    ([n_vectors, d_r] in ``dtype``, float16 or float32) and ``offsets`` (row i's vectors are
    ``vectors[offsets[i]:offsets[i + 1]]``). A shard already written for the same rows, texts, encoder and settings
    is reused, so a resumed run does not encode again.

    Example:

    ```py
    >>> build_vector_index("out/vectors", [["passage one", "passage two"], ["passage three"]], encoder)
    >>> VectorIndex("out/vectors")[0].shape  # row 0: two passages
    torch.Size([2, 384])
    ```
    """
    if dtype not in VECTOR_DTYPES.values():
        raise ValueError(f"dtype={dtype}; the index stores float16 or float32 vectors.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not within world_size={world_size}.")
    n = len(documents)
    first, last = rank * n // world_size, (rank + 1) * n // world_size
    share = [list(documents[i]) for i in range(first, last)]
    fingerprint = hashlib.sha256(json.dumps(share).encode()).hexdigest()
    meta = {
        **encoder.describe(),
        "first_row": first,
        "n_rows": last - first,
        "total_rows": n,
        "chunk_tokens": chunk_tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "fingerprint": fingerprint,
    }
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, _SHARD.format(rank=rank, world=world_size))
    if os.path.isfile(path):
        with safe_open(path, framework="pt") as f:
            if json.loads((f.metadata() or {}).get("peft_ctx", "{}")) == meta:
                return path
    flat = [passage for passages in share for passage in passages]
    per_passage = encoder.encode_chunks(flat, chunk_tokens, batch_size=batch_size)
    counts, start = [], 0
    for passages in share:
        counts.append(sum(int(v.shape[0]) for v in per_passage[start : start + len(passages)]))
        start += len(passages)
    vectors = torch.cat(per_passage) if per_passage else torch.empty(0, encoder.hidden_size)
    offsets = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int64)
    tmp = f"{path}.tmp"
    tensors = {_KEY: vectors.to(dtype).contiguous(), "offsets": offsets}
    save_file(tensors, tmp, metadata={"peft_ctx": json.dumps(meta)})
    os.replace(tmp, path)
    return path


class VectorIndex:
    """The vectors ``build_vector_index`` wrote, memory-mapped and read by row: ``index[i]`` reads row i's vectors
    only (``[n_i, d_r]`` float32), never the whole index.

    Example:

    ```py
    >>> index = VectorIndex("out/vectors")
    >>> len(index), index.dtype, index.bytes_per_vector
    (2, torch.float16, 768)
    ```
    """

    def __init__(self, folder: str) -> None:
        paths = sorted(glob.glob(os.path.join(folder, _SHARD.replace("{rank:05d}", "*").replace("{world:05d}", "*"))))
        if not paths:
            raise ValueError(f"{folder} holds no vector index shards; write them with build_vector_index.")
        self.folder = folder
        shards = []
        for path in paths:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("peft_ctx", "{}"))
                shards.append((meta["first_row"], path, f.get_tensor("offsets"), meta))
        shards.sort(key=lambda shard: shard[0])
        self.metadata = {k: v for k, v in shards[0][3].items() if k not in ("first_row", "n_rows", "fingerprint")}
        self._starts = [first for first, *_ in shards]
        self._paths = [path for _, path, _, _ in shards]
        self._offsets = [offsets for _, _, offsets, _ in shards]
        expected = 0
        for first, path, _, meta in shards:
            if first != expected or meta["total_rows"] != self.metadata["total_rows"]:
                raise ValueError(
                    f"The shards in {folder} do not cover rows 0..{self.metadata['total_rows'] - 1} once each "
                    f"({path} starts at row {first}, expected {expected}); rebuild the index with one world size."
                )
            expected += meta["n_rows"]
        if expected != self.metadata["total_rows"]:
            raise ValueError(f"The shards in {folder} hold {expected} of {self.metadata['total_rows']} rows.")
        self.dtype = VECTOR_DTYPES[self.metadata["dtype"]]
        self.dim = int(self.metadata["retriever_hidden_size"])
        self.bytes_per_vector = self.dim * torch.finfo(self.dtype).bits // 8
        self._files: Optional[list] = None

    def __len__(self) -> int:
        return int(self.metadata["total_rows"])

    def __getitem__(self, row: int) -> torch.Tensor:
        if not is_int(row) or not 0 <= row < len(self):
            raise IndexError(f"Row {row!r} is not in this vector index of {len(self)} rows.")
        shard = bisect.bisect_right(self._starts, row) - 1
        local = row - self._starts[shard]
        start, end = int(self._offsets[shard][local]), int(self._offsets[shard][local + 1])
        if self._files is None:  # opened lazily: each DataLoader worker process opens its own mappings
            self._files = [safe_open(path, framework="pt") for path in self._paths]
        return self._files[shard].get_slice(_KEY)[start:end].float()  # [n_row, d_r]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": None}
