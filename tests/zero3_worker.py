"""One rank of the DeepSpeed ZeRO-3 test (tests/test_distributed.py): ``python -m torch.distributed.run
--nproc_per_node 2 tests/zero3_worker.py OUT ENCODER_DIR BASE_DIR`` (BASE_DIR: the tiny llama, saved).

For every method the tiny llama is loaded with transformers' ZeRO-3 integration on (its weights are partitioned as
they load, before the adapter is injected, as with accelerate's ``zero3_init_flag``), every parameter is partitioned
(persistence threshold 0: tiny tensors would otherwise stay whole and hide a read outside its module's forward), and
the engine trains SGD steps on this rank's examples. The adapter is saved from
``peft_ctx.gathered_adapter_state_dict`` and the gathered trained parameters are written beside it
(``<method>/trained.safetensors``), as in tests/fsdp_worker.py.
"""

from __future__ import annotations

import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peft_ctx  # noqa: E402
from peft_ctx.harness import assets  # noqa: E402
from peft_ctx.training import save_adapter  # noqa: E402
from tests.distributed_case import LR, METHOD_NAMES, STEPS, build, rank_inputs  # noqa: E402

CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 0.0,
    "zero_allow_untested_optimizer": True,  # plain SGD: its updates are linear in the gradients, so comparable
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


def main(out: str, encoder_dir: str, base_dir: str) -> None:
    # DeepSpeed's CPU shared-memory collectives are a C++ extension compiled on first use (about 1.5 minutes);
    # gloo does the same work here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_tokenizer_dir())
    encoder = peft_ctx.Encoder(encoder_dir)
    zero3 = HfDeepSpeedConfig(CONFIG)  # noqa: F841  (while it lives, from_pretrained partitions the weights)
    for method in METHOD_NAMES:
        base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
        assert base.get_input_embeddings().weight.shape == torch.Size([0]), "the base was not loaded partitioned"
        model = build(method, tokenizer, encoder_dir, base=base)
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(trainable, lr=LR), config=CONFIG, model_parameters=trainable
        )
        assert all(p.shape == torch.Size([0]) for p in trainable), "ZeRO-3 left an adapter tensor whole"
        engine.train()
        for step in range(STEPS):
            loss = engine(**rank_inputs(method, model, tokenizer, encoder, rank, world, step)).loss
            engine.backward(loss)  # ZeRO-3 averages the gradients over the ranks, as DDP does
            engine.step()
        state = peft_ctx.gathered_adapter_state_dict(model)  # collective: every rank calls it
        with peft_ctx.distributed.gathered(*trainable):
            trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if rank == 0:
            target = os.path.join(out, method)
            save_adapter(model, target, state_dict=state)
            save_file(trained, os.path.join(target, "trained.safetensors"))
        dist.barrier()
        engine.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
