"""xRAG lever probe (issue 15): the frozen LLM's own mean-pooled hidden states as the retriever.

    .venv/bin/python benchmarks/levers/llm_pooled_probe.py

As vector_probe.py, with SmolLM2-135M-Instruct's hidden states (mean over the passage / the candidate) at several
layers, on 150 validation questions. Output in llm_pooled_probe.log (layers 0, 4, 8, 15; the run printed no line for
layer 30).
"""

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_ctx.harness import assets
from peft_ctx.harness.data import load_qa

torch.set_num_threads(1)
d = load_qa("cpkc", seed=0, max_context_chars=1000)
rows = [r for r in d["validation"] if len(r["choices"]) == 2][:150]
mdir = assets.resolve(assets.SMOLLM2_HUB_ID)
tok = AutoTokenizer.from_pretrained(mdir)
m = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()


@torch.no_grad()
def pooled(texts, layer):
    out = []
    for t in texts:
        ids = tok(t, return_tensors="pt", truncation=True, max_length=256)
        h = m(**ids, output_hidden_states=True).hidden_states[layer][0]
        out.append(h.mean(0))
    return torch.stack(out)


lab = torch.tensor([r["label"] for r in rows])
for layer in (0, 4, 8, 15, 30):
    P = pooled([r["contexts"][0] for r in rows], layer)
    C0 = pooled([r["choices"][0] for r in rows], layer)
    C1 = pooled([r["choices"][1] for r in rows], layer)

    def acc(P):  # C0 / C1 of this layer: called inside the loop only
        return (((F.cosine_similarity(P, C1) > F.cosine_similarity(P, C0)).long()) == lab).float().mean().item()  # noqa: B023

    print(layer, "right", acc(P), "shifted", acc(P.roll(1, 0)), flush=True)
