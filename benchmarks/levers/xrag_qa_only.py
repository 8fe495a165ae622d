"""xRAG lever experiment (issue 15): QA-only training of the projector on distinct CPKC training questions.

    .venv/bin/python benchmarks/levers/xrag_qa_only.py   # env: N_TRAIN=6000 STEPS=750 EVERY=125 LR=2e-3 BF16=1

The exact script of the run in xrag_qa_only.log (only reformatted by ruff since), outside the training stack on
purpose (a plain loop, bf16 autocast, no teacher): SmolLM2-135M-Instruct frozen, the MiniLM projector trained with
NLL on the answer, batch 8, lr 2e-3 (20 warm-up steps, linear decay), on the first N_TRAIN training-split questions
(never validation or test). Every EVERY steps: choice accuracy on 100 validation questions with their own passage
and with the next question's passage.
"""
# Quick xRAG lever experiment: QA-only on CPKC train split, eval choice acc on validation (right vs shifted).

import os
import random
import time

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_ctx.encoders import Encoder
from peft_ctx.harness import assets
from peft_ctx.harness import eval as H
from peft_ctx.harness.data import load_qa
from peft_ctx.methods import Resources
from peft_ctx.xrag import recipe
from peft_ctx.xrag.method import _config

torch.set_num_threads(2)
torch.manual_seed(0)
N_TRAIN = int(os.environ.get("N_TRAIN", 4000))
LR = float(os.environ.get("LR", 2e-3))
BS = 8
BF16 = os.environ.get("BF16", "1") == "1"
STEPS = int(os.environ.get("STEPS", 500))
EVERY = int(os.environ.get("EVERY", 100))
d = load_qa("cpkc", seed=0, max_context_chars=1000)
train = [dict(r) for r in d["train"]][:N_TRAIN]
val = [dict(r) for r in d["validation"] if len(r["choices"]) >= 2][:100]
enc = Encoder(assets.resolve(assets.MINILM_HUB_ID))
mdir = assets.resolve(assets.SMOLLM2_HUB_ID)
tok = AutoTokenizer.from_pretrained(mdir)
base = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
model = get_peft_model(base, _config(Resources(assets.SMOLLM2_HUB_ID, assets.MINILM_HUB_ID, enc)))
t = time.time()
cache = f"/tmp/exp/xrag_ds_{N_TRAIN}"
if os.path.isdir(cache):
    from datasets import load_from_disk

    ds = load_from_disk(cache)
else:
    # As run, encode_documents returned a dataset of vector lists; it now returns (dataset, on-disk index), and the
    # collator below would need vector_index=index.
    ds, index = recipe.encode_documents(
        [{k: r[k] for k in ("question", "answer", "contexts")} for r in train], enc, "instruct"
    )
    ds.save_to_disk(cache)
print("encode", time.time() - t, flush=True)
coll = recipe.collator(model.active_peft_config, tok, "instruct", padding_side="left", model=model)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 20) * max(0.0, 1 - s / STEPS))
runner = H.AdapterRunner(name="xrag", label="xrag", adapter_name="default", encoder=enc)
shifted = [dict(r, contexts=val[(i + 1) % len(val)]["contexts"], id=r["id"] + "-s") for i, r in enumerate(val)]


def evaluate():
    model.eval()
    out = {}
    for name, rows in (("right", val), ("wrong", shifted)):
        runner.precompute(model, tok, rows)
        s = H.choice_scores(model, tok, runner, rows, 16)
        out[name] = H.metrics.choice_accuracy(s, [r["label"] for r in rows])
    model.train()
    return out


print("step 0", evaluate(), flush=True)
order = list(range(len(ds)))
random.Random(0).shuffle(order)
model.train()
t = time.time()
losses = []
from peft_ctx.training import answer_logits  # noqa

for step in range(STEPS):
    idx = [order[(step * BS + j) % len(order)] for j in range(BS)]
    batch = coll([ds[i] for i in idx])
    labels = batch.pop("labels")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
        _, lg, tg = answer_logits(model, {k: v for k, v in batch.items() if not k.startswith("teacher")}, labels)
    loss = torch.nn.functional.cross_entropy(lg, tg)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()
    losses.append(loss.item())
    if (step + 1) % EVERY == 0:
        print(
            f"step {step + 1} ex {(step + 1) * BS} loss {sum(losses[-EVERY:]) / EVERY:.3f} "
            f"{(time.time() - t) / (step + 1):.2f}s/step",
            evaluate(),
            flush=True,
        )
