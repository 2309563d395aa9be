#!/usr/bin/env python
"""Write src/allocmoe/assets/qwen3_moe_model/TRAINING.md from the training log while the Qwen3-MoE built-in
model is still in training (issue 20): the command, the schedule, where the snapshot is, and the probe table
(validation loss and the cost of halving the experts every --log-every steps).

    .venv/bin/python scripts/qwen3_training_record.py corpus_build/qwen3_train.log
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIR = REPO / "src" / "allocmoe" / "assets" / "qwen3_moe_model"
STEP = re.compile(r"^step (\d+)/(\d+) ce_ema ([\d.]+) bal ([\d.]+) val ([\d.]+) half-K val ppl \+?(-?[\d.]+)% "
                  r"elapsed ([\d.]+) min  max/mean expert load (\{.*\})")


def routing_diagnosis(tokens: int = 8192) -> str:
    """Why halving costs what it costs, measured on the shipped snapshot (first `tokens` validation tokens, fp32,
    1 thread): the share of the renormalised top-8 weight the top 4 carry per MoE layer, and the cost of every
    layer at uniform top-k for k = 1, 2, 4, 6."""
    import math

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO / "scripts"))
    import train_default_model as T

    torch.set_num_threads(1)
    m = AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(DIR)
    val = (REPO / "src" / "allocmoe" / "assets" / "data" / "validation.txt").read_text()
    ids = np.array(tok(val[: tokens * 8])["input_ids"][:tokens])
    gates = T.moe_gates(m)
    K = m.config.num_experts_per_tok
    share = {i: [] for i in gates}

    def hook(i):
        def fn(mod, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            top = torch.softmax(x @ mod.weight.float().T, -1).topk(K, -1).values
            share[i].append(float((top[:, : K // 2].sum(-1) / top.sum(-1)).mean()))
        return fn

    hs = [g.register_forward_hook(hook(i)) for i, g in gates.items()]
    with torch.no_grad():
        base = T.eval_loss(m, ids, 256)
    for h in hs:
        h.remove()
    curve = {}
    for k in (1, 2, K // 2, 3 * K // 4):
        T.set_topk(m, k)
        with torch.no_grad():
            curve[k] = 100 * (math.exp(T.eval_loss(m, ids, 256) - base) - 1)
    T.set_topk(m, K)
    return (f"On the first {len(ids):,} validation tokens (fp32): the top {K // 2} of the renormalised top-{K} "
            f"weights carry {min(map(np.mean, share.values())):.2f}-{max(map(np.mean, share.values())):.2f} of "
            f"the weight per MoE layer (by layer: {', '.join(f'{np.mean(v):.2f}' for v in share.values())}), so "
            f"dropping the lower {K // 2} removes little; every layer at uniform top-k costs "
            + ", ".join(f"top-{k} {v:+.1f}%" for k, v in curve.items())
            + ". The model depends on its experts (top-1 is far costlier) but its routers are confident: most of"
            " a token's expert weight sits in its first few experts.")


def main(log: str) -> int:
    text = Path(log).read_text(errors="replace").replace("\r", "\n")
    rows = [m.groups() for m in map(STEP.match, text.splitlines()) if m]
    prog = json.loads((DIR / "progress.json").read_text())
    table = ["| step | train CE (EMA) | balance loss | val loss (24 windows) | uniform top-4 cost (same windows) | "
             "elapsed (min) | max/mean expert load, first / last MoE layer |", "|---|---|---|---|---|---|---|"]
    for step, total, ce, bal, val, half, el, load in rows:
        loads = list(ast.literal_eval(load).values())
        table.append(f"| {step} | {ce} | {bal} | {val} | +{half} % | {el} | {loads[0]} / {loads[-1]} |")
    md = f"""# allocmoe built-in Qwen3-MoE model (`builtin:qwen3-moe`) -- training record (in progress)

Stock `transformers` `Qwen3MoeForCausalLM`: 12 layers, all MoE; 64 routed experts of width 48, softmax top-8 with
renormalised weights (`norm_topk_prob=True`), no shared experts; grouped-query attention (4 heads, 2 KV heads,
head dim 64, QK-norm); hidden 256; tied embeddings; 32.97M parameters, 66.2 MB in bf16; the built-in DeepSeek-V2
model's tokenizer (8,192 byte-level BPE tokens).

**Status: intermediate weights.** The shipped checkpoint is the snapshot at step {prog['step']} of the
{prog['schedule_steps']}-step schedule ({prog['tokens_seen'] / 1e6:.2f}M tokens seen, {prog['elapsed_minutes']:.0f}
min of training; `progress.json`). Evaluation, the per-layer sensitivity and the main job come when training ends.

## Recipe (the family's usual one, not tuned to flatten routers)

Routers are trained like every other weight (the same learning rate, init std 0.02, no router-specific tricks),
with a Switch/Qwen-style load-balancing loss (coefficient 0.01, averaged over MoE layers) and an ST-MoE router
z-loss (0.001); AdamW (0.9/0.95, weight decay 0.1, none on norms and routers), peak lr 1.5e-3, 200 warm-up steps,
cosine to 10%; batch 8 x 256 tokens; bf16 autocast; seed 1234; 1 CPU thread. Training text: corpus v3's training
split (40.9 MB, 11.05M tokens; no GCIDE; WordNet glosses for training only; `src/allocmoe/assets/data/SOURCES.md`).

## Commands

```bash
.venv/bin/pip install -e '.[corpus]' && .venv/bin/python scripts/build_corpus.py   # corpus v3 into corpus_build/
nohup scripts/train_qwen3_moe.sh > corpus_build/qwen3_train.log 2>&1 &              # the schedule from step 0
# continue in a later session (same schedule and data order):
nohup scripts/train_qwen3_moe.sh --resume >> corpus_build/qwen3_train.log 2>&1 &    # exact, from corpus_build/qwen3_ckpt/
nohup scripts/train_qwen3_moe.sh --init-from src/allocmoe/assets/qwen3_moe_model >> corpus_build/qwen3_train.log 2>&1 &
#   (a fresh machine: weights from this snapshot, a fresh optimizer, the schedule continued at its step)
cp training_wip/qwen3_moe/* src/allocmoe/assets/qwen3_moe_model/   # ship the latest snapshot (one at a time)
.venv/bin/python scripts/qwen3_training_record.py corpus_build/qwen3_train.log   # this file
```

Training speed: 1.6-1.9 s/step on one thread on a quiet core, up to 4 s/step while other jobs shared the machine.

## Training log (the probe every 250 steps)

The probe is the loss on the first 24 validation windows at full top-8 and with every MoE layer at uniform top-4
(the router's `top_k`, renormalised over the kept four as the family does). Issue 20's target is a cost of at least
10% on all validation tokens at the end of training; during the first quarter of the schedule it rose from about
1% to about 3% (noisy: 6k tokens). In the last two MoE layers the expert load is far less balanced (max/mean 6-7)
than in the others (1.4-2.0), under the same balancing loss.

""" + "\n".join(table) + f"""

## Where the half-budget cost stands (the shipped snapshot)

{routing_diagnosis()}
"""
    (DIR / "TRAINING.md").write_text(md)
    print(f"-> {DIR / 'TRAINING.md'} ({len(rows)} probe rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else str(REPO / "corpus_build" / "qwen3_train.log")))
