"""How the kept experts are weighted, per family (docs/results.md, "What differs between the families").

    OMP_NUM_THREADS=1 .venv/bin/python scripts/renormalisation_experiment.py --model builtin:qwen3-moe [--budget 0.5]

Uniform allocation at the budget, token policies `fixed` and `global` (Alloc-T), each with `native` weights (what
the family does: Qwen3 renormalises over the kept experts, DeepSeek-V2 does not) and `keep-weights` (every kept
expert keeps its full-model weight). Perplexity on the first 8,192 validation tokens, each relative to
fixed+native with its 95% paired-bootstrap interval over the same 32 windows. Prints one line per configuration.
"""

from __future__ import annotations

import argparse

import torch

import allocmoe
from allocmoe.uncertainty import paired_interval


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:qwen3-moe")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok, _ = allocmoe.load_model(a.model)
    res = {}
    for pol in ("fixed", "global"):
        for rn in ("native", "keep-weights"):
            plan = allocmoe.allocate(model, a.budget, method="uniform", token_policy=pol, renormalize=rn,
                                     tokenizer=tok, progress=False)
            res[(pol, rn)] = allocmoe.evaluate(model, plan, tokenizer=tok, max_tokens=a.tokens)
    base = res[("fixed", "native")]
    for (pol, rn), r in res.items():
        iv = paired_interval(base["window_nll"], r["window_nll"], base["window_tokens"])
        print(f"uniform {a.budget:g} {pol:>6} {rn:>12}: ppl {r['perplexity']:.3f}, act/tok "
              f"{r['activations_per_token']:.2f}, vs fixed+native {100 * iv['delta']:+.2f}% "
              f"[{100 * iv['low']:+.2f}, {100 * iv['high']:+.2f}]" + ("" if iv["resolved"] else " ≈"), flush=True)


if __name__ == "__main__":
    main()
