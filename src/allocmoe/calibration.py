"""Calibrating the token policies whose per-token expert count varies (those with `calibrated = True`
in the policy registry: threshold, top-p, naee).

Each such policy has one knob (`TokenPolicy.param`: tau_l per layer, one p, one beta) that sets the
*average* number of experts per token. We record the routers' sorted scores on calibration text, solve for the knob on the
recorded scores, then re-record with the calibrated plan applied (later layers see the changed hidden
states) and repeat until the measured activations per token are within `tol` of the target.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from . import policies
from .divergence import batches, model_device
from .errors import CalibrationError
from .patching import apply
from .adapters import find_moe_layers
from .models import weights_loaded
from .plan import Plan


def _record(model: nn.Module, plan: Plan, windows: torch.Tensor, batch_size: int, max_k: int, progress: bool):
    """Run `plan` over the windows; return per-layer sorted top-max_k rank scores, top-p inputs, and counts."""
    handle = apply(model, plan)
    recs = [{"vals": [], "wvals": [], "wsum": []} for _ in handle.layers]
    hooks = []
    for layer, rec in zip(handle.layers, recs):

        def hook(mod, args, out, layer=layer, rec=rec):
            with weights_loaded(mod):  # offloaded (accelerate) routers hold their weights only inside forward
                s = layer.adapter.scores(mod, args[0])
            vals, ids = policies.sorted_candidates(s.rank, max_k)
            w = s.weight.masked_fill(~torch.isfinite(s.rank), 0.0)
            rec["vals"].append(vals)
            rec["wvals"].append(w.gather(1, ids))
            rec["wsum"].append(w.sum(-1))

        hooks.append(layer.router.register_forward_hook(hook))
    try:
        with torch.no_grad():
            dev = model_device(model)
            for ids in tqdm(list(batches(windows, batch_size)), disable=not progress, desc="calibrating",
                            leave=False):
                model(ids.to(dev), use_cache=False)
        counts = handle.counts()["cumulative"]
    finally:
        for h in hooks:
            h.remove()
        handle.remove()
    return [{k: torch.cat(v) for k, v in r.items()} for r in recs], counts


def _solve_monotone(f, lo: float, hi: float, target: float, increasing: bool, iters: int = 60) -> float:
    """Bisection for x in [lo, hi] with f(x) ~= target, f monotone."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _per_layer_knob(pol: policies.TokenPolicy, rec: dict, k: float, min_k: int) -> float:
    """A per-layer knob in score units (e.g. tau_l): among the recorded scores, the value whose mean count
    is closest to k (the mean count is non-increasing in the knob)."""
    vals = rec["vals"]
    cand = torch.unique(vals[torch.isfinite(vals)])
    lo, hi = 0, len(cand) - 1
    f = lambda i: float(pol.calibration_counts(rec, float(cand[i]), min_k).float().mean())  # noqa: E731
    while lo < hi:  # smallest index i with f(i) <= k
        mid = (lo + hi) // 2
        if f(mid) <= k:
            hi = mid
        else:
            lo = mid + 1
    best = min((i for i in (lo - 1, lo) if 0 <= i < len(cand)), key=lambda i: abs(f(i) - k))
    return float(cand[best])


def _shared_knob(pol: policies.TokenPolicy, recs: list[dict], target: float, min_k: int) -> float:
    """One knob for all of `recs` (layers) whose mean counts, summed over them, come to `target` (bisection)."""
    def mean_total(x):
        return sum(float(pol.calibration_counts(rec, x, min_k).float().mean()) for rec in recs)
    return _solve_monotone(mean_total, *pol.param_range, target, increasing=pol.param_increases_count)


def calibrate(model: nn.Module, plan: Plan, windows: torch.Tensor, *, batch_size: int = 8, tol: float = 0.005,
              max_rounds: int = 5, progress: bool = True) -> Plan:
    """Fill in the knob of `plan`'s calibrated token policy so the plan meets its budget on average."""
    name = plan.policy
    pol = policies.get_policy(name)
    if not pol.calibrated:
        return plan
    max_k = int(plan.token_policy.get("max_k") or max(plan.original_ks))
    min_k = int(plan.token_policy.get("min_k", 1))
    target = sum(plan.ks)
    d = plan.to_dict()
    # start from a neutral guess so the first recording is the plan-free model
    for row in d["layers"]:
        row.pop(pol.param, None)
    cur = Plan.from_dict({**d, "token_policy": {"name": "fixed"}, "layers": [
        {**r, "k": orig} for r, orig in zip(d["layers"], plan.original_ks)]})
    measured = None
    for rnd in range(max_rounds):
        recs, counts = _record(model, cur, windows, batch_size, max_k, progress)
        if rnd > 0:
            measured = counts["activations_per_token"]
            if abs(measured - target) <= tol * target:
                break
        if pol.per_layer_param:
            for row, rec, k in zip(d["layers"], recs, plan.ks):
                row[pol.param] = _per_layer_knob(pol, rec, k, min_k)
        else:
            d["token_policy"][pol.param] = _shared_knob(pol, recs, target, min_k)
        cur = Plan.from_dict(d)
    if measured is None or abs(measured - target) > tol * target:
        _, counts = _record(model, cur, windows, batch_size, max_k, progress)
        measured = counts["activations_per_token"]
    if abs(measured - target) > 0.01 * target:
        raise CalibrationError(f"could not calibrate the {name} policy to {target} activations/token "
                            f"(got {measured:.3f} after {max_rounds} rounds); try more calibration text")
    cur.meta["calibration"] = {"target_activations_per_token": target, "measured_activations_per_token": measured,
                               "tokens": int(windows.numel())}
    cur.budget = dict(cur.compute_budget(), measured_on_calibration=round(measured, 4))
    return cur


def layer_knobs(model: nn.Module, windows: torch.Tensor, k_values: list[int], policy: str, *, min_k: int = 1,
                batch_size: int = 8, progress: bool = True) -> list[list[float | None]]:
    """For policy-aware profiling: the knob that makes MoE layer l alone average k experts per token, for
    every layer and k in k_values, on the full model's router scores (every other layer is at full K while
    one layer is profiled, so the scores layer l sees are the full model's). None for uncalibrated policies."""
    from .plan import full_plan

    pol = policies.get_policy(policy)
    layers = find_moe_layers(model)
    if not pol.calibrated:
        return [[None] * len(k_values) for _ in layers]
    max_k = max(max(k_values), max(l.top_k for l in layers))
    recs, _ = _record(model, full_plan(model), windows, batch_size, max_k, progress)
    solve = _per_layer_knob if pol.per_layer_param else (lambda p, rec, k, m: _shared_knob(p, [rec], k, m))
    return [[solve(pol, rec, k, min_k) for k in k_values] for rec in recs]
