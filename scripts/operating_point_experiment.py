"""Full-K vs operating-point profiling on the built-in model: the DP plans each gives, scored against uniform.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/operating_point_experiment.py --budget 0.5 --out /tmp/op_exp.json

Calibration: the first `--calibration-tokens` (default 2,048) tokens of the built-in calibration split in
windows of 256; both profiles are made on them (`profile(model, w)` and `profile(model, w, at=budget)`, 2
rounds). Evaluation: `allocmoe.evaluate` on the first `--eval-tokens` (default 8,192) tokens of the validation
split, the same windows for every plan, each plan's Δppl against uniform with its 95% paired-bootstrap
interval (allocmoe.uncertainty). The guard is not involved (plans are made with make_plan). Wall times are
single-thread and only meaningful on a quiet machine; the decoder-layer counts in operating_point.py are not.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import allocmoe  # noqa: E402
from allocmoe import allocators  # noqa: E402
from allocmoe.plan import make_plan  # noqa: E402
from allocmoe.planning import calibration_windows  # noqa: E402
from allocmoe.profiling import profile  # noqa: E402
from allocmoe.uncertainty import paired_interval  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="0.5")
    ap.add_argument("--calibration-tokens", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    m, tok, *_ = allocmoe.load_model()
    w = calibration_windows(tok, tokens=a.calibration_tokens, seq_len=256)
    t = time.perf_counter()
    full = profile(m, w, progress=False)
    t_full = time.perf_counter() - t
    t = time.perf_counter()
    op = profile(m, w, progress=False, at=a.budget)
    t_op = time.perf_counter() - t
    o = op.operating_point
    B = o["budget"]
    plans = {"uniform": o["allocations"][0], "full-K dp": allocators.dp_allocate(full.sensitivity, full.k_values, B)}
    for i, alloc in enumerate(o["allocations"][1:], 1):
        plans[f"op dp round {i}"] = alloc
    plans[f"op dp round {len(o['allocations'])}"] = o["dp_plan"]
    res = {n: allocmoe.evaluate(m, make_plan(m, ks), tokenizer=tok, max_tokens=a.eval_tokens) for n, ks in plans.items()}
    u = res["uniform"]
    out = {"budget": a.budget, "activations": B, "calibration_windows": list(w.shape), "full_profile_s": t_full,
           "op_profile_s": t_op, "operating_point": o,
           "plans": {n: {"ks": plans[n], "perplexity": r["perplexity"],
                         "vs_uniform": paired_interval(u["window_nll"], r["window_nll"], u["window_tokens"])}
                     for n, r in res.items()}}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    for n, p in out["plans"].items():
        iv = p["vs_uniform"]
        print(f"{n:16s} {p['ks']}  ppl {p['perplexity']:.3f}  vs uniform {100 * iv['delta']:+.2f}% "
              f"[{100 * iv['low']:+.2f}, {100 * iv['high']:+.2f}]")


if __name__ == "__main__":
    main()
