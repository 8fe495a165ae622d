"""xRAG lever probe (issue 15): does the retriever's vector of a passage tell the two candidate answers apart?

    .venv/bin/python benchmarks/levers/vector_probe.py

No training: on 300 CPKC validation questions, the candidate whose MiniLM vector has the higher cosine with the
passage's vector, against the label; the same with the next question's passage and with the question alone. The
numbers it printed are in README.md (issue 15's levers).
"""

import time

import torch

from peft_ctx.encoders import Encoder
from peft_ctx.harness import assets
from peft_ctx.harness.data import load_qa

torch.set_num_threads(2)
d = load_qa("cpkc", seed=0, max_context_chars=1000)
rows = [r for r in d["validation"] if len(r["choices"]) == 2][:300]
enc = Encoder(assets.resolve(assets.MINILM_HUB_ID))
t = time.time()
P = enc.encode([r["contexts"][0] for r in rows])
C0 = enc.encode([r["choices"][0] for r in rows])
C1 = enc.encode([r["choices"][1] for r in rows])
print("enc s", time.time() - t, P.shape)
import torch.nn.functional as F  # noqa: E402


def acc(P):
    s0 = F.cosine_similarity(P, C0)
    s1 = F.cosine_similarity(P, C1)
    pred = (s1 > s0).long()
    lab = torch.tensor([r["label"] for r in rows])
    return (pred == lab).float().mean().item()


print("right passage", acc(P))
print("shifted passage", acc(P.roll(1, 0)))
Q = enc.encode([r["question"] for r in rows])
print("question only", acc(Q))
