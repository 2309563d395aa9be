#!/usr/bin/env python
"""Write src/allocmoe/assets/qwen3_moe_model/TRAINING.md, the Qwen3-MoE built-in model's training record (issue
20): the recipe, its two phases, the commands, the probe table (validation loss and the cost of halving the
experts every --log-every steps), the final evaluation when its JSON is given, and the routing measured on the
shipped weights.

    .venv/bin/python scripts/qwen3_training_record.py corpus_build/qwen3_train.log [docs/qwen3_moe_model_eval.json]
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


# Phase 1 of the run (from the step-5,448 snapshot's progress.json, commit d7ca77d): its schedule, precision and
# wall time. Its training log did not survive the move to a new machine; its probe rows are kept from the
# committed TRAINING.md (rows up to this step are carried over each time this file is regenerated).
PHASE1 = {"end_step": 5448, "schedule_steps": 10000, "minutes": 259.4, "precision": "bf16 autocast"}
ROW = re.compile(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| \+?(-?[\d.]+) % \| ([\d.]+) \| ([\d.]+) / ([\d.]+) \|$")


def probe_rows(log: str) -> list[tuple]:
    """(step, ce, bal, val, half-K cost %, elapsed min over the whole run, load first, load last), phase 1's rows
    from the committed record, then the current log's (its elapsed minutes offset by phase 1's)."""
    old = (DIR / "TRAINING.md").read_text() if (DIR / "TRAINING.md").exists() else ""
    rows, seen = [], set()
    for m in map(ROW.match, old.splitlines()):
        if m and int(m[1]) <= PHASE1["end_step"] and m[1] not in seen:
            seen.add(m[1])
            rows.append(m.groups())
    text = Path(log).read_text(errors="replace").replace("\r", "\n")
    for m in map(STEP.match, text.splitlines()):
        if m:
            step, _, ce, bal, val, half, el, load = m.groups()
            loads = list(ast.literal_eval(load).values())
            rows.append((step, ce, bal, val, half, f"{PHASE1['minutes'] + float(el):.1f}", loads[0], loads[-1]))
    return rows


def evaluation(ev: dict) -> str:
    """The final evaluation (`train_default_model.py eval`): all tokens of both splits, each layer alone."""
    K = 8
    h = K // 2
    v, o = ev["validation"], ev["ood"]
    per = ev[f"single_layer_top{h}"]
    sp = ev["single_layer_spread"]
    curve = ev["diagnostics"]["uniform_topk_rel_increase"]
    lines = [
        f"Measured with `scripts/train_default_model.py eval` (fp32, {ev['threads']} threads, 256-token windows; "
        f"`docs/qwen3_moe_model_eval.json`):",
        "",
        "| split | tokens | top-8 perplexity | uniform top-4 perplexity | cost | issue 20 target | met |",
        "|---|---:|---:|---:|---:|---:|:-:|",
    ]
    for name, d, target in (("validation", v, 0.10), ("out of domain (ood.txt)", o, 0.08)):
        c = d[f"uniform_top{h}_rel_increase"]
        lines.append(f"| {name} | {d['tokens']:,} | {d[f'top{K}_ppl']:.3f} | {d[f'uniform_top{h}_ppl']:.3f} | "
                     f"{100 * c:+.1f}% | >= +{100 * target:.0f}% | {'yes' if c >= target else '**no**'} |")
    lines += ["", f"Each MoE layer alone at top-4 (every other layer at top-8), on the first "
              f"{v['per_layer_tokens']:,} validation tokens:", "",
              "| layer | " + " | ".join(per) + " |", "|---|" + "---:|" * len(per),
              "| cost | " + " | ".join(f"{100 * x['rel_increase']:+.2f}%" for x in per.values()) + " |", "",
              f"Spread: {100 * sp['min']:+.2f}% to {100 * sp['max']:+.2f}%"
              + (f" ({sp['max_over_min']:.1f}x)" if sp.get("max_over_min") else "") + ". Every MoE layer at uniform "
              "top-k on the same tokens: " + ", ".join(
                  f"{'no routed experts' if k == '0' else f'top-{k}'} {100 * c:+.1f}%" for k, c in curve.items()
                  if int(k) < K) + "."]
    return "\n".join(lines)


def targets(ev: dict) -> str:
    """Issue 20's targets against the final evaluation, the recipe's per-layer spread beside the DeepSeek-V2
    model's (docs/default_model_eval.json, measured the same way), and what would close a miss."""
    ds = json.loads((REPO / "docs" / "default_model_eval.json").read_text())
    v, o = (ev[s]["uniform_top4_rel_increase"] for s in ("validation", "ood"))
    sp, dsp = ev["single_layer_spread"], ds["single_layer_spread"]
    per = {int(i): x["rel_increase"] for i, x in ev["single_layer_top4"].items()}
    order = sorted(per, key=per.get, reverse=True)
    return f"""- **Uniform top-4 costs {100 * v:+.1f}% on validation (target >= +10%: missed by {100 * (0.10 - v):.1f} points)
  and {100 * o:+.1f}% out of domain (target >= +8%: {'met' if o >= 0.08 else f'missed by {100 * (0.08 - o):.1f} points'}).**
  Why, measured: the routers are confident (the top 4 of the renormalised top-8 weights carry about 0.73-0.83
  of the weight, last section), so the four experts a token loses carry a fifth of its expert weight; the
  model does depend on its experts (top-2 costs +19%, top-1 +90%). The probe rose from about +1% early in
  phase 1 to about +3% by step 2,000 and stayed at +2.6 to +3.4% from there to step 6,500: the last two thirds
  of training did not raise it.
- **What the recipe does to the per-layer spread:** each layer alone at top-4 costs {100 * sp['min']:+.2f}% to
  {100 * sp['max']:+.2f}% ({sp['max_over_min']:.0f}x; most sensitive: layers {order[0]}, {order[1]} and {order[2]}), against
  {100 * dsp['min']:+.2f}% to {100 * dsp['max']:+.2f}% ({dsp['max_over_min']:.1f}x) on the DeepSeek-V2 model, whose shared experts
  carry part of every layer. With no shared experts and the same balancing loss in every layer, the first and
  the last two MoE layers (whose expert load is also the least balanced) matter most and the middle ones
  hardly at all, so per-layer allocation has much more to move on this model.
- **What would close the validation target** (candidates, not measured: each is a new multi-hour run). Within
  the issue's shape (64-128 experts, top-8, <= 80 MB in bf16) we know of no measured lever: the experts are
  already at 64 (128 would be narrower still) and more steps did not raise the cost. Outside it:
  fewer, wider experts (e.g. 16-32 experts of width 96-192), so each expert carries more of a token's work, or
  a larger model trained on much more text. Flattening the routers (a larger z-loss, a router temperature, a
  higher router learning rate) would raise the cost too, but that is tuning the recipe for the method, which
  the issue rules out."""


