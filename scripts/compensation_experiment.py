"""Dropped-expert compensation on the built-in model: validation (and out-of-domain) perplexity without/with it.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/compensation_experiment.py \
        --plan uniform3 --plan /tmp/plan_g.json --out /tmp/comp_exp.json

Calibration: the first 16,384 tokens of the built-in calibration split in windows of 256 (fitting only;
fit_best holds out its last eighth for the mode choice). Evaluation: the first 16,384 tokens of the
validation split (BOS + text, non-overlapping windows of 256, as `allocmoe eval`), and of
assets/data/ood.txt when it exists. Compensation cost is reported as multiply-adds per token beside the
expert multiply-adds the plan saves (measured: original minus executed activations x 3 H I).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import allocmoe  # noqa: E402
from allocmoe import compensation_fit as CF  # noqa: E402
from allocmoe import compensation_maps as CM  # noqa: E402
from allocmoe.data import builtin_text, read_texts, token_windows  # noqa: E402
from allocmoe.models import load_model  # noqa: E402


def eval_windows(tok, text: str, n_tokens: int, seq_len: int) -> torch.Tensor:
    """[N, seq_len + 1] sequences: BOS + text, scored targets = the first n_tokens tokens after BOS."""
    bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
    ids = bos + list(tok(text, add_special_tokens=False, verbose=False)["input_ids"])
    n = min(n_tokens, len(ids) - 1) // seq_len
    return torch.stack([torch.tensor(ids[i * seq_len:(i + 1) * seq_len + 1]) for i in range(n)])


def perplexity(model, seqs: torch.Tensor, batch_size: int = 8) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, seqs.shape[0], batch_size):
            s = seqs[i:i + batch_size]
            logits = model(input_ids=s[:, :-1], use_cache=False).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), s[:, 1:], reduction="sum"))
            n += s[:, 1:].numel()
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", action="append", default=[], help="'uniformK' or a plan JSON (repeatable)")
    ap.add_argument("--modes", default="teacher,sequential")
    ap.add_argument("--ranks", default="auto", help="comma list: auto or integers")
    ap.add_argument("--ridges", default=f"{CF.DEFAULT_RIDGE:g}")
    ap.add_argument("--no-router-features", dest="router_features", action="store_false",
                    help="pure low-rank affine map of x (default: also the dropped experts' router probabilities)")
    ap.add_argument("--flops-fraction", type=float, default=0.1, help="cap; 0 = no cap (diagnostics only)")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--best", action="store_true",
                    help="also run fit_best: mode (and ridge, among --ridges) chosen by KL on held-out calibration")
    ap.add_argument("--only-best", action="store_true", help="run fit_best only")
    ap.add_argument("--save-dir", default=None, help="save each fitted compensation here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.flops_fraction <= 0:
        args.flops_fraction = None

    model, tok, _ = load_model()
    layers = allocmoe.find_moe_layers(model)
    macs_pair = CM.expert_macs_per_pair(layers[0])
    calib_texts, _ = read_texts(None, "calibration")
    calib = token_windows(tok, calib_texts, 256, max_tokens=args.calib_tokens)
    evals = {"validation": eval_windows(tok, Path(builtin_text("validation")).read_text(), args.eval_tokens, 256)}
    ood = Path(builtin_text("validation")).parent / "ood.txt"
    if ood.exists():
        evals["ood"] = eval_windows(tok, ood.read_text(encoding="utf-8"), args.eval_tokens, 256)
    print(f"calibration {tuple(calib.shape)}; eval sets {[(k, tuple(v.shape)) for k, v in evals.items()]}",
          file=sys.stderr)

    results: dict = {"expert_macs_per_pair": macs_pair, "full": {}, "plans": {}}
    t = time.time()
    for name, seqs in evals.items():
        results["full"][name] = perplexity(model, seqs)
    results["full"]["seconds"] = time.time() - t
    print(f"full {results['full']}", file=sys.stderr)

    for spec in args.plan or ["uniform3"]:
        if spec.startswith("uniform"):
            k = int(spec[len("uniform"):])
            plan = allocmoe.make_plan(model, [k] * len(layers), method="uniform")
        else:
            plan = allocmoe.Plan.load(spec)
        pr: dict = {"ks": plan.ks, "token_policy": plan.token_policy["name"], "runs": []}
        with allocmoe.apply(model, plan) as h:
            for name, seqs in evals.items():
                pr[name] = perplexity(model, seqs)
            acts = h.counts()["cumulative"]["activations_per_token"]
        orig = sum(l.top_k for l in layers)
        pr["activations_per_token"] = acts
        pr["saved_expert_macs_per_token"] = (orig - acts) * macs_pair
        print(f"{spec}: {pr}", file=sys.stderr)
        configs = [] if args.only_best else [(m, r, float(rd)) for m in args.modes.split(",")
                                             for r in args.ranks.split(",") for rd in args.ridges.split(",")]
        if args.best or args.only_best:
            configs.append(("best", "auto", float(args.ridges.split(",")[0])))
        for mode, r, ridge in configs:
            rank = r if r == "auto" else int(r)
            t = time.time()
            try:
                if mode == "best":
                    comp = CF.fit_best(model, plan, calib, rank=rank, flops_fraction=args.flops_fraction,
                                       ridges=tuple(float(x) for x in args.ridges.split(",")),
                                       router_features=args.router_features, progress=False)
                else:
                    comp = CF.fit_compensation(model, plan, calib, rank=rank, ridge=ridge, mode=mode,
                                               flops_fraction=args.flops_fraction,
                                               router_features=args.router_features, progress=False)
            except allocmoe.AllocMoeError as e:
                print(f"  {mode} rank={r} ridge={ridge}: refused: {e}", file=sys.stderr)
                pr["runs"].append({"mode": mode, "rank": r, "ridge": ridge, "refused": str(e)})
                continue
            fit_s = time.time() - t
            run = {"mode": mode, "router_features": args.router_features, "rank": r, "ridge": ridge,
                   "ranks": [max(m.values(), default=0) for m in comp.ranks()], "fit_seconds": round(fit_s, 1)}
            if mode == "best":
                run["selection"] = comp.meta["selection"]
            with allocmoe.apply(model, plan) as h, CM.install(model, comp) as ch:
                for name, seqs in evals.items():
                    run[name] = perplexity(model, seqs)
                fl = ch.flops()
                acts = h.counts()["cumulative"]["activations_per_token"]
            run["comp_macs_per_token"] = fl["macs_per_token"]
            saved = (orig - acts) * macs_pair
            run["comp_over_saved"] = fl["macs_per_token"] / saved if saved else None
            run["comp_over_saved_per_layer"] = [
                (fl["macs_per_token_per_layer"][i] / ((l.top_k - a) * macs_pair)) if l.top_k - a > 1e-9 else None
                for i, (l, a) in enumerate(zip(layers, h.counts()["cumulative"]["activations_per_token_per_layer"]))]
            for name in evals:
                lost = pr[name] - results["full"][name]
                run[f"{name}_recovered"] = (pr[name] - run[name]) / lost if lost > 0 else None
            if args.save_dir:
                Path(args.save_dir).mkdir(parents=True, exist_ok=True)
                run["file"] = str(Path(args.save_dir) / f"{Path(spec).stem}_{mode}_{r}_{ridge:g}.safetensors")
                run["sha256"] = comp.save(run["file"])
            pr["runs"].append(run)
            print("  " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in run.items()
                                     if k not in ("comp_over_saved_per_layer", "selection")}), file=sys.stderr)
        results["plans"][spec] = pr
    text = json.dumps(results, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
