"""One rank of the FSDP2 test (tests/test_distributed.py): ``python -m torch.distributed.run --nproc_per_node 2
tests/fsdp_worker.py OUT ENCODER_DIR [BASE_DIR]`` (the base: built here, as in distributed_case).

For every method it shards a tiny llama the way accelerate's FSDP2 plugin does (``fully_shard`` on each decoder layer,
then on the whole PEFT model), trains a few SGD steps on this rank's examples, saves the adapter with
``peft_ctx.training.save_adapter`` from ``peft_ctx.gathered_adapter_state_dict`` and writes, beside it, the gathered
trained parameters (``<method>/trained.safetensors``) for the test to compare with the file and with one process.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peft_ctx  # noqa: E402
from peft_ctx.harness import assets  # noqa: E402
from peft_ctx.training import save_adapter  # noqa: E402
from tests.distributed_case import LR, METHOD_NAMES, STEPS, build, rank_inputs  # noqa: E402


def main(out: str, encoder_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_tokenizer_dir())
    encoder = peft_ctx.Encoder(encoder_dir)
    for method in METHOD_NAMES:
        model = build(method, tokenizer, encoder_dir)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        sharded = [n for n, p in model.named_parameters() if p.requires_grad and type(p).__name__ == "DTensor"]
        assert sharded, "fully_shard left the adapter's parameters whole"
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        model.train()
        for step in range(STEPS):
            inputs = rank_inputs(method, model, tokenizer, encoder, rank, world, step)
            model(**inputs).loss.backward()  # FSDP2 averages the gradients over the ranks, as DDP does
            optimizer.step()
            optimizer.zero_grad()
        state = peft_ctx.gathered_adapter_state_dict(model)  # collective: every rank calls it
        trained = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if rank == 0:
            target = os.path.join(out, method)
            save_adapter(model, target, state_dict=state)
            save_file({n: t.contiguous() for n, t in trained.items()}, os.path.join(target, "trained.safetensors"))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])  # BASE_DIR, for the ZeRO-3 worker's sake, is not needed here