def main(log: str, eval_json: str | None = None) -> int:
    sys.path.insert(0, str(REPO / "scripts"))
    from train_default_model import lr_at

    rows = probe_rows(log)
    prog = json.loads((DIR / "progress.json").read_text())
    final = prog["step"] >= prog["schedule_steps"]
    table = ["| step | train CE (EMA) | balance loss | val loss (24 windows) | uniform top-4 cost (same windows) | "
             "elapsed (min) | max/mean expert load, first / last MoE layer |", "|---|---|---|---|---|---|---|"]
    for step, ce, bal, val, half, el, first, last in rows:
        table.append(f"| {step} | {ce} | {bal} | {val} | +{half} % | {el} | {first} / {last} |")
    minutes = PHASE1["minutes"] + prog["elapsed_minutes"]
    if final:
        status = (f"**Status: final weights** (step {prog['step']}; {prog['tokens_seen'] / 1e6:.2f}M tokens seen, "
                  f"{minutes:.0f} min of one core over the two phases below; `progress.json` holds phase 2's).")
    else:
        status = (f"**Status: intermediate weights.** The shipped checkpoint is the snapshot at step {prog['step']} of "
                  f"the {prog['schedule_steps']}-step schedule ({prog['tokens_seen'] / 1e6:.2f}M tokens seen, "
                  f"{minutes:.0f} min of training). Evaluation, the per-layer sensitivity and the main job come when "
                  f"training ends.")
    ev = json.loads(Path(eval_json).read_text()) if eval_json else None
    md = f"""# allocmoe built-in Qwen3-MoE model (`builtin:qwen3-moe`) -- training record{'' if final else ' (in progress)'}

Stock `transformers` `Qwen3MoeForCausalLM`: 12 layers, all MoE; 64 routed experts of width 48, softmax top-8 with
renormalised weights (`norm_topk_prob=True`), no shared experts; grouped-query attention (4 heads, 2 KV heads,
head dim 64, QK-norm); hidden 256; tied embeddings; 32.97M parameters, 66.2 MB in bf16; the built-in DeepSeek-V2
model's tokenizer (8,192 byte-level BPE tokens).

{status}

## Recipe (the family's usual one, not tuned to flatten routers)

Routers are trained like every other weight (the same learning rate, init std 0.02, no router-specific tricks),
with a Switch/Qwen-style load-balancing loss (coefficient 0.01, averaged over MoE layers) and an ST-MoE router
z-loss (0.001); AdamW (0.9/0.95, weight decay 0.1, none on norms and routers), peak lr 1.5e-3, 200 warm-up steps,
cosine to 10%; batch 8 x 256 tokens; seed 1234; 1 CPU thread. Training text: corpus v3's training split (40.9 MB,
11.05M tokens; no GCIDE; WordNet glosses for training only; `src/allocmoe/assets/data/SOURCES.md`).

Two phases (the run moved machines between them):

| phase | steps | lr schedule | precision | wall time (one core) | why |
|---|---|---|---|---:|---|
| 1 | 0 - {PHASE1['end_step']:,} | cosine over {PHASE1['schedule_steps']:,} steps | {PHASE1['precision']} | {PHASE1['minutes']:.0f} min | the planned schedule, resumed across sessions with `--resume` |
| 2 | {PHASE1['end_step']:,} - {prog['step']:,} | the cosine re-based to end at {prog['schedule_steps']:,} (lr {lr_at(PHASE1['end_step'], prog['schedule_steps'], 1.5e-3, 200):.1e} at step {PHASE1['end_step']:,}, 100-step re-warm-up, then to 10%) | fp32 | {prog['elapsed_minutes']:.0f} min | a fresh machine: weights from the step-{PHASE1['end_step']:,} snapshot with `--init-from` (fresh AdamW moments); its CPU (AVX2, no AVX512-BF16) runs bf16 matmuls about 40x slower than fp32 (1.1 vs 43 GFLOP/s on one core, measured), and the issue's budget is about 6 hours of one core |

## Commands

```bash
.venv/bin/pip install -e '.[corpus]' && .venv/bin/python scripts/build_corpus.py   # corpus v3 into corpus_build/
# phase 1 (the command in phase 1's progress.json): scripts/train_qwen3_moe.sh with --bf16 --steps 10000
nohup scripts/train_qwen3_moe.sh --init-from src/allocmoe/assets/qwen3_moe_model > corpus_build/qwen3_train.log 2>&1 &
#   phase 2: weights from the shipped snapshot, a fresh optimizer, the schedule continued at its step
nohup scripts/train_qwen3_moe.sh --resume >> corpus_build/qwen3_train.log 2>&1 &    # continue, exact, from corpus_build/qwen3_ckpt/
cp training_wip/qwen3_moe/* src/allocmoe/assets/qwen3_moe_model/   # ship the latest snapshot (one at a time)
.venv/bin/python scripts/train_default_model.py eval --model src/allocmoe/assets/qwen3_moe_model --threads 2 \\
  --out docs/qwen3_moe_model_eval.json                                                 # the final evaluation
.venv/bin/python scripts/qwen3_training_record.py corpus_build/qwen3_train.log [docs/qwen3_moe_model_eval.json]  # this file
```

Training speed: phase 1 1.6-1.9 s/step (bf16) on a quiet core, up to 4 s/step while other jobs shared the machine;
phase 2 3.9-4.8 s/step (fp32).

## Training log (the probe every 250 steps)

The probe is the loss on the first 24 validation windows at full top-8 and with every MoE layer at uniform top-4
(the router's `top_k`, renormalised over the kept four as the family does; noisy: 6k tokens). Elapsed minutes are
over the whole run. Phase 1's row at step 5,500 came from weights that were not kept (phase 2 restarted from step
5,448), so phase 2 has its own. In the last MoE layer the expert load is far less balanced (max/mean 6-7) than in
the first (2.6-2.9), under the same balancing loss.

""" + "\n".join(table) + f"""
""" + (f"""
## Evaluation (final weights)

{evaluation(ev)}

## Issue 20's targets

{targets(ev)}
""" if ev else "") + f"""
## Why halving costs what it costs (the shipped weights)

{routing_diagnosis()}
"""
    (DIR / "TRAINING.md").write_text(md)
    print(f"-> {DIR / 'TRAINING.md'} ({len(rows)} probe rows{', with the evaluation' if ev else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else str(REPO / "corpus_build" / "qwen3_train.log"),
                  sys.argv[2] if len(sys.argv) > 2 else None))
